"""scripts/benchmark.py's command line and its comparison with transformers' T5 (scripts/hf_benchmark.py).

Without torch and transformers (the `bench` extra, which `make test` does not install) the tests that build the
PyTorch model skip; the rest need neither.
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import gin
import pytest

from t5x_lite import network
from tests.test_network import count_parameters as jax_parameter_count

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(REPO_ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = load_script("benchmark")
HAVE_HF = all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="torch and transformers are not installed (the `bench` extra: "
                                                   "pip install -c constraints.txt -e '.[bench]')")
# Every field a different value, so that a field mapped from the wrong one shows.
DISTINCT = network.T5Config(
    vocab_size=1000, emb_dim=48, num_heads=3, head_dim=20, mlp_dim=72, num_encoder_layers=2, num_decoder_layers=4,
    dropout_rate=0.125, relative_attention_num_buckets=16, relative_attention_max_distance=40,
)
# The T5.1.1 gin files' parameter counts (tests/test_network.py checks them on the JAX side).
GIN_PARAMETERS = {"tiny": 4_310_272, "small": 76_961_152, "base": 247_577_856, "large": 783_150_080,
                  "xl": 2_849_757_184, "xxl": 11_135_332_352}


def config_from_gin(size):
    gin.clear_config()
    gin.add_config_file_search_path(os.path.join(REPO_ROOT, "gin"))
    gin.parse_config_files_and_bindings([os.path.join(REPO_ROOT, f"gin/models/t5_1_1/{size}.gin")], [])
    config = gin.query_parameter("%MODEL").scoped_configurable_fn().config
    gin.clear_config()
    return config


def test_hf_kwargs_map_every_field():
    kwargs = benchmark.hf_t5_kwargs(DISTINCT)
    assert kwargs == {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": 1000, "d_model": 48, "d_kv": 20, "d_ff": 72, "num_layers": 2, "num_decoder_layers": 4,
        "num_heads": 3, "relative_attention_num_buckets": 16, "relative_attention_max_distance": 40,
        "dropout_rate": 0.125, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "scale_decoder_outputs": False, "is_encoder_decoder": True,
        "use_cache": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }
    tied = benchmark.hf_t5_kwargs(dataclasses.replace(DISTINCT, mlp_activations=("relu",), logits_via_embedding=True))
    assert tied["tie_word_embeddings"] is True and tied["scale_decoder_outputs"] is True
    assert tied["feed_forward_proj"] == "relu"
    json.dumps(kwargs)  # It travels to scripts/hf_benchmark.py as JSON.


def test_hf_kwargs_follow_the_gin_dropout_macro():
    gin.clear_config()
    gin.add_config_file_search_path(os.path.join(REPO_ROOT, "gin"))
    gin.parse_config_files_and_bindings([os.path.join(REPO_ROOT, "gin/models/t5_1_1/small.gin")], ["DROPOUT_RATE = 0.1"])
    config = gin.query_parameter("%MODEL").scoped_configurable_fn().config
    gin.clear_config()
    assert benchmark.hf_t5_kwargs(config)["dropout_rate"] == 0.1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--against=tf"], None),  # argparse: invalid choice
        (["--hf_optimizer=torch"], "go with --against hf"),
        (["--hf_threads=2"], "go with --against hf"),
        (["--against=hf", "--hf_optimizer=adamw"], "valid: torch, transformers"),
        (["--against=hf", "--optimizer=adamw", "--hf_optimizer=torch"], "valid: adamw"),
        (["--against=hf", "--hf_threads=0"], "--hf_threads=0"),
        (["--data_examples=0"], "--data_examples=0"),
        (["--data_warmup=-1"], "--data_warmup=-1"),
        (["--steps=0"], "--steps=0"),
    ],
)
def test_rejects_bad_arguments(argv, message, monkeypatch):
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: object())  # as if torch were there
    with pytest.raises(SystemExit) as error:
        benchmark.parse_args(["--gin_file=gin/models/t5_1_1/tiny.gin", *argv])
    if message is None:
        assert error.value.code == 2
    else:
        assert message in str(error.value.code)


def test_against_hf_without_torch_says_what_to_install(monkeypatch):
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: None if name == "torch" else object())
    with pytest.raises(SystemExit, match=r"needs torch \(not installed\).*\.\[bench\]"):
        benchmark.parse_args(["--gin_file=gin/models/t5_1_1/tiny.gin", "--against=hf"])


def test_hf_defaults_follow_the_jax_optimizer(monkeypatch):
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: object())
    tiny = ["--gin_file=gin/models/t5_1_1/tiny.gin", "--against=hf"]
    assert benchmark.parse_args(tiny).hf_optimizer == "torch"
    assert benchmark.parse_args([*tiny, "--optimizer=adamw"]).hf_optimizer == "adamw"
    assert benchmark.parse_args([*tiny, "--hf_optimizer=transformers"]).hf_optimizer == "transformers"


def test_benchmark_imports_no_torch_transformers_tensorflow_or_seqio():
    code = (
        "import runpy, sys; sys.argv = ['benchmark.py', '--help']\n"
        "try:\n    runpy.run_path('scripts/benchmark.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'tensorflow', 'seqio') if m in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_format_table_reports_the_data_pipeline():
    report = {
        "model": {"gin_files": ["small.gin"], "parameters": 10, "config": {"dtype": "float32"}},
        "setup": {"batch_size": 8, "inputs_length": 512, "targets_length": 114, "num_microbatches": 1,
                  "optimizer": "adafactor", "devices": 1, "device_kind": "cpu", "platform": "cpu", "mesh": {},
                  "steps": 2},
        "results": {"init_seconds": 1.0, "lower_seconds": 1.0, "compile_seconds": 1.0, "step_seconds_median": 10.0,
                    "step_seconds_min": 9.0, "seqs_per_second": 0.8, "tokens_per_second": 500.8,
                    "target_tokens_per_second": 91.2, "train_flops_per_step": 1e12, "achieved_tflops_per_second": 0.1,
                    "peak_tflops_per_second": 0.2, "peak_source": "given", "mfu": 0.5, "mfu_best_step": 0.55,
                    "final_loss": 10.0, "peak_host_memory_bytes": 2**30, "peak_device_memory_bytes": None},
    }
    report["data_pipeline"] = {"task": "t", "skipped": "no local T5 vocabulary"}
    assert "data pipeline: skipped: no local T5 vocabulary" in benchmark.format_table(report)
    report["data_pipeline"] = {"task": "t", "lengths": {"inputs": 512, "targets": 114}, "batch_size": 8,
                               "packed_rows_per_second": 1200.0, "task_examples_per_second": 1300.0,
                               "model_rows_per_second": 0.8, "pipeline_over_model": 1500.0}
    assert "data pipeline: 1,200 examples/s" in benchmark.format_table(report)
    assert "vs model consumes 0.80 examples/s: ratio 1,500.0" in benchmark.format_table(report)


@needs_hf
@pytest.mark.parametrize("size", sorted(GIN_PARAMETERS))
def test_hf_model_has_the_jax_models_parameter_count(size):
    """Built on the meta device (no memory), so every size is checked: the JAX count is the gin file's."""
    import torch

    hf_benchmark = load_script("hf_benchmark")
    with torch.device("meta"):
        model = hf_benchmark.build_model(benchmark.hf_t5_kwargs(config_from_gin(size)))
    assert hf_benchmark.count_parameters(model) == GIN_PARAMETERS[size]
    assert model.config.is_gated_act and model.lm_head.weight is not model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight


@needs_hf
def test_tied_logits_count_one_embedding():
    import torch

    hf_benchmark = load_script("hf_benchmark")
    tied = dataclasses.replace(config_from_gin("tiny"), logits_via_embedding=True)
    with torch.device("meta"):
        model = hf_benchmark.build_model(benchmark.hf_t5_kwargs(tied))
    assert hf_benchmark.count_parameters(model) == GIN_PARAMETERS["tiny"] - 32128 * 64


@needs_hf
def test_compare_hf_times_a_train_step_in_its_own_process():
    config = network.T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                              num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.1)
    parameters = jax_parameter_count(config)
    report = {
        "model": {"gin_files": ["x.gin"], "parameters": parameters, "config": dataclasses.asdict(config)},
        "setup": {"batch_size": 2, "inputs_length": 16, "targets_length": 8, "devices": 1, "platform": "cpu",
                  "num_microbatches": 1, "optimizer": "adafactor", "device_kind": "cpu", "mesh": {}, "steps": 2},
        "results": {"train_flops_per_step": 1e6, "peak_tflops_per_second": 1.0, "tokens_per_second": 100.0},
    }
    args = benchmark.parse_args(["--gin_file=x.gin", "--against=hf", "--steps=2", "--warmup=1",
                                 "--hf_threads=1", "--peak_matmul_size=64"])
    hf = benchmark.compare_hf(args, report)
    assert hf["parameters"] == parameters and hf["dropout_rate"] == 0.1 and hf["threads"] == 1
    assert len(hf["step_seconds_all"]) == 2 and len(hf["warmup_seconds_all"]) == 1
    assert hf["final_loss"] > 0 and hf["tokens_per_second"] == pytest.approx(2 * 24 / hf["step_seconds_median"])
    assert hf["t5x_lite_over_hf_tokens_per_second"] == pytest.approx(100.0 / hf["tokens_per_second"])
    assert "torch.optim.Adafactor" in hf["optimizer"]
    # A model that differs from the JAX one stops the run (the spec is what compare_hf sent to the process).
    hf_benchmark = load_script("hf_benchmark")
    with pytest.raises(SystemExit, match=f"HF T5 has {parameters:,} parameters but the JAX model has"):
        hf_benchmark.run({**hf["spec"], "expected_parameters": parameters + 1})


def test_bfloat16_peak_counts_the_float32_output_matmul(monkeypatch):
    """Below float32 the peak is the better of the dtype's own matmul and the float32-output one that the model's
    matmuls use (layers.einsum), so that MFU can't pass 100% by comparing against the slower kernel."""
    import jax
    import jax.numpy as jnp

    seen = []
    real_matmul = jnp.matmul
    monkeypatch.setattr(jnp, "matmul", lambda a, b, preferred_element_type=None: (
        seen.append(preferred_element_type), real_matmul(a, b, preferred_element_type=preferred_element_type))[1])
    assert benchmark.measure_peak_flops(jax.devices()[0], jnp.float32, 32, trials=1, min_trial_seconds=0) > 0
    assert set(seen) == {None}
    seen.clear()
    assert benchmark.measure_peak_flops(jax.devices()[0], jnp.bfloat16, 32, trials=1, min_trial_seconds=0) > 0
    assert set(seen) == {None, jnp.float32}
