"""Where a train step's time goes: traces a few steps with jax.profiler and prints the XLA ops by total time.

    python scripts/profile_step.py --gin_file=gin/models/t5_1_1/small.gin --batch_size=8 \
        --inputs_length=512 --targets_length=114 --steps=3 --top=25

The trace (TensorBoard's profile plugin or xprof read it) is kept in --trace_dir. The table is read from the
trace's host plane: every XLA op that ran on a device thread, summed over the traced steps, with its share of
the traced device time, and the same summed by op kind (dot, fusion kinds, copies/transposes, ...). On a CPU,
an op runs on one of the thread pool's threads, so the shares are of the time summed over threads.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

import jax  # noqa: E402

import benchmark  # noqa: E402
from t5x_lite import host_memory, partitioning, trainer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--steps", type=int, default=3, help="traced steps (after one untraced)")
    parser.add_argument("--top", type=int, default=25, help="ops to list")
    parser.add_argument("--trace_dir", default=None, help="default: a new temporary folder")
    return parser.parse_args(argv)


def op_kind(name: str) -> str:
    """'fusion.12' -> 'fusion', 'dot.3' -> 'dot', 'loop_transpose_fusion' -> 'loop_transpose_fusion'."""
    return re.sub(r"[._]\d+$", "", name.split(" ")[0])


def op_times(xplane_path: str) -> dict[str, float]:
    """Summed duration in seconds of each XLA op name found on the trace's threads."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in space.planes:
        names = {i: m.name for i, m in plane.event_metadata.items()}
        stat_names = {i: m.name for i, m in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                stats = {stat_names.get(s.metadata_id, ""): s for s in event.stats}
                # XLA:CPU marks each op it runs with its HLO op name (the "hlo_op" stat).
                if "hlo_op" not in stats and "hlo_module" not in stats:
                    continue
                name = names.get(event.metadata_id, "?")
                if "hlo_op" in stats:
                    totals[name] += event.duration_ps * 1e-12
    return dict(totals)


def main(argv=None) -> None:
    args = parse_args(argv)
    host_memory.keep_freed_memory_on_cpu()  # as the entry points and the benchmark, before JAX starts its threads
    model = benchmark.build_model(args.gin_file, args.gin_bindings, args.dtype)
    partitioner = partitioning.Partitioner((1, 1))
    train = trainer.Trainer(model, partitioner, benchmark.OPTIMIZERS["adafactor"])
    state = train.init_state()
    batch = benchmark.synthetic_batch(args.batch_size, args.inputs_length, args.targets_length,
                                      model.config.vocab_size, partitioner.batch_sharding, 0)
    step = train.lower_train_step(batch).compile()
    rng = train.dropout_rng
    state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    times = op_times(path)
    if not times:
        raise SystemExit(f"no XLA ops with an 'hlo_op' stat in {path}; this jax's CPU runtime does not trace ops")
    total = sum(times.values())
    print(f"trace: {path}\n{len(times)} ops, {total / args.steps:.3f} s of op time per step (summed over threads)\n")
    print(f"{'op':<48}{'s/step':>9}{'share':>8}")
    for name, seconds in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{name[:47]:<48}{seconds / args.steps:>9.4f}{seconds / total:>8.1%}")
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, seconds in times.items():
        kinds[op_kind(name)] += seconds
    print(f"\n{'op kind':<48}{'s/step':>9}{'share':>8}")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{kind[:47]:<48}{seconds / args.steps:>9.4f}{seconds / total:>8.1%}")


if __name__ == "__main__":
    main()
