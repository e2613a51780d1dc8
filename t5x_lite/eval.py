r"""Evaluate checkpoints: the gin-configured `eval` entry point, and the evaluator that training also runs.

    python -m t5x_lite.eval \
      --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/eval.gin \
      --gin.CHECKPOINT_PATH="'/tmp/run/checkpoints'" --gin.EVAL_OUTPUT_DIR="'/tmp/run/eval'" \
      --gin.MIXTURE_OR_TASK_NAME="'synthetic_reverse'"

CHECKPOINT_PATH is one step directory (`<model_dir>/checkpoints/<step>`), or a checkpoint directory (or a model
directory holding `checkpoints/`) whose every step is evaluated, oldest first; `evaluate.wait_for_new_checkpoints_secs`
keeps polling for newer steps (evaluation alongside training). Each task of the mixture is decoded and scored
through `seqio.Evaluator` (its predict, predict_with_aux and score metrics), and EVAL_OUTPUT_DIR receives, per task:
`<task>-metrics.jsonl` (one line of metrics per step), `<task>-<step:06>.jsonl` (each example's inputs and targets
with its prediction or score) and TensorBoard summaries in `<task>/`; with `evaluate.summary_fn` (e.g. T0's median
accuracy per dataset: gin/runs/t0_eval.gin) also `<mixture_or_task>-summary.jsonl`, a summary across tasks per step.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import app, flags, logging
from etils import epath

from t5x_lite import checkpoints, data, decoding, distributed, gin_utils, host_memory, models, partitioning
from t5x_lite import predictor as predictor_lib

REQUIRED_MACROS = ("CHECKPOINT_PATH", "EVAL_OUTPUT_DIR", "MIXTURE_OR_TASK_NAME")


# ---- checks of the inputs, before anything is compiled -----------------------------------------------------


def eval_tasks(mixture_or_task_name: str, split: str, *, model_vocab_size: int,
               require_metrics: bool = True) -> list[seqio.Task]:
    """The tasks of a task or mixture that have `split` (and metrics, when required), after checking that each
    one's vocabularies fit the model's embedding.

    Raises:
      ValueError: the name is not registered; no task has the split (or no task with it has metrics); a
        vocabulary has more ids than the model's embedding has rows.
    """
    provider = data._get_provider(mixture_or_task_name)  # raises with close matches when not registered
    tasks = seqio.get_subtasks(provider)
    with_split = [task for task in tasks if split in task.splits]
    if not with_split:
        splits = {task.name: list(task.splits) for task in tasks}
        raise ValueError(f"{mixture_or_task_name!r} has no split {split!r}; the splits of its tasks: {splits}")
    usable = [task for task in with_split if task.metric_objs or not require_metrics]
    if not usable:
        raise ValueError(f"No task of {mixture_or_task_name!r} with split {split!r} has metrics to evaluate: "
                         f"{[task.name for task in with_split]}")
    skipped = sorted({task.name for task in tasks} - {task.name for task in usable})
    if skipped:
        logging.warning("Not evaluating %s: no split %r%s.", skipped, split, " or no metrics" if require_metrics else "")
    for task in usable:
        for name, feature in task.output_features.items():
            if feature.vocabulary.vocab_size > model_vocab_size:
                raise ValueError(
                    f"Task {task.name!r}'s {name!r} vocabulary has {feature.vocabulary.vocab_size} ids, but the "
                    f"model's embedding has {model_vocab_size} rows (network.T5Config.vocab_size = {model_vocab_size}); "
                    f"use a model with vocab_size >= {feature.vocabulary.vocab_size}, or the vocabulary it was "
                    "trained with."
                )
    return usable


def checkpoint_steps(checkpoint_path: str) -> list[tuple[int, str]]:
    """(step, step directory) of every checkpoint at `checkpoint_path`, oldest first.

    `checkpoint_path` is a step directory (`<checkpoints>/<step>`, holding `state/`), a checkpoint directory
    (holding step directories) or a model directory (holding `checkpoints/`).

    Raises:
      FileNotFoundError: the path does not exist or holds no checkpoint.
    """
    path = epath.Path(checkpoint_path)
    if not path.exists():
        raise FileNotFoundError(
            f"CHECKPOINT_PATH {checkpoint_path} does not exist; give a step directory (<model_dir>/checkpoints/<step>), "
            "a checkpoint directory (<model_dir>/checkpoints) or a model directory."
        )
    if (path / checkpoints.STATE_ITEM).is_dir():
        return [(int(path.name) if path.name.isdigit() else 0, str(path))]
    if (path / "checkpoints").is_dir() and not (path / checkpoints.STATE_ITEM).exists():
        path = path / "checkpoints"
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    steps = sorted(int(name) for name in entries if name.isdigit() and (path / name / checkpoints.STATE_ITEM).is_dir())
    if not steps:
        shown = ", ".join(entries[:20]) + (" ..." if len(entries) > 20 else "")
        raise FileNotFoundError(
            f"CHECKPOINT_PATH {checkpoint_path} holds no checkpoint: expected a step directory containing "
            f"{checkpoints.STATE_ITEM}/, or step directories <step>/{checkpoints.STATE_ITEM}/ under it; found "
            f"{shown or 'nothing'}."
        )
    return [(step, str(path / str(step))) for step in steps]


def restore_params(predictor: predictor_lib.Predictor, step_directory: str) -> Any:
    """The checkpoint's parameters on the predictor's mesh; a mismatch with the configured model names both."""
    try:
        return predictor.restore_params(step_directory)
    except checkpoints.TreeMismatchError as error:
        raise checkpoints.TreeMismatchError(
            f"The checkpoint at {step_directory} does not fit the model configured by the gin files "
            f"({predictor.model.config}): {error}"
        ) from error


# ---- batches of a seqio evaluation dataset ----------------------------------------------------------------


def padded_batches(dataset: tf.data.Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Batches of an enumerated dataset of (index, features): (indices int64[n], features [batch_size, ...]) with
    n <= batch_size real rows; the last batch is padded with zero rows so every batch has one static shape."""
    for indices, features in dataset.batch(batch_size).as_numpy_iterator():
        rows = len(indices)
        if rows < batch_size:
            features = {k: np.pad(v, [(0, batch_size - rows)] + [(0, 0)] * (v.ndim - 1)) for k, v in features.items()}
        yield indices, features


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated output, read from this process's own copy (works on every process of a multi-host mesh)."""
    return np.asarray(x.addressable_data(0))


PREDICT_FEATURES = ("encoder_input_tokens", "decoder_target_tokens")
SCORE_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


class InferenceEvaluator:
    """`seqio.Evaluator` driven by a `Predictor`: the predict, predict_with_aux and score metrics of parameters.

    Every process holds the whole evaluation split (seqio caches it) and feeds all rows of each batch; the mesh
    splits the rows over `data`, and every process gets every output back. Process 0 writes
    `<task>-metrics.jsonl`, `<task>-<step:06>.jsonl` (inputs, targets, predictions / scores) and TensorBoard
    summaries (`<task>/`) into `output_dir`.

    Args:
      dataset_cfg: the task or mixture, split, batch size, task_feature_lengths (None: each feature's longest
        example in the split), use_cached and seed; shuffle and pack are ignored (evaluation never does either).
      model, partitioner: as in training.
      output_dir: where the loggers write.
      decoding_config: how predictions are decoded (greedy by default).
      num_examples: evaluate only the first this many examples of each task.
      predictor: reuse this one (its model and partitioner) rather than building one.
      seed: of the sampling decoders (one key per batch).
      summary_fn: a function of one step's {task: {metric: value}} that returns a JSON-serialisable summary across
        tasks (e.g. tasks.t0.median_accuracy_by_dataset); process 0 appends {"step", **summary} to
        `<mixture_or_task>-summary.jsonl`.
    """

    def __init__(
        self,
        dataset_cfg: data.DatasetConfig,
        model: models.EncoderDecoderModel,
        partitioner: partitioning.Partitioner,
        output_dir: str,
        *,
        decoding_config: decoding.DecodingConfig | None = None,
        num_examples: int | None = None,
        predictor: predictor_lib.Predictor | None = None,
        seed: int = 0,
        summary_fn: Callable[[dict[str, dict[str, Any]]], dict[str, Any]] | None = None,
    ):
        self.tasks = eval_tasks(dataset_cfg.mixture_or_task_name, dataset_cfg.split,
                                model_vocab_size=model.config.vocab_size)
        self.batch_size = dataset_cfg.batch_size
        eos_id = self.tasks[0].output_features["targets"].vocabulary.eos_id
        self.predictor = predictor or predictor_lib.Predictor(
            model, partitioner, decoding_config=decoding_config, eos_id=eos_id
        )
        self.predictor.check_batch_size(self.batch_size)
        self.seed = seed
        self.summary_fn = summary_fn
        self.summary_path = os.path.join(output_dir, f"{dataset_cfg.mixture_or_task_name}-summary.jsonl")
        data.keep_tensorflow_off_accelerators()
        self.is_chief = jax.process_index() == 0
        if self.is_chief:
            tf.io.gfile.makedirs(output_dir)
        self.evaluator = seqio.Evaluator(
            dataset_cfg.mixture_or_task_name,
            feature_converter=seqio.EncDecFeatureConverter(pack=False),
            eval_split=dataset_cfg.split,
            use_cached=dataset_cfg.use_cached,
            seed=dataset_cfg.seed,
            sequence_length=None if dataset_cfg.task_feature_lengths is None else dict(dataset_cfg.task_feature_lengths),
            num_examples=num_examples,
            logger_cls=(seqio.JSONLogger, seqio.TensorBoardLogger) if self.is_chief else (),
            log_dir=output_dir,
            async_compute_metrics=False,
        )

    def evaluate(self, params: Any, step: int) -> dict[str, dict[str, Any]]:
        """Decodes and scores every task; returns {task: {metric: value}} (and the loggers write them)."""
        metrics, _ = self.evaluator.evaluate(
            compute_metrics=True,
            step=step,
            predict_fn=functools.partial(self._predict, params),
            predict_with_aux_fn=functools.partial(self._predict, params, with_aux=True),
            score_fn=functools.partial(self._score, params),
        )
        results = metrics.result()
        for task, task_metrics in results.items():
            logging.info("step %d %s: %s", step, task, task_metrics)
        if self.summary_fn is not None:
            summary = self.summary_fn(results)
            logging.info("step %d summary: %s", step, summary)
            if self.is_chief:  # rewritten whole, as seqio's JSONLogger does: object stores cannot append
                earlier = ""
                if tf.io.gfile.exists(self.summary_path):
                    with tf.io.gfile.GFile(self.summary_path) as f:
                        earlier = f.read()
                with tf.io.gfile.GFile(self.summary_path, "w") as f:
                    f.write(earlier + json.dumps({"step": step, **summary}) + "\n")
        return results

    def close(self) -> None:
        self.evaluator.close()

    def _predict(self, params, dataset, model_feature_shapes=None, *, with_aux=False):
        del model_feature_shapes
        indices_and_tokens, scores = [], []
        base_rng = jax.random.PRNGKey(self.seed)
        for i, (indices, batch) in enumerate(padded_batches(dataset, self.batch_size)):
            batch = {k: batch[k] for k in PREDICT_FEATURES}
            tokens, batch_scores = self.predictor.predict(params, batch, jax.random.fold_in(base_rng, i))
            tokens, batch_scores = host_value(tokens), host_value(batch_scores)
            for row, index in enumerate(indices):
                # Whole rows (seqio stacks them into one array); the vocabulary's decode stops at EOS.
                indices_and_tokens.append((int(index), tokens[row]))
                scores.append(float(batch_scores[row]))
        return (indices_and_tokens, {"scores": scores}) if with_aux else indices_and_tokens

    def _score(self, params, dataset, model_feature_shapes=None):
        del model_feature_shapes
        indices_and_scores = []
        for indices, batch in padded_batches(dataset, self.batch_size):
            scores = host_value(self.predictor.score(params, {k: batch[k] for k in SCORE_FEATURES}))
            indices_and_scores.extend((int(index), float(scores[row])) for row, index in enumerate(indices))
        return indices_and_scores


# ---- the entry point --------------------------------------------------------------------------------------


def evaluate(
    *,
    model: models.EncoderDecoderModel,
    dataset_cfg: data.DatasetConfig,
    partitioner: partitioning.Partitioner,
    checkpoint_path: str,
    output_dir: str,
    decoding_config: decoding.DecodingConfig | None = None,
    num_examples: int | None = None,
    wait_for_new_checkpoints_secs: float | None = None,
    poll_interval_secs: float = 10.0,
    seed: int = 0,
    summary_fn: Callable[[dict[str, dict[str, Any]]], dict[str, Any]] | None = None,
) -> dict[int, dict[str, dict[str, Any]]]:
    """Evaluates the checkpoint(s) at `checkpoint_path`; returns {step: {task: {metric: value}}}.

    Args:
      checkpoint_path: a step directory, or a checkpoint / model directory whose every step is evaluated.
      wait_for_new_checkpoints_secs: after the last step, keep polling the directory for newer steps, and stop
        once none has appeared for this long; None stops at once.
      poll_interval_secs: how often to look for new steps while waiting.
      others: as `InferenceEvaluator`.
    """
    # Everything that can fail on bad input happens before the first compile.
    tasks = eval_tasks(dataset_cfg.mixture_or_task_name, dataset_cfg.split, model_vocab_size=model.config.vocab_size)
    steps = checkpoint_steps(checkpoint_path)
    eos_id = tasks[0].output_features["targets"].vocabulary.eos_id
    predictor = predictor_lib.Predictor(model, partitioner, decoding_config=decoding_config, eos_id=eos_id)
    predictor.check_batch_size(dataset_cfg.batch_size)
    first_step, first_directory = steps[0]
    params = restore_params(predictor, first_directory)
    evaluator = InferenceEvaluator(
        dataset_cfg, model, partitioner, output_dir, num_examples=num_examples, predictor=predictor, seed=seed,
        summary_fn=summary_fn,
    )

    results: dict[int, dict[str, dict[str, Any]]] = {}
    evaluated: set[int] = set()
    waited_since = time.time()
    while True:
        for step, directory in steps:
            if step in evaluated:
                continue
            if params is None:
                params = restore_params(predictor, directory)
            logging.info("Evaluating step %d (%s)", step, directory)
            results[step] = evaluator.evaluate(params, step)
            evaluated.add(step)
            params = None
            waited_since = time.time()
        if wait_for_new_checkpoints_secs is None or epath.Path(checkpoint_path, checkpoints.STATE_ITEM).is_dir():
            break
        if time.time() - waited_since > wait_for_new_checkpoints_secs:
            logging.info("No new checkpoint in %s for %.0f s; stopping.", checkpoint_path, wait_for_new_checkpoints_secs)
            break
        time.sleep(poll_interval_secs)
        steps = checkpoint_steps(checkpoint_path)
    evaluator.close()
    return results


def run_entry_point(entry_point: Callable[..., Any], required_macros: Sequence[str]) -> None:
    """Parses T5X's gin flags (with the --gin.MACRO=value shorthand), checks the macros and runs `entry_point`
    as gin configures it."""
    import tasks  # noqa: F401  (registers the built-in seqio tasks)
    from t5x_lite.train import quiet_library_logs

    quiet_library_logs()
    flags.DEFINE_multi_string("gin_file", [], "gin files to parse, in order")
    flags.DEFINE_multi_string("gin_bindings", [], "individual gin bindings, applied after the files")
    flags.DEFINE_multi_string("gin_search_paths", [], "extra folders in which to look for gin files and includes")
    distributed.define_flags()
    host_memory.define_flags()

    def main(argv: Sequence[str]) -> None:
        del argv
        host_memory.keep_freed_memory_from_flags()  # before JAX starts its threads
        distributed.initialize_from_flags()  # before anything touches a device
        gin_utils.parse(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings, flags.FLAGS.gin_search_paths)
        gin_utils.check_required_macros(required_macros)
        gin.finalize()
        distributed.check_same_on_all_processes(gin.config_str(), "gin config")
        gin.get_configurable(entry_point)()

    app.run(main, argv=gin_utils.rewrite_gin_shorthand(sys.argv))


if __name__ == "__main__":
    # Run the importable module's copy, the one the gin files configure (`from t5x_lite import eval`).
    from t5x_lite import eval as eval_module

    eval_module.run_entry_point(eval_module.evaluate, REQUIRED_MACROS)
