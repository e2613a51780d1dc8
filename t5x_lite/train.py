r"""Train a model: the gin-configured `train` entry point.

    python -m t5x_lite.train \
      --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/pretrain.gin \
      --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'synthetic_reverse'" --gin.TRAIN_STEPS=100

A run resumes from the latest good checkpoint in MODEL_DIR, else starts from INITIAL_CHECKPOINT_PATH's
parameters (fine-tuning), else from scratch. It writes into MODEL_DIR: `config.gin` (what was parsed),
`operative_config.gin` (what was used), `model-info.txt` (every parameter's shape, logical axes and
sharding), `checkpoints/`, TensorBoard summaries under `train/` and `eval/`, and `train/metrics.jsonl`.
"""
from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import sys
import time
from typing import Any, Callable, Sequence

import gin
import jax
import numpy as np
import optax
import tensorflow as tf
from absl import app, flags, logging
from tqdm import tqdm

from t5x_lite import eval as eval_lib

from t5x_lite import checkpoints, data, distributed, gin_utils, host_memory, models, optimizers, partitioning, trainer as trainer_lib

REQUIRED_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "BATCH_SIZE")
OPTIONAL_MACROS = ("INITIAL_CHECKPOINT_PATH",)


class MetricWriter:
    """TensorBoard scalars (and a JSONL copy) written by process 0 only."""

    def __init__(self, directory: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            tf.io.gfile.makedirs(directory)
            self._writer = tf.summary.create_file_writer(directory)
            self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self._writer.as_default():
            for name, value in scalars.items():
                tf.summary.scalar(name, value, step=step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()


def write_model_info(path: str, trainer: trainer_lib.Trainer) -> None:
    rows, total = trainer.parameter_table()
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  shape={shape}  logical_axes={axes}  sharding={sharding}" for name, shape, axes, sharding in rows]
    lines.append(f"total parameters: {total:,}")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    logging.info("%d parameter arrays, %s parameters; details in %s", len(rows), f"{total:,}", path)


def evaluate(trainer: trainer_lib.Trainer, params: Any, eval_cfg: data.DatasetConfig, eval_steps: int | None) -> dict[str, float]:
    """Teacher-forced loss and token accuracy over (up to eval_steps batches of) the eval split."""
    iterator = data.GlobalBatchIterator.from_config(eval_cfg, trainer.partitioner.batch_sharding, repeat=False)
    sums = []
    for i, batch in enumerate(iterator):
        if eval_steps is not None and i >= eval_steps:
            break
        sums.append(trainer.eval_step(params, batch))
    if not sums:
        raise ValueError(f"eval split {eval_cfg.split!r} of {eval_cfg.mixture_or_task_name!r} gave no full batch of {eval_cfg.batch_size}")
    return trainer_lib.accumulate(sums)


def train(
    *,
    model: models.EncoderDecoderModel,
    train_dataset_cfg: data.DatasetConfig,
    partitioner: partitioning.Partitioner,
    model_dir: str,
    total_steps: int,
    optimizer: Callable[..., optax.GradientTransformation] = optimizers.adafactor,
    learning_rate_fn: Callable[[Any], Any] | None = None,
    num_microbatches: int = 1,
    checkpoint_period: int = 1000,
    keep_checkpoints: int | None = 3,
    async_checkpointing: bool = True,
    log_every_steps: int = 100,
    eval_dataset_cfg: data.DatasetConfig | None = None,
    eval_period: int | None = None,
    eval_steps: int | None = None,
    infer_eval_dataset_cfg: data.DatasetConfig | None = None,
    inference_evaluator_cls: Callable[..., eval_lib.InferenceEvaluator] = eval_lib.InferenceEvaluator,
    initial_checkpoint_path: str | None = None,
    seed: int | None = 0,
) -> trainer_lib.TrainState:
    """Trains until `total_steps` (counted from the start of this MODEL_DIR's run); returns the final state.

    `seed` None: process 0 draws one and broadcasts it to all processes (it also orders the data when the data
    config's seed is None too)."""
    is_chief = jax.process_index() == 0
    tf.io.gfile.makedirs(model_dir)
    if is_chief:
        with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.config_str())

    drawn = seed is None
    seed = distributed.same_seed_on_all_processes(seed)
    if drawn and train_dataset_cfg.seed is None:  # SEED = None: one drawn seed for the data order too
        train_dataset_cfg = dataclasses.replace(train_dataset_cfg, seed=seed)
    # Everything that can fail on bad input happens before the first compile.
    iterator = data.GlobalBatchIterator.from_config(train_dataset_cfg, partitioner.batch_sharding, repeat=True)
    trainer = trainer_lib.Trainer(
        model, partitioner, optimizer, num_microbatches=num_microbatches, learning_rate_fn=learning_rate_fn, seed=seed
    )
    if is_chief:
        write_model_info(os.path.join(model_dir, "model-info.txt"), trainer)
    # T5X's infer_eval: every eval_period steps, decode and score the tasks of infer_eval_dataset_cfg through
    # seqio.Evaluator, writing into MODEL_DIR/inference_eval.
    inference_evaluator = None
    if infer_eval_dataset_cfg is not None:
        inference_evaluator = inference_evaluator_cls(
            infer_eval_dataset_cfg, model, partitioner, os.path.join(model_dir, "inference_eval")
        )
    checkpointer = checkpoints.Checkpointer(
        os.path.join(model_dir, "checkpoints"),
        save_interval_steps=checkpoint_period,
        max_to_keep=keep_checkpoints,
        async_save=async_checkpointing,
    )

    restored, start_step = checkpointer.restore_latest_good(trainer.abstract_state.as_dict(), data_iterator=iterator)
    if restored is not None:
        state = trainer_lib.TrainState(**restored)
        logging.info("Resumed from step %d in %s", start_step, model_dir)
    elif initial_checkpoint_path:
        params = checkpoints.restore_params(initial_checkpoint_path, trainer.abstract_state.params)
        state = trainer.state_from_params(params)
        start_step = 0
        logging.info("Initialised parameters from %s", initial_checkpoint_path)
    else:
        state = trainer.init_state()
        start_step = 0
        logging.info("Initialised from scratch (seed %d)", seed)

    train_writer = MetricWriter(os.path.join(model_dir, "train"))
    eval_writer = MetricWriter(os.path.join(model_dir, "eval")) if eval_dataset_cfg is not None else None
    pending: list[dict[str, jax.Array]] = []
    interval_start, interval_steps = time.time(), 0
    tokens_per_batch = train_dataset_cfg.batch_size * train_dataset_cfg.task_feature_lengths["targets"]
    progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not is_chief, dynamic_ncols=True)
    step = start_step
    while step < total_steps:
        state, metrics = trainer.train_step(state, next(iterator))
        step += 1
        pending.append(metrics)
        interval_steps += 1
        progress.update(1)
        checkpointer.save(step, state.as_dict(), iterator)
        if step % log_every_steps == 0 or step == total_steps:
            fetched = jax.device_get(pending)  # the only host sync of the loop, at the logging cadence
            elapsed = max(time.time() - interval_start, 1e-9)
            scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "weight"}
            scalars["seqs_per_second"] = interval_steps * train_dataset_cfg.batch_size / elapsed
            scalars["target_tokens_per_second"] = interval_steps * tokens_per_batch / elapsed
            train_writer.write(step, scalars)
            progress.set_postfix(loss=f"{scalars['loss']:.4f}", acc=f"{scalars['accuracy']:.3f}")
            pending, interval_start, interval_steps = [], time.time(), 0
        if eval_dataset_cfg is not None and eval_period and (step % eval_period == 0 or step == total_steps):
            eval_metrics = evaluate(trainer, state.params, eval_dataset_cfg, eval_steps)
            eval_writer.write(step, eval_metrics)
            logging.info("step %d eval: %s", step, eval_metrics)
        if inference_evaluator is not None and eval_period and (step % eval_period == 0 or step == total_steps):
            inference_evaluator.evaluate(state.params, step)
    progress.close()
    if checkpointer.latest_step() != step:
        checkpointer.save(step, state.as_dict(), iterator, force=True)
    checkpointer.close()
    if inference_evaluator is not None:
        inference_evaluator.close()
    train_writer.close()
    if eval_writer is not None:
        eval_writer.close()
    if is_chief:
        with tf.io.gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())
    return state


def main(argv: Sequence[str]) -> None:
    del argv
    host_memory.keep_freed_memory_from_flags()  # before JAX starts its threads
    distributed.initialize_from_flags()  # before anything touches a device
    flags_ = flags.FLAGS
    gin_utils.parse(flags_.gin_file, flags_.gin_bindings, flags_.gin_search_paths)
    gin_utils.check_required_macros(REQUIRED_MACROS, optional=OPTIONAL_MACROS)
    gin.finalize()
    distributed.check_same_on_all_processes(gin.config_str(), "gin config")
    gin.get_configurable(train)()


def _is_noise(record: std_logging.LogRecord) -> bool:
    # Orbax logs every stage of every save at INFO; gin logs an error for each search path that does not
    # hold an included file before it finds the one that does.
    return ("/orbax/" in record.pathname and record.levelno < std_logging.WARNING) or (
        record.pathname.endswith("gin/resource_reader.py")
    )


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(lambda record: not _is_noise(record))


def run_from_command_line() -> None:
    """Parses flags (T5X's gin flags, with the --gin.MACRO=value shorthand) and runs `train`."""
    import tasks  # noqa: F401  (registers the built-in seqio tasks)

    quiet_library_logs()

    flags.DEFINE_multi_string("gin_file", [], "gin files to parse, in order")
    flags.DEFINE_multi_string("gin_bindings", [], "individual gin bindings, applied after the files")
    flags.DEFINE_multi_string("gin_search_paths", [], "extra folders in which to look for gin files and includes")
    distributed.define_flags()
    host_memory.define_flags()
    app.run(main, argv=gin_utils.rewrite_gin_shorthand(sys.argv))


if __name__ == "__main__":
    # Run the importable module's copy, the one the gin files configure (`from t5x_lite import train`).
    from t5x_lite import train as train_module

    train_module.run_from_command_line()
