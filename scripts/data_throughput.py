"""Times a task's input pipeline on the CPU: examples per second out of seqio, and packed batches as `train` reads them.

    python scripts/data_throughput.py --task=local_corpus_span_corruption --inputs_length=512 --targets_length=114

Two rates, each after `--warmup` untimed examples (which fill seqio's shuffle buffer): the task's examples
(reading, tokenizing, span corruption, shuffling) and the batches of t5x_lite.data.get_dataset (the same, then
packing by seqio.EncDecFeatureConverter and batching), in rows per second. Compare the rows per second with the
model's train step (scripts/benchmark.py: sequences per second at the same batch size and lengths): the pipeline
keeps up while it is faster.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import seqio  # noqa: E402

import tasks  # noqa: E402,F401  (registers the tasks)
from t5x_lite import data  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="local_corpus_span_corruption", help="a registered task or mixture")
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=5000, help="timed task examples")
    parser.add_argument("--batches", type=int, default=500, help="timed batches")
    parser.add_argument("--warmup", type=int, default=1000, help="untimed examples first (and untimed batches: "
                                                                 "warmup / batch_size)")
    parser.add_argument("--json_out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    for name in ("inputs_length", "targets_length", "batch_size", "examples", "batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}={getattr(args, name)}; valid: >= 1")
    return args


def timed_rate(iterator, warmup: int, count: int) -> tuple[float, float]:
    """(seconds to the first of `warmup` untimed items, items per second over the next `count`)."""
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(iterator)
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return first, count / (time.perf_counter() - start)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data.keep_tensorflow_off_accelerators()
    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    task = seqio.get_mixture_or_task(args.task)
    examples = task.get_dataset(lengths, split="train", shuffle=True, seed=0, num_epochs=None)
    first_example_s, examples_per_s = timed_rate(examples.as_numpy_iterator(), max(args.warmup, 1), args.examples)
    batches = data.get_dataset(args.task, task_feature_lengths=lengths, split="train",
                               global_batch_size=args.batch_size, shuffle=True, seed=0, pack=True,
                               shard_info=seqio.ShardInfo(0, 1))
    first_batch_s, batches_per_s = timed_rate(batches.as_numpy_iterator(), max(args.warmup // args.batch_size, 1),
                                              args.batches)
    results = {
        "task": args.task, "lengths": lengths, "batch_size": args.batch_size, "cpus": os.cpu_count(),
        "task_examples_per_second": examples_per_s, "first_example_seconds": first_example_s,
        "packed_rows_per_second": batches_per_s * args.batch_size, "first_batch_seconds": first_batch_s,
    }
    print(json.dumps(results, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
