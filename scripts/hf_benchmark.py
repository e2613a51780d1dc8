"""Times Hugging Face transformers' T5ForConditionalGeneration train step (PyTorch, CPU) on random token rows.

    python scripts/hf_benchmark.py --spec=spec.json --json_out=hf.json

scripts/benchmark.py runs this file in a process of its own when given `--against hf`, so that torch never
shares a process (threads, allocator, peak memory) with JAX, and passes the spec: the transformers T5Config
keyword arguments (`benchmark.hf_t5_kwargs`, built from the same gin model), the batch shape, the step counts
and the JAX model's parameter count, which this model must equal. A step is what the JAX side times: forward
with labels (loss), backward, optimizer step, zero_grad, in train mode (dropout at the config's rate). Only
this file imports torch and transformers (the `bench` extra: pip install -c constraints.txt -e '.[bench]').
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# T5.1.1 and T5X train with Adafactor: a factored second moment and no momentum.
OPTIMIZER_DESCRIPTIONS = {
    "torch": "torch.optim.Adafactor (factored second moment, no momentum, beta2_decay -0.8, update clipping 1.0, "
             "parameter scale, lr min(1e-2, 1/sqrt(step)): T5X's Adafactor defaults)",
    "transformers": "transformers.optimization.Adafactor (factored second moment, no momentum, decay -0.8, "
                    "update clipping 1.0, scale_parameter=False, relative_step=False, warmup_init=False, "
                    "constant lr 1e-3)",
    "adamw": "torch.optim.AdamW (lr 1e-3, weight decay 1e-4, global-norm clipping 1.0: t5x_lite's adamw)",
}


def build_model(hf_kwargs: dict):
    """T5ForConditionalGeneration with the embeddings laid out as the JAX model's: one input embedding shared by
    the encoder and the decoder, and an output layer of its own unless `tie_word_embeddings` (T5 1.0)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(**hf_kwargs)
    # transformers 5's T5Config.__init__ sets tie_word_embeddings = True whatever it is given (it keeps the
    # given value only as `scale_decoder_outputs`); set it again, or the output layer is the input embedding.
    config.tie_word_embeddings = bool(hf_kwargs["tie_word_embeddings"])
    if config.is_gated_act != hf_kwargs["feed_forward_proj"].startswith("gated-"):
        raise ValueError(f"T5Config.is_gated_act={config.is_gated_act} for feed_forward_proj="
                         f"{hf_kwargs['feed_forward_proj']!r}")
    model = T5ForConditionalGeneration(config)
    # With tie_word_embeddings False, transformers 5 unties everything: the encoder's and the decoder's
    # embed_tokens become matrices of their own (two extra vocab x d_model). T5 (and the JAX model) shares one.
    model.set_input_embeddings(model.shared)
    return model


def count_parameters(model) -> int:
    """Distinct parameters (a shared tensor counts once), as the JAX model's parameter tree counts them."""
    return sum(p.numel() for p in model.parameters())


def make_optimizer(name: str, params):
    import torch

    if name == "torch":
        return torch.optim.Adafactor(params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0)
    if name == "transformers":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    raise ValueError(f"optimizer={name!r}; valid: {sorted(OPTIMIZER_DESCRIPTIONS)}")


def random_rows(batch_size, inputs_length, targets_length, vocab_size, seed):
    """The JAX benchmark's rows: the same generator calls, so the same tokens for the same seed."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab_size, (batch_size, inputs_length), dtype=np.int32)
    targets = rng.integers(2, vocab_size, (batch_size, targets_length), dtype=np.int32)
    return inputs.astype(np.int64), targets.astype(np.int64)


def measure_matmul_peak(dtype, n, trials=5, min_trial_seconds=0.2) -> float:
    """Best FLOP/s of torch's [n, n] x [n, n] matmul on the CPU: what torch's own kernels reach on this host."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    start = time.perf_counter()
    torch.matmul(a, b)
    reps = max(1, math.ceil(min_trial_seconds / max(time.perf_counter() - start, 1e-6)))
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started this program: Linux's VmHWM. Not ru_maxrss, which a
    process started by another (fork or vfork, then exec) inherits from it: it would report scripts/benchmark.py's
    JAX peak whenever that is the larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run(spec: dict) -> dict:
    import torch
    import transformers

    threads = int(spec.get("threads") or os.cpu_count())
    torch.set_num_threads(threads)
    torch.manual_seed(spec["seed"])
    start = time.perf_counter()
    model = build_model(spec["hf_kwargs"])
    build_seconds = time.perf_counter() - start
    parameters = count_parameters(model)
    expected = spec.get("expected_parameters")
    if expected is not None and parameters != expected:
        raise SystemExit(
            f"HF T5 has {parameters:,} parameters but the JAX model has {expected:,}: the two models differ "
            f"(config {spec['hf_kwargs']}); not comparing them"
        )
    model.train()
    optimizer = make_optimizer(spec["optimizer"], model.parameters())
    inputs, targets = random_rows(spec["batch_size"], spec["inputs_length"], spec["targets_length"],
                                  spec["hf_kwargs"]["vocab_size"], spec["seed"])
    input_ids, labels = torch.from_numpy(inputs), torch.from_numpy(targets)
    bfloat16 = spec.get("dtype") == "bfloat16"
    # As the JAX side: float32 parameters, activations in bfloat16 when the config says so.
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bfloat16 else contextlib.nullcontext

    def step() -> float:
        with autocast():
            # labels -> decoder inputs [decoder_start_token_id=0, labels[:-1]], the JAX batch's decoder inputs.
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        if spec["optimizer"] == "adamw":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    warmup_seconds = []
    for _ in range(spec["warmup"]):
        start = time.perf_counter()
        step()
        warmup_seconds.append(time.perf_counter() - start)
    step_seconds = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        loss = step()
        step_seconds.append(time.perf_counter() - start)
    matmul_peak = measure_matmul_peak(torch.bfloat16 if bfloat16 else torch.float32, spec["peak_matmul_size"])
    median = statistics.median(step_seconds)
    return {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": threads,
        "parameters": parameters,
        "optimizer": OPTIMIZER_DESCRIPTIONS[spec["optimizer"]],
        "dtype": "bfloat16 (torch.autocast)" if bfloat16 else "float32",
        "dropout_rate": spec["hf_kwargs"]["dropout_rate"],
        "attention_implementation": getattr(model.config, "_attn_implementation", None),
        "build_seconds": build_seconds,
        "warmup_seconds_all": warmup_seconds,
        "step_seconds_median": median,
        "step_seconds_min": min(step_seconds),
        "step_seconds_all": step_seconds,
        "final_loss": loss,
        "torch_matmul_peak_tflops_per_second": matmul_peak / 1e12,
        "torch_matmul_peak_source": f"{spec['peak_matmul_size']}^3 {'bfloat16' if bfloat16 else 'float32'} "
                                    f"torch.matmul, {threads} threads",
        "peak_host_memory_bytes": peak_rss_bytes(),
        "host_memory_kept": bool(spec.get("keep_freed_host_memory")),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON file written by scripts/benchmark.py --against hf")
    parser.add_argument("--json_out", required=True, help="write the results here as JSON")
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    if spec.get("keep_freed_host_memory"):
        # As the JAX process did, so that the two compare as frameworks, not as malloc settings; before torch
        # starts its threads.
        from t5x_lite import host_memory

        spec["keep_freed_host_memory"] = host_memory.keep_freed_memory()
    results = run(spec)
    with open(args.json_out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
