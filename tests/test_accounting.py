"""FLOPs accounting: our closed-form count == the matmuls XLA compiles for the real model, and MFU.

Three independent counts of the same programs:
  - XLA's optimised HLO of the jitted forward (`models.EncoderDecoderModel.logits`) and of the real
    `Trainer` train step, whose `dot` instructions we sum at 2*m*n*k: equal to ours exactly;
  - XLA's `cost_analysis()['flops']`, which also counts elementwise work: ours is below it by a measured
    margin (0.60% of the forward, 2.4% of the Adafactor train step for MATMUL_HEAVY, jax 0.10.2 on CPU);
  - the jaxpr's `dot_general` equations, also through `nn.scan` (XLA's cost analysis counts a while loop's
    body once, so the scanned model is checked here).
"""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jax_core

from t5x_lite import accounting, models, network, optimizers, partitioning, trainer
from tests.helpers import random_batch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Matmuls dominate (head_dim 64, as in T5), so elementwise work is a small share of XLA's total.
MATMUL_HEAVY = network.T5Config(
    vocab_size=1024, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=512, num_encoder_layers=2, num_decoder_layers=2
)
# Every dimension different, so a swapped dimension in the formula changes the count.
LOPSIDED = network.T5Config(
    vocab_size=96, emb_dim=24, num_heads=3, head_dim=5, mlp_dim=40, num_encoder_layers=3, num_decoder_layers=2
)

# Measured: 0.60% (forward) and 2.4% (train step) above ours; the margin leaves room for XLA versions.
FORWARD_COST_ANALYSIS_MARGIN = 0.01
TRAIN_STEP_COST_ANALYSIS_MARGIN = 0.03


# ---- independent counters ---------------------------------------------------------------------------------

_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")


def hlo_dot_flops(hlo_text: str) -> int:
    """2 * (output elements) * (contracted size) summed over the `dot` instructions of an HLO module."""
    shapes, dots = {}, []
    for line in hlo_text.splitlines():
        match = _HLO_INSTRUCTION.match(line)
        if not match:
            continue
        name, dims, opcode, rest = match.groups()
        shapes[name] = tuple(int(d) for d in dims.split(",") if d)
        if opcode == "dot":
            dots.append((shapes[name], rest))
    assert dots, "no dot instructions found: has XLA's HLO text format changed?"
    total = 0
    for output_shape, rest in dots:
        lhs = re.match(r"\s*%?([\w.\-]+)", rest).group(1)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
        contracted = math.prod(shapes[lhs][int(d)] for d in contracting.split(",") if d)
        total += 2 * math.prod(output_shape) * contracted
    return total


def _subjaxprs(values):
    for value in values:
        if isinstance(value, jax_core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jax_core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _subjaxprs(value)


def jaxpr_dot_flops(jaxpr) -> int:
    """The same count over a jaxpr's `dot_general` equations; a scan's body counts `length` times."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contracting)
        repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        total += sum(repeats * jaxpr_dot_flops(sub) for sub in _subjaxprs(eqn.params.values()))
    return total


def _model_and_inputs(config, batch_size, inputs_length, targets_length):
    model = models.EncoderDecoderModel(config)
    abstract_params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0))))
    batch = random_batch(batch_size, inputs_length, targets_length, config.vocab_size)
    return model, abstract_params, {k: jnp.asarray(v) for k, v in batch.items()}


# ---- tests --------------------------------------------------------------------------------------------------

def test_hand_computed_tiny_config():
    config = network.T5Config(
        vocab_size=10, emb_dim=4, num_heads=2, head_dim=3, mlp_dim=5, num_encoder_layers=1, num_decoder_layers=1
    )
    # batch 2, inputs 7, targets 3; heads x head_dim = 6.
    encoder = (
        4 * 2 * 2 * 7 * 4 * 6  # q, k, v, o: 2688
        + 2 * 2 * 2 * 2 * 7 * 7 * 3  # QK^T and weights x V: 2352
        + 3 * 2 * 2 * 7 * 4 * 5  # wi_0, wi_1, wo: 1680
    )
    decoder = (
        4 * 2 * 2 * 3 * 4 * 6  # self-attention q, k, v, o: 1152
        + 2 * 2 * 2 * 2 * 3 * 3 * 3  # self-attention scores and values: 432
        + 2 * 2 * 2 * 3 * 4 * 6  # cross-attention q, o on the targets: 576
        + 2 * 2 * 2 * 7 * 4 * 6  # cross-attention k, v on the encoder outputs: 1344
        + 2 * 2 * 2 * 2 * 3 * 7 * 3  # cross-attention scores and values [3 x 7]: 1008
        + 3 * 2 * 2 * 3 * 4 * 5  # MLP: 720
    )
    logits = 2 * 2 * 3 * 4 * 10  # 480
    assert (encoder, decoder, logits) == (6720, 5232, 480)

    flops = accounting.forward_flops(config, 2, 7, 3)
    assert (flops["encoder"], flops["decoder"], flops["logits"], flops["total"]) == (6720, 5232, 480, 12432)
    assert flops["attention_projections"] + flops["attention_scores"] + flops["mlp"] + flops["logits"] == 12432
    assert flops["attention_scores"] == 2352 + 432 + 1008
    assert accounting.train_flops_per_step(config, 2, 7, 3) == 3 * 12432 == 37296


@pytest.mark.parametrize("config", [
    MATMUL_HEAVY,
    dataclasses.replace(LOPSIDED, logits_via_embedding=True),
    dataclasses.replace(LOPSIDED, mlp_activations=("relu",), logits_via_embedding=True),  # T5 1.0: one wi
], ids=["matmul_heavy", "lopsided_tied", "lopsided_t5_1_0"])
def test_forward_equals_the_dots_xla_compiles(config):
    batch_size, inputs_length, targets_length = 4, 64, 24
    model, params, batch = _model_and_inputs(config, batch_size, inputs_length, targets_length)
    compiled = jax.jit(model.logits).lower(params, batch).compile()
    ours = accounting.forward_flops(config, batch_size, inputs_length, targets_length)["total"]
    assert hlo_dot_flops(compiled.as_text()) == ours

    # XLA's own total also counts elementwise work (norms, softmax, GELU): ours is a little below it.
    xla_flops = compiled.cost_analysis()["flops"]
    assert ours <= xla_flops
    if config is MATMUL_HEAVY:
        assert (xla_flops - ours) / xla_flops < FORWARD_COST_ANALYSIS_MARGIN


def test_train_step_equals_the_dots_xla_compiles():
    """The real jitted train step (forward, backward, Adafactor) on one device holds 3x the forward's matmuls."""
    batch_size, inputs_length, targets_length = 4, 64, 32
    model, _, batch = _model_and_inputs(MATMUL_HEAVY, batch_size, inputs_length, targets_length)
    partitioner = partitioning.Partitioner((1, 1), devices=jax.devices()[:1])
    train = trainer.Trainer(model, partitioner, optimizers.adafactor)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioner.batch_sharding) for k, v in batch.items()
    }
    compiled = train.lower_train_step(abstract_batch).compile()
    ours = accounting.train_flops_per_step(MATMUL_HEAVY, batch_size, inputs_length, targets_length)
    assert hlo_dot_flops(compiled.as_text()) == ours

    xla_flops = compiled.cost_analysis()["flops"]
    assert ours <= xla_flops
    assert (xla_flops - ours) / xla_flops < TRAIN_STEP_COST_ANALYSIS_MARGIN


@pytest.mark.parametrize("scan_layers", [False, True])
def test_jaxpr_dots_forward_and_gradient(scan_layers):
    config = dataclasses.replace(LOPSIDED, scan_layers=scan_layers)
    batch_size, inputs_length, targets_length = 2, 12, 7
    model, params, batch = _model_and_inputs(config, batch_size, inputs_length, targets_length)
    forward = accounting.forward_flops(config, batch_size, inputs_length, targets_length)["total"]
    assert jaxpr_dot_flops(jax.make_jaxpr(model.logits)(params, batch).jaxpr) == forward

    def loss(p, b):
        return model.loss_sums(p, b)["loss"]

    gradient_jaxpr = jax.make_jaxpr(jax.grad(loss))(params, batch).jaxpr
    # The attention's backward pass recomputes QK^T (half the score matmuls): hardware FLOPs that the model FLOPs
    # leave out, as they leave out rematerialisation. (Unchunked, as at these sizes, XLA merges the recomputed
    # QK^T with the forward pass's: the compiled step above holds 3x the forward's matmuls exactly.)
    recomputed = accounting.forward_flops(config, batch_size, inputs_length, targets_length)["attention_scores"] // 2
    assert jaxpr_dot_flops(gradient_jaxpr) == accounting.train_flops_per_step(
        config, batch_size, inputs_length, targets_length
    ) + recomputed


def test_breakdowns_add_up_and_scale():
    config = network.T5Config()  # T5.1.1 small's shapes
    flops = accounting.forward_flops(config, 8, 512, 114)
    assert flops["encoder"] + flops["decoder"] + flops["logits"] == flops["total"]
    assert flops["attention_projections"] + flops["attention_scores"] + flops["mlp"] + flops["logits"] == flops["total"]
    # Linear in the batch size.
    assert accounting.forward_flops(config, 16, 512, 114)["total"] == 2 * flops["total"]
    assert isinstance(accounting.train_flops_per_step(config, 8, 512, 114), int)


def test_mfu():
    assert accounting.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step_seconds"):
        accounting.mfu(1e12, 0.0, 4e12)
    with pytest.raises(ValueError, match="peak_flops_per_second"):
        accounting.mfu(1e12, 1.0, 0)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="inputs_length=0"):
        accounting.forward_flops(network.T5Config(), 8, 0, 114)


def test_benchmark_script_runs_without_tensorflow(tmp_path):
    """scripts/benchmark.py end to end on tiny (sharded over 4 x 2 simulated devices, 2 microbatches, bf16),
    in a fresh interpreter that must not import tensorflow or seqio."""
    json_out = tmp_path / "bench.json"
    argv = [
        "benchmark.py", "--gin_file=gin/models/t5_1_1/tiny.gin", "--batch_size=8", "--inputs_length=16",
        "--targets_length=8", "--steps=2", "--warmup=0", "--mesh_shape=4,2", "--num_microbatches=2",
        "--dtype=bfloat16", "--peak_tflops=1", f"--json_out={json_out}",
    ]
    code = (
        f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path('scripts/benchmark.py', run_name='__main__'); "
        "heavy = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MFU" in result.stdout
    report = json.loads(json_out.read_text())
    config = network.T5Config(**report["model"]["config"])
    assert config.dtype == "bfloat16" and report["setup"]["mesh"] == {"data": 4, "model": 2}
    results = report["results"]
    assert results["train_flops_per_step"] == accounting.train_flops_per_step(config, 8, 16, 8)
    assert len(results["step_seconds_all"]) == 2 and results["peak_tflops_per_second"] == 8.0
    assert math.isfinite(results["final_loss"]) and results["tokens_per_second"] > 0


# ---- energy and emissions -----------------------------------------------------------------------------------

# Patterson et al. 2021 (Table 4), from their inputs. Their days are rounded (20 and 14.8), so their energy is
# within 0.5% of what the rounded inputs give: T5 85.3 vs 85.7 MWh, GPT-3 1,289 vs 1,287 MWh.
PATTERSON_ROUNDING = 5e-3


@pytest.mark.parametrize("chips, days, watts, pue, grid, mwh, tonnes", [
    (512, 20, 310, 1.12, 0.545, 85.7, 46.7),  # T5-11B on TPU v3
    (10_000, 14.8, 330, 1.10, 0.429, 1_287, 552.1),  # GPT-3 on V100
], ids=["t5_11b", "gpt3"])
def test_energy_and_co2e_reproduce_pattersons_rows(chips, days, watts, pue, grid, mwh, tonnes):
    kwh = accounting.energy_kwh(chips * days * 86400, watts, pue)
    assert kwh / 1000 == pytest.approx(mwh, rel=PATTERSON_ROUNDING)
    assert accounting.co2e_kg(kwh, grid) / 1000 == pytest.approx(tonnes, rel=PATTERSON_ROUNDING)


def test_chip_days_of_t5_11b():
    """T5-11B: 4.05e22 FLOPs at 45.6 TFLOP/s per chip is 10,280 chip-days, 20.1 days on 512 chips (the paper: 20)."""
    days = accounting.chip_days(4.05e22, 45.6e12)
    assert days == pytest.approx(10_280, rel=1e-3)
    assert days / 512 == pytest.approx(20.08, rel=1e-3)


def test_energy_arguments_are_checked():
    with pytest.raises(ValueError, match="watts_per_device=-1"):
        accounting.energy_kwh(10, -1)
    with pytest.raises(ValueError, match="flops_per_second_per_chip=0"):
        accounting.chip_days(1e20, 0)
    with pytest.raises(ValueError, match="platform 'npu'"):
        accounting.EnergyMeter("npu", 1)


def write_rapl(root, zone, energy_uj, max_range_uj=1_000_000_000):
    path = root / zone
    path.mkdir(parents=True, exist_ok=True)
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")


def test_energy_meter_reads_rapl_packages_across_a_wrap(tmp_path):
    """Two packages' counters (their subzones, e.g. intel-rapl:0:0, are parts of them and not added): one goes
    up by 30 J, the other wraps around its range and goes up by 20 J in all; x PUE 1.5."""
    write_rapl(tmp_path, "intel-rapl:0", 100_000_000)
    write_rapl(tmp_path, "intel-rapl:1", 990_000_000)
    write_rapl(tmp_path, "intel-rapl:0:0", 5)
    meter = accounting.EnergyMeter("cpu", 2, pue=1.5, grid_kg_co2e_per_kwh=0.5, rapl_root=str(tmp_path))
    assert meter.source == "measured: RAPL"
    write_rapl(tmp_path, "intel-rapl:0", 115_000_000)
    write_rapl(tmp_path, "intel-rapl:1", 995_000_000)
    meter.sample()
    write_rapl(tmp_path, "intel-rapl:0", 130_000_000)
    write_rapl(tmp_path, "intel-rapl:1", 10_000_000)  # wrapped: 5 J to the top of the range, then 10 J
    write_rapl(tmp_path, "intel-rapl:0:0", 10**9)
    summary = meter.summary()
    assert summary["energy_kwh"] == pytest.approx(50 * 1.5 / 3.6e6)
    assert summary["co2e_kg"] == pytest.approx(summary["energy_kwh"] * 0.5)
    assert summary["power"] == "measured: RAPL"


def test_energy_meter_estimates_without_counters(tmp_path):
    meter = accounting.EnergyMeter("cpu", 2, rapl_root=str(tmp_path / "absent"))
    assert meter.source == "estimated: 8 W per device"
    meter.start -= 3600  # an hour ago
    summary = meter.summary()
    assert summary["device_seconds"] == pytest.approx(7200, rel=1e-3)
    assert summary["energy_kwh"] == pytest.approx(2 * 8 * accounting.DEFAULT_PUE / 1000, rel=1e-3)
    gpu = accounting.EnergyMeter("gpu", 8, watts_per_device=700)
    assert gpu.source == "estimated: 700 W per device"
