r"""Run inference on a task split: the gin-configured `infer` entry point.

    python -m t5x_lite.infer \
      --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/infer.gin \
      --gin.CHECKPOINT_PATH="'/tmp/run/checkpoints'" --gin.INFER_OUTPUT_DIR="'/tmp/run/infer'" \
      --gin.MIXTURE_OR_TASK_NAME="'synthetic_reverse'"

For each task (of a mixture: each task that has the split) it writes JSON lines into INFER_OUTPUT_DIR, in chunks of
`chunk_size` batches:

    <task>-<split>-<chunk:05>.jsonl      {"index", "inputs", "prediction"} (mode 'predict') or {"index", "inputs",
                                         "score"} (mode 'score'), one line per example; when several processes
                                         hold different rows of the batch, <task>-<split>-<chunk:05>-slice<s:03>-of-
                                         <n:03>.jsonl per slice of rows
    <task>-<split>-settings.json         what the chunks were made with; a rerun must use the same
    <task>-<split>.COMPLETED             written once every chunk is

Each process reads the shard of the split (seqio.ShardInfo) that fills its slice of the rows of every global batch
and writes their outputs; the mesh splits the decoding over all devices. A chunk file is written under a temporary
name and renamed when whole, so an interrupted run resumes after its last finished chunk, and a rerun of a completed
task does nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from t5x_lite import data, decoding, eval as eval_lib, models, partitioning
from t5x_lite import predictor as predictor_lib

REQUIRED_MACROS = ("CHECKPOINT_PATH", "INFER_OUTPUT_DIR", "MIXTURE_OR_TASK_NAME")
MODES = ("predict", "score")


def _all_processes(values: np.ndarray) -> np.ndarray:
    """values from every process, stacked: [process_count, ...] (just [1, ...] on one process)."""
    if jax.process_count() == 1:
        return np.asarray(values)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def chunk_file(output_dir: str, task: str, split: str, chunk: int, data_slice: int = 0, num_slices: int = 1) -> str:
    suffix = "" if num_slices == 1 else f"-slice{data_slice:03d}-of-{num_slices:03d}"
    return os.path.join(output_dir, f"{task}-{split}-{chunk:05d}{suffix}.jsonl")


def batch_slice(sharding: jax.sharding.Sharding, global_batch_size: int) -> tuple[int, int, bool]:
    """The rows [start, stop) of a global batch that this process's devices hold, their slice index, the number
    of slices, and whether this process writes them (the first of the processes holding the same rows, as with
    model parallelism across hosts).

    Returns: (data_slice, num_slices, writes).
    """
    index_map = sharding.addressable_devices_indices_map((global_batch_size, 1))
    rows = sorted({index[0].indices(global_batch_size)[:2] for index in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or global_batch_size % (stop - start):
        raise ValueError(f"This process holds rows {rows} of the global batch of {global_batch_size} under "
                         f"{sharding}; infer needs one contiguous slice of an equal split.")
    starts = _all_processes(np.int64(start))
    writes = int(np.flatnonzero(starts == start)[0]) == jax.process_index()
    return start // (stop - start), global_batch_size // (stop - start), writes


def completion_marker(output_dir: str, task: str, split: str) -> str:
    return os.path.join(output_dir, f"{task}-{split}.COMPLETED")


def _write_atomically(path: str, text: str) -> None:
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        f.write(text)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _check_settings(output_dir: str, task: str, split: str, settings: dict[str, Any]) -> None:
    """Writes the run's settings next to its chunks, or checks that a resumed run uses the same ones."""
    path = os.path.join(output_dir, f"{task}-{split}-settings.json")
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            saved = json.load(f)
        if saved != settings:
            differ = {k: (saved.get(k), settings.get(k)) for k in sorted(set(saved) | set(settings))
                      if saved.get(k) != settings.get(k)}
            raise ValueError(
                f"{output_dir} holds an unfinished inference run of {task!r} ({split}) made with other settings "
                f"(saved, now): {differ}. Resume with the same settings, or use another INFER_OUTPUT_DIR."
            )
    elif jax.process_index() == 0:
        _write_atomically(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def infer_task(
    task: seqio.Task,
    *,
    predictor: predictor_lib.Predictor,
    params: Any,
    dataset_cfg: data.DatasetConfig,
    output_dir: str,
    mode: str,
    chunk_size: int,
    max_chunks: int | None,
    seed: int,
) -> bool:
    """Writes (the remaining chunks of) one task's inference; returns whether the task is complete."""
    split, name = dataset_cfg.split, task.name
    if tf.io.gfile.exists(completion_marker(output_dir, name, split)):
        logging.info("Inference of %s (%s) is already complete in %s.", name, split, output_dir)
        return True
    data_slice, num_slices, writes = batch_slice(predictor.partitioner.batch_sharding, dataset_cfg.batch_size)
    _check_settings(output_dir, name, split, {
        "mode": mode, "batch_size": dataset_cfg.batch_size, "chunk_size": chunk_size, "num_slices": num_slices,
        "task_feature_lengths": dict(dataset_cfg.task_feature_lengths),
        "decoding": dataclasses.asdict(predictor.decoding_config), "seed": seed,
    })
    files = functools.partial(chunk_file, output_dir, name, split, data_slice=data_slice, num_slices=num_slices)

    # Resume after the last chunk that every slice finished (their writers decide).
    first_missing = 0
    while writes and tf.io.gfile.exists(files(first_missing)):
        first_missing += 1
    start_chunk = int(_all_processes(np.int64(first_missing if writes else np.iinfo(np.int64).max)).min())
    if start_chunk:
        logging.info("Resuming inference of %s (%s) after its %d finished chunks.", name, split, start_chunk)

    # This process reads the examples of its slice of every global batch: shard `data_slice` of `num_slices`.
    data.keep_tensorflow_off_accelerators()
    lengths = dict(dataset_cfg.task_feature_lengths)
    dataset = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1, use_cached=dataset_cfg.use_cached,
                               shard_info=seqio.ShardInfo(data_slice, num_slices), seed=dataset_cfg.seed)
    dataset = seqio.EncDecFeatureConverter(pack=False)(dataset, lengths)
    slice_rows = dataset_cfg.batch_size // num_slices
    batches = eval_lib.padded_batches(dataset.enumerate().skip(start_chunk * chunk_size * slice_rows), slice_rows)
    padding = {k: np.zeros((slice_rows, *spec.shape), spec.dtype.as_numpy_dtype)
               for k, spec in dataset.element_spec.items()}
    run_chunk = functools.partial(
        _run_chunk, batches=batches, padding=padding, predictor=predictor, params=params, mode=mode,
        global_batch_size=dataset_cfg.batch_size, data_slice=data_slice, num_slices=num_slices,
        chunk_size=chunk_size, vocabularies=(task.output_features["inputs"].vocabulary,
                                             task.output_features["targets"].vocabulary), seed=seed,
    )

    chunk, written = start_chunk, 0
    while True:
        if max_chunks is not None and written >= max_chunks:
            logging.info("Stopping after %d chunks of %s (%s), as max_chunks asks.", written, name, split)
            return False
        lines, batches_done = run_chunk(chunk)
        if batches_done or chunk == 0:
            if writes:
                _write_atomically(files(chunk), "".join(lines))
            chunk, written = chunk + 1, written + 1
        if batches_done < chunk_size:  # the split ran out
            break
    _sync(f"t5x_lite.infer.{name}.{split}.done")
    if jax.process_index() == 0:
        _write_atomically(completion_marker(output_dir, name, split), json.dumps({"chunks": chunk}) + "\n")
    logging.info("Inference of %s (%s) complete: %d chunks in %s.", name, split, chunk, output_dir)
    return True


def _run_chunk(chunk: int, *, batches, padding, predictor, params, mode, global_batch_size, data_slice, num_slices,
               chunk_size, vocabularies, seed) -> tuple[list[str], int]:
    """Predicts or scores up to chunk_size global batches; returns the JSON lines of this process's slice of
    them and the number of batches run."""
    features = eval_lib.PREDICT_FEATURES if mode == "predict" else eval_lib.SCORE_FEATURES
    sharding = predictor.partitioner.batch_sharding
    slice_rows = global_batch_size // num_slices
    inputs_vocab, targets_vocab = vocabularies
    lines = []
    for batch_in_chunk in range(chunk_size):
        positions, local = next(batches, (np.zeros([0], np.int64), None))
        # The shards may differ by an example: go on while any slice has one; the others feed padding.
        if not _all_processes(np.bool_(local is not None)).any():
            return lines, batch_in_chunk
        local = padding if local is None else local
        global_batch = {
            k: jax.make_array_from_process_local_data(sharding, local[k], (global_batch_size, *local[k].shape[1:]))
            for k in features
        }
        if mode == "predict":
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), chunk * chunk_size + batch_in_chunk)
            outputs = eval_lib.host_value(predictor.predict(params, global_batch, rng)[0])
        else:
            outputs = eval_lib.host_value(predictor.score(params, global_batch))
        mine = outputs[data_slice * slice_rows:(data_slice + 1) * slice_rows]
        for row, position in enumerate(positions):
            record = {
                # The example's position in the split (for a single-file source: the j-th example of shard s).
                "index": int(position) * num_slices + data_slice,
                "inputs": inputs_vocab.decode(local["encoder_input_tokens"][row].tolist()),
            }
            if mode == "predict":
                record["prediction"] = targets_vocab.decode(mine[row].tolist())
            else:
                record["score"] = float(mine[row])
            lines.append(json.dumps(record) + "\n")
    return lines, chunk_size


def infer(
    *,
    model: models.EncoderDecoderModel,
    dataset_cfg: data.DatasetConfig,
    partitioner: partitioning.Partitioner,
    checkpoint_path: str,
    output_dir: str,
    mode: str = "predict",
    decoding_config: decoding.DecodingConfig | None = None,
    chunk_size: int = 100,
    max_chunks: int | None = None,
    seed: int = 0,
) -> bool:
    """Writes the predictions (or scores) of a checkpoint on each task of a task or mixture's split.

    Args:
      dataset_cfg: the task or mixture, split, global batch size, task_feature_lengths (required: batches need
        static shapes; targets' length is also the decode length unless decoding_config gives one), use_cached
        and seed. Shuffle and pack are ignored.
      checkpoint_path: a step directory, or a checkpoint / model directory (its newest step is used).
      mode: 'predict' (decode the inputs) or 'score' (log-likelihood of the targets).
      chunk_size: batches per output file; the unit that an interrupted run resumes after.
      max_chunks: stop after writing this many chunks of each task in this run (None: run to the end).
      seed: of the sampling decoders (one key per batch, so a resumed run samples the same).

    Returns:
      Whether every task is complete.
    """
    # Everything that can fail on bad input happens before the first compile.
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid: {', '.join(map(repr, MODES))}")
    if chunk_size < 1 or (max_chunks is not None and max_chunks < 1):
        raise ValueError(f"chunk_size={chunk_size}, max_chunks={max_chunks}; valid: chunk_size >= 1, max_chunks None or >= 1")
    if not dataset_cfg.task_feature_lengths:
        raise ValueError("infer needs TASK_FEATURE_LENGTHS (e.g. {'inputs': 512, 'targets': 64}): batches have static shapes")
    tasks = eval_lib.eval_tasks(dataset_cfg.mixture_or_task_name, dataset_cfg.split,
                                model_vocab_size=model.config.vocab_size, require_metrics=False)
    steps = eval_lib.checkpoint_steps(checkpoint_path)
    eos_id = tasks[0].output_features["targets"].vocabulary.eos_id
    predictor = predictor_lib.Predictor(model, partitioner, decoding_config=decoding_config, eos_id=eos_id)
    predictor.check_batch_size(dataset_cfg.batch_size)
    step, directory = steps[-1]
    params = eval_lib.restore_params(predictor, directory)
    logging.info("Inference with step %d (%s)", step, directory)
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(output_dir)
    _sync("t5x_lite.infer.output_dir")
    complete = True
    for task in tasks:
        complete &= infer_task(task, predictor=predictor, params=params, dataset_cfg=dataset_cfg, output_dir=output_dir,
                               mode=mode, chunk_size=chunk_size, max_chunks=max_chunks, seed=seed)
    return complete


if __name__ == "__main__":
    # Run the importable module's copy, the one the gin files configure (`from t5x_lite import infer`).
    from t5x_lite import infer as infer_module

    eval_lib.run_entry_point(infer_module.infer, REQUIRED_MACROS)
