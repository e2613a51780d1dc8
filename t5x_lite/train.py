r"""Train a model: the gin-configured `train` entry point.

    python -m t5x_lite.train \
      --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/pretrain.gin \
      --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'synthetic_reverse'" --gin.TRAIN_STEPS=100

A run resumes from the latest good checkpoint in MODEL_DIR, else starts from INITIAL_CHECKPOINT_PATH
(fine-tuning: its parameters only, or with INITIAL_CHECKPOINT_RESTORE='train_state' its whole train state),
else from scratch. It trains until step TRAIN_STEPS, or TRAIN_STEPS_RELATIVE steps past the step the run
started from. It writes into MODEL_DIR: `config.gin` (what was parsed), `operative_config.gin` (what was
used), `model-info.txt` (every parameter's shape, logical axes and sharding), `run_start.json` (the step
the run started from), `checkpoints/`, TensorBoard summaries under `train/` and `eval/`, and
`train/metrics.jsonl`.
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

# A tuple inside is a choice: at least one of its macros must be set (to something other than None).
REQUIRED_MACROS = (
    "MODEL_DIR", ("TRAIN_STEPS", "TRAIN_STEPS_RELATIVE"), "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "BATCH_SIZE"
)
OPTIONAL_MACROS = ("INITIAL_CHECKPOINT_PATH",)
# What INITIAL_CHECKPOINT_RESTORE may name: the parameters only (fresh optimizer state, step 0), or the whole
# train state (step, parameters and optimizer state), as T5X's RestoreCheckpointConfig(strict=True) does.
INITIAL_CHECKPOINT_RESTORE_CHOICES = ("params", "train_state")
RUN_START_FILE = "run_start.json"


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


def check_step_arguments(total_steps: int | None, relative_steps: int | None, initial_checkpoint_restore: str) -> None:
    """Raises a ValueError naming a bad TRAIN_STEPS / TRAIN_STEPS_RELATIVE / INITIAL_CHECKPOINT_RESTORE value."""
    if initial_checkpoint_restore not in INITIAL_CHECKPOINT_RESTORE_CHOICES:
        raise ValueError(
            f"initial_checkpoint_restore (INITIAL_CHECKPOINT_RESTORE) must be one of "
            f"{INITIAL_CHECKPOINT_RESTORE_CHOICES}; got {initial_checkpoint_restore!r}"
        )
    if (total_steps is None) == (relative_steps is None):
        raise ValueError(
            "set one of total_steps (TRAIN_STEPS: the step to stop at) and relative_steps (TRAIN_STEPS_RELATIVE: "
            f"how many steps past the step the run started from); got TRAIN_STEPS={total_steps!r}, "
            f"TRAIN_STEPS_RELATIVE={relative_steps!r}"
        )
    for name, value in (("TRAIN_STEPS", total_steps), ("TRAIN_STEPS_RELATIVE", relative_steps)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def state_from_initial_checkpoint(trainer: trainer_lib.Trainer, path: str, restore: str) -> trainer_lib.TrainState:
    """The state a new run starts from when given INITIAL_CHECKPOINT_PATH: its parameters with a fresh optimizer
    state at step 0 (`restore` 'params'), or its whole train state ('train_state')."""
    if restore == "params":
        state = trainer.state_from_params(checkpoints.restore_params(path, trainer.abstract_state.params))
        logging.info("Initialised parameters from %s (fresh optimizer state, step 0)", path)
        return state
    try:
        restored = checkpoints.restore_train_state(path, trainer.abstract_state.as_dict())
    except checkpoints.TreeMismatchError as error:
        raise checkpoints.TreeMismatchError(
            f"INITIAL_CHECKPOINT_RESTORE='train_state' restores the step, parameters and optimizer state of "
            f"INITIAL_CHECKPOINT_PATH={path!r}, so it must hold a train state of this model and optimizer: "
            f"{str(error).rstrip('.')}. With INITIAL_CHECKPOINT_RESTORE='params' only the parameters are restored "
            "(fresh optimizer state, step 0)."
        ) from error
    state = trainer_lib.TrainState(**restored)
    logging.info("Initialised the whole train state from %s (step %d)", path, int(jax.device_get(state.step)))
    return state


def write_run_start(model_dir: str, step: int, initial_checkpoint_path: str | None) -> None:
    """Records the step a new run starts from, which TRAIN_STEPS_RELATIVE counts from on every restart."""
    with tf.io.gfile.GFile(os.path.join(model_dir, RUN_START_FILE), "w") as f:
        json.dump({"step": step, "initial_checkpoint_path": initial_checkpoint_path}, f)


def read_run_start(model_dir: str) -> int:
    """The step this MODEL_DIR's run started from; 0 when it has no record (runs that predate the record all
    started at step 0)."""
    path = os.path.join(model_dir, RUN_START_FILE)
    if not tf.io.gfile.exists(path):
        return 0
    with tf.io.gfile.GFile(path) as f:
        return int(json.load(f)["step"])


def final_step(total_steps: int | None, relative_steps: int | None, run_start_step: int) -> int:
    """The step training stops at: TRAIN_STEPS, or TRAIN_STEPS_RELATIVE past the step the run started from."""
    return run_start_step + relative_steps if relative_steps is not None else total_steps


def check_final_step(
    last_step: int,
    start_step: int,
    *,
    resumed: bool,
    total_steps: int | None,
    relative_steps: int | None,
    model_dir: str,
) -> None:
    """Raises a ValueError naming both steps when training would stop before the step it starts from, or at it
    in a new run; a resumed run already at its last step is finished and trains no more."""
    if resumed and last_step < start_step:
        setting = (
            f"TRAIN_STEPS={total_steps}" if relative_steps is None
            else f"TRAIN_STEPS_RELATIVE={relative_steps} past step {last_step - relative_steps}, where the run started"
        )
        raise ValueError(
            f"{model_dir} holds a checkpoint at step {start_step}, past the final step {last_step} that {setting} "
            "gives; raise it (or use another MODEL_DIR)."
        )
    if not resumed and last_step <= start_step:
        raise ValueError(
            f"TRAIN_STEPS={total_steps} is not beyond step {start_step}, the step of the train state restored from "
            "INITIAL_CHECKPOINT_PATH: with INITIAL_CHECKPOINT_RESTORE='train_state' TRAIN_STEPS is absolute (it "
            f"counts the steps already taken), so set TRAIN_STEPS={start_step + total_steps} for {total_steps} "
            f"steps more, or TRAIN_STEPS_RELATIVE={total_steps}."
        )


def train(
    *,
    model: models.EncoderDecoderModel,
    train_dataset_cfg: data.DatasetConfig,
    partitioner: partitioning.Partitioner,
    model_dir: str,
    total_steps: int | None = None,
    relative_steps: int | None = None,
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
    initial_checkpoint_restore: str = "params",
    seed: int | None = 0,
) -> trainer_lib.TrainState:
    """Trains until step `total_steps`, or `relative_steps` past the step the run started from; returns the final state.

    A run resumes from the latest good checkpoint in `model_dir`; a new run starts from `initial_checkpoint_path`
    when given (`initial_checkpoint_restore`: 'params' for its parameters with a fresh optimizer state at step 0,
    'train_state' for its step, parameters and optimizer state), else from scratch. The step a new run starts from
    is recorded in `model_dir`, so that `relative_steps` gives the same final step however often it is restarted.
    Set one of `total_steps` and `relative_steps`.

    `seed` None: process 0 draws one and broadcasts it to all processes (it also orders the data when the data
    config's seed is None too)."""
    check_step_arguments(total_steps, relative_steps, initial_checkpoint_restore)
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
    resumed = restored is not None
    if resumed:
        state = trainer_lib.TrainState(**restored)
        run_start_step = read_run_start(model_dir)
        logging.info("Resumed from step %d in %s (the run started at step %d)", start_step, model_dir, run_start_step)
    else:
        if initial_checkpoint_path:
            state = state_from_initial_checkpoint(trainer, initial_checkpoint_path, initial_checkpoint_restore)
        else:
            state = trainer.init_state()
            logging.info("Initialised from scratch (seed %d)", seed)
        start_step = run_start_step = int(jax.device_get(state.step))
    last_step = final_step(total_steps, relative_steps, run_start_step)
    check_final_step(
        last_step, start_step, resumed=resumed, total_steps=total_steps, relative_steps=relative_steps,
        model_dir=model_dir,
    )
    if not resumed and is_chief:
        write_run_start(model_dir, run_start_step, initial_checkpoint_path)
    if resumed and start_step == last_step:
        logging.info("The run in %s is already at its final step %d; nothing to train", model_dir, last_step)

    train_writer = MetricWriter(os.path.join(model_dir, "train"))
    eval_writer = MetricWriter(os.path.join(model_dir, "eval")) if eval_dataset_cfg is not None else None
    pending: list[dict[str, jax.Array]] = []
    interval_start, interval_steps = time.time(), 0
    tokens_per_batch = train_dataset_cfg.batch_size * train_dataset_cfg.task_feature_lengths["targets"]
    progress = tqdm(
        total=last_step, initial=start_step, desc="train", unit="step", disable=not is_chief, dynamic_ncols=True
    )
    step = start_step
    while step < last_step:
        state, metrics = trainer.train_step(state, next(iterator))
        step += 1
        pending.append(metrics)
        interval_steps += 1
        progress.update(1)
        checkpointer.save(step, state.as_dict(), iterator)
        if step % log_every_steps == 0 or step == last_step:
            fetched = jax.device_get(pending)  # the only host sync of the loop, at the logging cadence
            elapsed = max(time.time() - interval_start, 1e-9)
            scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "weight"}
            scalars["seqs_per_second"] = interval_steps * train_dataset_cfg.batch_size / elapsed
            scalars["target_tokens_per_second"] = interval_steps * tokens_per_batch / elapsed
            train_writer.write(step, scalars)
            progress.set_postfix(loss=f"{scalars['loss']:.4f}", acc=f"{scalars['accuracy']:.3f}")
            pending, interval_start, interval_steps = [], time.time(), 0
        if eval_dataset_cfg is not None and eval_period and (step % eval_period == 0 or step == last_step):
            eval_metrics = evaluate(trainer, state.params, eval_dataset_cfg, eval_steps)
            eval_writer.write(step, eval_metrics)
            logging.info("step %d eval: %s", step, eval_metrics)
        if inference_evaluator is not None and eval_period and (step % eval_period == 0 or step == last_step):
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
