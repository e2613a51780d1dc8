"""Times the jitted train step of a gin-configured model on synthetic batches, and reports its throughput and MFU.

    python scripts/benchmark.py --gin_file=gin/models/t5_1_1/small.gin \
        --batch_size=8 --inputs_length=512 --targets_length=114 --steps=5 --warmup=1 --json_out=small.json

Batches are random unpacked token rows (ids in [2, vocab), no padding), so no tensorflow or seqio is imported:
this runs on a machine with only jax, flax, optax and gin. Compile time is lower + compile of the train step,
measured apart from the steps; each timed step waits for its result (`jax.block_until_ready`). MFU is the
model's FLOPs (t5x_lite.accounting: matmuls only, training = 3 x forward) per second over a peak that is either
given (--peak_tflops, per device) or measured in the same run: the best rate of a jitted square matmul in the
model's activation dtype (below float32, the better of its own and float32 output), on the first device, times
the number of devices in the mesh.

`--against hf` also times Hugging Face transformers' T5ForConditionalGeneration (PyTorch, CPU) built from the same
gin config, on the same shapes, in a process of its own (scripts/hf_benchmark.py; it needs the `bench` extra:
pip install -c constraints.txt -e '.[bench]'), and reports t5x_lite's tokens/s over HF's. `--data_throughput` also
times the input pipeline (scripts/data_throughput.py, in a process of its own: tensorflow and seqio stay out of this
one) against the rows per second the train step consumes. Neither is imported unless asked for.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from t5x_lite import accounting, host_memory, network, optimizers, partitioning, trainer  # noqa: E402
from t5x_lite.formats import huggingface  # noqa: E402

OPTIMIZERS = {"adafactor": optimizers.adafactor, "adamw": optimizers.adamw}
# The HF side's optimizer for each JAX one (scripts/hf_benchmark.py describes them); Adafactor has two choices.
HF_OPTIMIZERS = {"adafactor": ("torch", "transformers"), "adamw": ("adamw",)}
HF_PACKAGES = ("torch", "transformers")


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
    parser.add_argument("--keep_freed_host_memory", action=argparse.BooleanOptionalAction, default=True,
                        help="on the CPU, keep the memory XLA frees for the next step, as the entry points do "
                             "(t5x_lite/host_memory.py); with --against hf, HF's process does the same")
    parser.add_argument("--against", choices=("hf",), default=None,
                        help="hf: also time transformers' T5ForConditionalGeneration (PyTorch, CPU) on the same shapes")
    parser.add_argument("--hf_optimizer", default=None,
                        help="with --against hf: torch (torch.optim.Adafactor, the default) or transformers "
                             "(transformers' Adafactor) for --optimizer=adafactor; adamw for --optimizer=adamw")
    parser.add_argument("--hf_threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    parser.add_argument("--data_throughput", action="store_true",
                        help="also time the input pipeline (scripts/data_throughput.py) against the train step")
    parser.add_argument("--data_task", default="local_corpus_span_corruption", help="with --data_throughput")
    parser.add_argument("--data_examples", type=int, default=2000, help="with --data_throughput: timed examples")
    parser.add_argument("--data_batches", type=int, default=200, help="with --data_throughput: timed batches")
    parser.add_argument("--data_warmup", type=int, default=500, help="with --data_throughput: untimed examples")
    args = parser.parse_args(argv)
    for name in ("batch_size", "inputs_length", "targets_length", "steps", "num_microbatches", "data_examples",
                 "data_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}={getattr(args, name)}; valid: >= 1")
    for name in ("warmup", "data_warmup"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name}={getattr(args, name)}; valid: >= 0")
    if args.against == "hf":
        valid = HF_OPTIMIZERS[args.optimizer]
        args.hf_optimizer = args.hf_optimizer or valid[0]
        if args.hf_optimizer not in valid:
            raise SystemExit(f"--hf_optimizer={args.hf_optimizer} with --optimizer={args.optimizer}; valid: "
                             f"{', '.join(valid)}")
        if args.hf_threads is not None and args.hf_threads < 1:
            raise SystemExit(f"--hf_threads={args.hf_threads}; valid: >= 1")
        # Checked before anything is compiled, without importing them.
        missing = [name for name in HF_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise SystemExit(f"--against hf needs {' and '.join(missing)} (not installed): "
                             "pip install -c constraints.txt -e '.[bench]'")
    elif args.hf_optimizer is not None or args.hf_threads is not None:
        raise SystemExit("--hf_optimizer and --hf_threads go with --against hf")
    return args


def build_model(gin_files, gin_bindings, dtype):
    gin.add_config_file_search_path(os.path.join(REPO_ROOT, "gin"))
    bindings = list(gin_bindings) + ([f"network.T5Config.dtype = '{dtype}'"] if dtype else [])
    gin.parse_config_files_and_bindings(gin_files, bindings)
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    if dtype and model.config.dtype != dtype:
        raise ValueError(f"--dtype={dtype} did not reach the model (its config has dtype={model.config.dtype!r})")
    return model


def hf_t5_kwargs(config) -> dict:
    """transformers.T5Config keyword arguments for the network of `config` (a t5x_lite network.T5Config): its
    `config.json` fields (`formats.huggingface.hf_config_from_t5`), without the decoding cache.
    scripts/hf_benchmark.build_model makes the model."""
    return {**huggingface.hf_config_from_t5(config), "use_cache": False}


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

    Below float32 it is the better of a matmul that writes `dtype` and one that accumulates and writes float32
    (the model's matmuls do the latter, layers.einsum; on a CPU with AVX512_BF16 it is about twice as fast).
    Matmuls are queued back to back and waited for once per trial, so dispatch overhead is amortised."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.device_put(jax.random.normal(k, (n, n), dtype), device) for k in keys)
    output_types = [None] if jnp.dtype(dtype) == jnp.float32 else [None, jnp.float32]
    best = math.inf
    for output_type in output_types:
        matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=output_type))
        matmul(a, b).block_until_ready()
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        reps = max(1, math.ceil(min_trial_seconds / max(time.perf_counter() - start, 1e-6)))
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


def run(args, host_memory_kept: bool = False) -> dict:
    """Times the train step; `host_memory_kept` (recorded in the report) says whether main() set malloc to keep
    freed memory before JAX started."""
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
            f"measured: {args.peak_matmul_size}^3 {config.activation_dtype.name} matmul"
            + ("" if config.activation_dtype == jnp.float32 else " (best of its own and float32 output)")
            + f" on {devices[0]}"
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
            "host_memory_kept": host_memory_kept,
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


def _run_script(script, script_args, json_out):
    """Runs scripts/<script> in a fresh interpreter (its output goes to ours) and returns (exit status, its JSON)."""
    command = [sys.executable, os.path.join(REPO_ROOT, "scripts", script), *script_args, f"--json_out={json_out}"]
    sys.stdout.flush()
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ}  # tensorflow's start-up chatter, unless asked for
    status = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=sys.stderr).returncode
    if status or not os.path.exists(json_out):
        return status or 1, None
    with open(json_out) as f:
        return 0, json.load(f)


def compare_hf(args, report: dict) -> dict:
    """Times transformers' T5ForConditionalGeneration on the JAX run's shapes (scripts/hf_benchmark.py, a process
    of its own) and returns report["hf"]: its step times, tokens/s, MFU and t5x_lite's tokens/s over HF's."""
    config = network.T5Config(**report["model"]["config"])
    setup, results = report["setup"], report["results"]
    spec = {
        "hf_kwargs": hf_t5_kwargs(config),
        "batch_size": setup["batch_size"],
        "inputs_length": setup["inputs_length"],
        "targets_length": setup["targets_length"],
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "optimizer": args.hf_optimizer,
        "dtype": config.dtype,
        "threads": args.hf_threads or os.cpu_count(),
        "expected_parameters": report["model"]["parameters"],
        "peak_matmul_size": args.peak_matmul_size,
        "keep_freed_host_memory": setup.get("host_memory_kept", False),
    }
    print(f"timing transformers' T5ForConditionalGeneration in its own process ({spec['threads']} threads) ...",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        status, hf = _run_script("hf_benchmark.py", [f"--spec={os.path.join(tmp, 'spec.json')}"],
                                 os.path.join(tmp, "hf.json"))
    if status:
        raise SystemExit(f"scripts/hf_benchmark.py failed (exit status {status}): see its output above")
    if hf["parameters"] != report["model"]["parameters"]:
        raise SystemExit(f"HF T5 has {hf['parameters']:,} parameters, the JAX model {report['model']['parameters']:,}")
    median, best = hf["step_seconds_median"], hf["step_seconds_min"]
    flops = results["train_flops_per_step"]
    tokens = setup["batch_size"] * (setup["inputs_length"] + setup["targets_length"])
    # HF runs on this host's CPU: its MFU is against the JAX side's measured peak only when that is this CPU too
    # (one simulated CPU device uses all the host's cores, so the per-device figure is the host's).
    cpu_peak = (results["peak_tflops_per_second"] * 1e12 / setup["devices"]) if setup["platform"] == "cpu" else None
    torch_peak = hf["torch_matmul_peak_tflops_per_second"] * 1e12
    hf.update({
        "spec": spec,
        "seqs_per_second": setup["batch_size"] / median,
        "tokens_per_second": tokens / median,
        "target_tokens_per_second": setup["batch_size"] * setup["targets_length"] / median,
        "train_flops_per_step": flops,
        "achieved_tflops_per_second": flops / median / 1e12,
        "peak_tflops_per_second": None if cpu_peak is None else cpu_peak / 1e12,
        "mfu": None if cpu_peak is None else accounting.mfu(flops, median, cpu_peak),
        "mfu_best_step": None if cpu_peak is None else accounting.mfu(flops, best, cpu_peak),
        "mfu_vs_torch_matmul_peak": accounting.mfu(flops, median, torch_peak),
        "t5x_lite_over_hf_tokens_per_second": results["tokens_per_second"] / (tokens / median),
    })
    return hf


def compare_data_pipeline(args, report: dict) -> dict:
    """Times the input pipeline (scripts/data_throughput.py, a process of its own, so that tensorflow and seqio stay
    out of this one) at the run's lengths and batch size, and returns report["data_pipeline"]: packed rows per
    second against the rows per second the train step consumes. {"skipped": why} without the local data."""
    setup = report["setup"]
    script_args = [
        f"--task={args.data_task}", f"--inputs_length={setup['inputs_length']}",
        f"--targets_length={setup['targets_length']}", f"--batch_size={setup['batch_size']}",
        f"--examples={args.data_examples}", f"--batches={args.data_batches}", f"--warmup={args.data_warmup}",
        "--skip_without_local_data",
    ]
    print(f"timing the input pipeline ({args.data_task}) in its own process ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        status, pipeline = _run_script("data_throughput.py", script_args, os.path.join(tmp, "data.json"))
    if status:
        raise SystemExit(f"scripts/data_throughput.py failed (exit status {status}): see its output above")
    if "skipped" in pipeline:
        return pipeline
    model_rows = report["results"]["seqs_per_second"]
    return {**pipeline, "model_rows_per_second": model_rows,
            "pipeline_over_model": pipeline["packed_rows_per_second"] / model_rows}


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
        ("freed host memory", "kept for the next step (t5x_lite.host_memory)" if setup.get("host_memory_kept")
                              else "given back to the kernel (malloc's defaults)"),
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
    hf = report.get("hf")
    if hf:
        peak = ("n/a (the JAX side is not on this CPU)" if hf["mfu"] is None
                else f"{100 * hf['mfu']:.1f}% / {100 * hf['mfu_best_step']:.1f}% (against the peak above)")
        rows += [
            ("HF transformers", f"T5ForConditionalGeneration, torch {hf['torch_version']} (CPU, {hf['threads']} "
                                f"threads), transformers {hf['transformers_version']}, its own process"),
            ("HF parameters", f"{hf['parameters']:,} (= the JAX model's)"),
            ("HF setup", f"train mode, dropout {hf['dropout_rate']}, {hf['dtype']}, "
                         f"attention {hf['attention_implementation']}"),
            ("HF optimizer", hf["optimizer"]),
            ("HF freed host memory", "kept for the next step, as the JAX side's" if hf.get("host_memory_kept")
                                     else "given back to the kernel (malloc's defaults)"),
            ("HF warmup steps", ", ".join(f"{s:.2f} s" for s in hf["warmup_seconds_all"]) or "none"),
            ("HF step time median / min", f"{hf['step_seconds_median'] * 1e3:.1f} / {hf['step_seconds_min'] * 1e3:.1f}"
                                          f" ms over {len(hf['step_seconds_all'])} steps"),
            ("HF sequences / s", f"{hf['seqs_per_second']:,.2f}"),
            ("HF tokens / s (inputs + targets)", f"{hf['tokens_per_second']:,.0f}"),
            ("HF achieved", f"{hf['achieved_tflops_per_second']:.3f} TFLOP/s"),
            ("HF MFU median / best step", peak),
            ("HF MFU vs torch's matmul peak", f"{100 * hf['mfu_vs_torch_matmul_peak']:.1f}% (peak "
                                              f"{hf['torch_matmul_peak_tflops_per_second']:.3f} TFLOP/s: "
                                              f"{hf['torch_matmul_peak_source']})"),
            ("HF final loss", f"{hf['final_loss']:.4f}"),
            ("HF peak host memory", f"{_gib(hf['peak_host_memory_bytes'])} (its own process's VmHWM; the JAX "
                                    "figure above is the JAX process's alone)"),
            ("t5x_lite / HF tokens/s", f"{hf['t5x_lite_over_hf_tokens_per_second']:.2f}x"),
        ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    pipeline = report.get("data_pipeline")
    if pipeline and "skipped" in pipeline:
        lines.append(f"data pipeline: skipped: {pipeline['skipped']}")
    elif pipeline:
        lines.append(
            f"data pipeline: {pipeline['packed_rows_per_second']:,.0f} examples/s ({pipeline['task']}, packed "
            f"{pipeline['lengths']['inputs']}/{pipeline['lengths']['targets']} rows, batch {pipeline['batch_size']}; "
            f"{pipeline['task_examples_per_second']:,.0f} task examples/s before packing) vs model consumes "
            f"{pipeline['model_rows_per_second']:,.2f} examples/s: ratio {pipeline['pipeline_over_model']:,.1f}"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    # Before JAX starts its threads (run() is the first to touch a device).
    kept = args.keep_freed_host_memory and host_memory.keep_freed_memory_on_cpu()
    report = run(args, host_memory_kept=kept)
    try:
        if args.against == "hf":
            report["hf"] = compare_hf(args, report)
        if args.data_throughput:
            report["data_pipeline"] = compare_data_pipeline(args, report)
    finally:  # What was measured is printed and written also when a comparison fails.
        print(format_table(report))
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
    return report


if __name__ == "__main__":
    main()
