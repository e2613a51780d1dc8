"""Times the jitted train step of a gin-configured model on synthetic batches, and reports its throughput and MFU.

    python scripts/benchmark.py --gin_file=gin/models/t5_1_1/small.gin \
        --batch_size=8 --inputs_length=512 --targets_length=114 --steps=5 --warmup=1 --json_out=small.json

Batches are random unpacked token rows (ids in [2, vocab), no padding), so no tensorflow or seqio is imported:
this runs on a machine with only jax, flax, optax and gin. Compile time is lower + compile of the train step,
measured apart from the steps; each timed step waits for its result (`jax.block_until_ready`). MFU is the
model's FLOPs (t5x_lite.accounting: matmuls only, training = 3 x forward) per second over a peak that is either
given (--peak_tflops, per device) or measured in the same run: the best rate of a jitted square matmul in the
model's activation dtype, on the first device, times the number of devices in the mesh.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from t5x_lite import accounting, optimizers, partitioning, trainer  # noqa: E402

OPTIMIZERS = {"adafactor": optimizers.adafactor, "adamw": optimizers.adamw}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", required=True, help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--mesh_shape", default=None, help="data,model sizes, e.g. 4,2 (default: all devices data-parallel)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s of one device (default: measured)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adafactor")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="activation dtype override")
    parser.add_argument("--num_microbatches", type=int, default=1)
    parser.add_argument("--peak_matmul_size", type=int, default=2048, help="n of the n x n x n peak matmul")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json_out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    for name in ("batch_size", "inputs_length", "targets_length", "steps", "num_microbatches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}={getattr(args, name)}; valid: >= 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup={args.warmup}; valid: >= 0")
    return args


def build_model(gin_files, gin_bindings, dtype):
    gin.add_config_file_search_path(os.path.join(REPO_ROOT, "gin"))
    bindings = list(gin_bindings) + ([f"network.T5Config.dtype = '{dtype}'"] if dtype else [])
    gin.parse_config_files_and_bindings(gin_files, bindings)
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    if dtype and model.config.dtype != dtype:
        raise ValueError(f"--dtype={dtype} did not reach the model (its config has dtype={model.config.dtype!r})")
    return model


def synthetic_batch(batch_size, inputs_length, targets_length, vocab_size, sharding, seed):
    """Unpacked, unpadded rows of random tokens in [2, vocab) placed with the partitioner's batch sharding."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab_size, (batch_size, inputs_length), dtype=np.int32)
    targets = rng.integers(2, vocab_size, (batch_size, targets_length), dtype=np.int32)
    decoder_inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
    batch = {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones(targets.shape, np.float32),
    }
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def measure_peak_flops(device, dtype, n, trials=5, min_trial_seconds=0.2) -> float:
    """Best FLOP/s of a jitted [n, n] x [n, n] matmul on `device` (2n^3 FLOPs each), in `dtype`.

    Matmuls are queued back to back and waited for once per trial, so dispatch overhead is amortised."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.device_put(jax.random.normal(k, (n, n), dtype), device) for k in keys)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    reps = max(1, math.ceil(min_trial_seconds / max(time.perf_counter() - start, 1e-6)))
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        outs = [matmul(a, b) for _ in range(reps)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best


def device_peak_memory(devices) -> int | None:
    """Largest peak bytes in use over the devices, where the backend reports it (GPU/TPU; not CPU)."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # Backends without memory stats raise or return None.
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def run(args) -> dict:
    model = build_model(args.gin_file, args.gin_bindings, args.dtype)
    config = model.config
    mesh_shape = tuple(int(s) for s in args.mesh_shape.split(",")) if args.mesh_shape else None
    partitioner = partitioning.Partitioner(mesh_shape)
    devices = list(partitioner.mesh.devices.flat)
    train = trainer.Trainer(
        model, partitioner, OPTIMIZERS[args.optimizer], num_microbatches=args.num_microbatches, seed=args.seed
    )
    if args.batch_size % (partitioner.mesh.shape["data"] * args.num_microbatches):
        raise ValueError(
            f"--batch_size={args.batch_size} must divide into data={partitioner.mesh.shape['data']} shards "
            f"x num_microbatches={args.num_microbatches}"
        )

    start = time.perf_counter()
    state = train.init_state()
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - start

    batch = synthetic_batch(
        args.batch_size, args.inputs_length, args.targets_length, config.vocab_size, partitioner.batch_sharding, args.seed
    )
    rng = train.dropout_rng
    start = time.perf_counter()
    lowered = train.lower_train_step(batch)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    step = lowered.compile()
    compile_seconds = time.perf_counter() - start

    # Measured on both sides of the timed steps (best of all trials), so that a burst of load from other
    # processes on a shared host lowers neither the peak nor, through it, inflates MFU.
    measure_peak = lambda: measure_peak_flops(devices[0], config.activation_dtype, args.peak_matmul_size)
    measured_peaks = [] if args.peak_tflops else [measure_peak()]

    for _ in range(args.warmup):
        state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
    step_seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        step_seconds.append(time.perf_counter() - start)
    final_loss = float(metrics["loss"])

    if args.peak_tflops:
        peak_per_device, peak_source = args.peak_tflops * 1e12, "--peak_tflops"
    else:
        measured_peaks.append(measure_peak())
        peak_per_device = max(measured_peaks)
        peak_source = (
            f"measured: {args.peak_matmul_size}^3 {config.activation_dtype.name} matmul on {devices[0]}"
            + (f" x {len(devices)} devices" if len(devices) > 1 else "")
        )
    peak_total = peak_per_device * len(devices)

    median, best = statistics.median(step_seconds), min(step_seconds)
    flops = accounting.train_flops_per_step(config, args.batch_size, args.inputs_length, args.targets_length)
    tokens = args.batch_size * (args.inputs_length + args.targets_length)
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(train.abstract_params))
    return {
        "model": {
            "gin_files": args.gin_file,
            "gin_bindings": args.gin_bindings,
            "parameters": parameters,
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        },
        "setup": {
            "batch_size": args.batch_size,
            "inputs_length": args.inputs_length,
            "targets_length": args.targets_length,
            "optimizer": args.optimizer,
            "num_microbatches": args.num_microbatches,
            "mesh": dict(partitioner.mesh.shape),
            "devices": len(devices),
            "device_kind": devices[0].device_kind,
            "platform": devices[0].platform,
            "jax_version": jax.__version__,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "results": {
            "init_seconds": init_seconds,
            "lower_seconds": lower_seconds,
            "compile_seconds": compile_seconds,
            "step_seconds_median": median,
            "step_seconds_min": best,
            "step_seconds_all": step_seconds,
            "seqs_per_second": args.batch_size / median,
            "tokens_per_second": tokens / median,
            "target_tokens_per_second": args.batch_size * args.targets_length / median,
            "train_flops_per_step": flops,
            "achieved_tflops_per_second": flops / median / 1e12,
            "peak_tflops_per_second": peak_total / 1e12,
            "peak_source": peak_source,
            "mfu": accounting.mfu(flops, median, peak_total),
            "mfu_best_step": accounting.mfu(flops, best, peak_total),
            "final_loss": final_loss,
            # Linux reports ru_maxrss in KiB.
            "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_memory_bytes": device_peak_memory(devices),
        },
    }


def _gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_table(report: dict) -> str:
    setup, r = report["setup"], report["results"]
    rows = [
        ("model", f"{', '.join(report['model']['gin_files'])} ({report['model']['parameters']:,} parameters, "
                  f"{report['model']['config']['dtype']})"),
        ("batch", f"{setup['batch_size']} x ({setup['inputs_length']} inputs + {setup['targets_length']} targets), "
                  f"{setup['num_microbatches']} microbatch(es), {setup['optimizer']}"),
        ("devices", f"{setup['devices']} x {setup['device_kind']} ({setup['platform']}), mesh {setup['mesh']}"),
        ("init (incl. compile)", f"{r['init_seconds']:.2f} s"),
        ("compile (lower + compile)", f"{r['lower_seconds'] + r['compile_seconds']:.2f} s "
                                      f"({r['lower_seconds']:.2f} + {r['compile_seconds']:.2f})"),
        ("step time median / min", f"{r['step_seconds_median'] * 1e3:.1f} / {r['step_seconds_min'] * 1e3:.1f} ms "
                                   f"over {setup['steps']} steps"),
        ("sequences / s", f"{r['seqs_per_second']:,.2f}"),
        ("tokens / s (inputs + targets)", f"{r['tokens_per_second']:,.0f}"),
        ("target tokens / s", f"{r['target_tokens_per_second']:,.0f}"),
        ("train FLOPs / step", f"{r['train_flops_per_step'] / 1e9:,.1f} GFLOP"),
        ("achieved", f"{r['achieved_tflops_per_second']:.3f} TFLOP/s"),
        ("peak", f"{r['peak_tflops_per_second']:.3f} TFLOP/s ({r['peak_source']})"),
        ("MFU median / best step", f"{100 * r['mfu']:.1f}% / {100 * r['mfu_best_step']:.1f}%"),
        ("final loss", f"{r['final_loss']:.4f}"),
        ("peak host memory (maxrss)", _gib(r["peak_host_memory_bytes"])),
        ("peak device memory", _gib(r["peak_device_memory_bytes"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


if __name__ == "__main__":
    main()
