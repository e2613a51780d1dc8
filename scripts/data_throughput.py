"""Times a task's input pipeline on the CPU: examples per second out of seqio, and packed batches as `train` reads them.

    python scripts/data_throughput.py --task=local_corpus_span_corruption --inputs_length=512 --targets_length=114

Two rates, each after `--warmup` untimed examples (which fill seqio's shuffle buffer): the task's examples
(reading, tokenizing, span corruption, shuffling) and the batches of t5x_lite.data.get_dataset (the same, then
packing by seqio.EncDecFeatureConverter and batching), in rows per second. Compare the rows per second with the
model's train step (scripts/benchmark.py: sequences per second at the same batch size and lengths): the pipeline
keeps up while it is faster. scripts/benchmark.py --data_throughput runs this and prints the two side by side.

The local corpus tasks need T5's vocabulary and the corpus from the local data folder (tasks/settings.py; default
../shared/data). With --skip_without_local_data a missing one ends the run at once with {"skipped": why}
(printed and written to --json_out) and exit status 0, instead of an error or a reach for GCS.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import seqio  # noqa: E402

import tasks  # noqa: E402,F401  (registers the tasks)
from t5x_lite import data  # noqa: E402
from tasks import settings  # noqa: E402


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
    parser.add_argument("--skip_without_local_data", action="store_true",
                        help="a local corpus task whose vocabulary or corpus files are absent: report it skipped")
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


def missing_local_data(task_name: str) -> str | None:
    """Why a local corpus task cannot run from local files here (None when it can, or for other tasks)."""
    if not task_name.startswith("local_corpus"):
        return None
    spm = settings.t5_spm_path()
    if "://" in spm:
        return (f"no local T5 vocabulary: no local data folder (T5X_LITE_DATA_DIR is empty, or unset and "
                f"{settings.DEFAULT_DATA_DIR} absent) and no T5X_LITE_SPM_PATH, so {task_name} would read {spm}")
    if not os.path.exists(spm):
        return f"T5's vocabulary {spm} does not exist (T5X_LITE_SPM_PATH / T5X_LITE_DATA_DIR)"
    patterns = settings.corpus_patterns()
    if not any(glob.glob(pattern) for pattern in patterns):
        return f"no corpus file matches {patterns} (T5X_LITE_CORPUS / T5X_LITE_DATA_DIR)"
    return None


def _write(results: dict, json_out: str | None):
    print(json.dumps(results, indent=2))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.skip_without_local_data:
        why = missing_local_data(args.task)
        if why:
            results = {"task": args.task, "skipped": why}
            _write(results, args.json_out)
            return results
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
    _write(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
