r"""A complete experiment in one gin file: pre-train, fine-tune, evaluate; then a table and a plot.

    python -m t5x_lite.experiment --gin_file=gin/experiments/bios_demo.gin

The closed-book QA recipe in miniature (`make demo` runs it on the built-in knowledge base): pre-train on a
mixture (e.g. salient span masking of every biography plus set A's questions), fine-tune on set A's
questions, and measure exact match on the questions of set A and of set B (people the model only read
about), after pre-training and after fine-tuning. Each stage writes into its own folder of MODEL_DIR
(pretrain/, finetune/, eval/<stage>/<split>/) and resumes from
its checkpoints when the experiment is started again; a finished stage is not repeated.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import optax
import tensorflow as tf
from absl import logging

from t5x_lite import accounting, data, decoding, eval as eval_lib, models, partitioning, train as train_lib


def _final_loss(model_dir: str) -> float | None:
    path = os.path.join(model_dir, "train", "metrics.jsonl")
    if not tf.io.gfile.exists(path):
        return None
    lines = tf.io.gfile.GFile(path).read().splitlines()
    return json.loads(lines[-1])["loss"] if lines else None


def _loss_curve(model_dir: str) -> tuple[list[int], list[float]]:
    path = os.path.join(model_dir, "train", "metrics.jsonl")
    by_step = {}
    for line in tf.io.gfile.GFile(path).read().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss"]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot(path: str, stages: Mapping[str, str], scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
    """Loss curves of the training stages and exact match per question set after each stage, as a PNG.

    `scores` maps an evaluation (e.g. "after fine-tuning") to {question set: {"em": ..., ...}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, bars) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for name, model_dir in stages.items():
        steps, values = _loss_curve(model_dir)
        losses.plot([offset + s for s in steps], values, marker=".", label=name)
        offset += steps[-1] if steps else 0
    losses.set_xlabel("step (stages one after another)")
    losses.set_ylabel("training loss per target token")
    losses.set_yscale("log")
    losses.legend()
    labels = list(next(iter(scores.values())))
    width = 0.8 / len(scores)
    for i, (stage, by_label) in enumerate(scores.items()):
        positions = [j + (i - (len(scores) - 1) / 2) * width for j in range(len(labels))]
        ems = [by_label[label]["em"] for label in labels]
        bars.bar(positions, ems, width, label=stage)
        for x, em in zip(positions, ems):
            bars.text(x, em + 1, f"{em:.1f}", ha="center")
    bars.set_xticks(range(len(labels)), [f"questions about {label}" for label in labels])
    bars.set_ylabel("exact match (%)")
    bars.set_ylim(0, 105)
    bars.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(
    *,
    model: models.EncoderDecoderModel,
    partitioner: partitioning.Partitioner,
    model_dir: str,
    pretrain_dataset_cfg: data.DatasetConfig,
    pretrain_steps: int,
    pretrain_optimizer: Callable[..., optax.GradientTransformation],
    finetune_dataset_cfg: data.DatasetConfig,
    finetune_steps: int,
    finetune_optimizer: Callable[..., optax.GradientTransformation],
    eval_task: str,
    eval_splits: Sequence[str] = ("validation_a", "validation"),
    eval_split_names: Sequence[str] = ("set A", "set B"),
    eval_batch_size: int = 64,
    max_decode_length: int = 16,
    log_every_steps: int = 50,
    checkpoint_period: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the stages and returns the summary (also written to MODEL_DIR/summary.json and printed)."""
    start = time.time()
    stage_dirs = {"pre-training": os.path.join(model_dir, "pretrain"), "fine-tuning": os.path.join(model_dir, "finetune")}
    summary: dict[str, Any] = {"stages": {}, "eval": {}}

    def train_stage(name, dataset_cfg, steps, optimizer, initial_checkpoint_path=None):
        stage_start = time.time()
        state = train_lib.train(
            model=model,
            train_dataset_cfg=dataset_cfg,
            partitioner=partitioner,
            model_dir=stage_dirs[name],
            total_steps=steps,
            optimizer=optimizer,
            log_every_steps=log_every_steps,
            checkpoint_period=checkpoint_period,
            initial_checkpoint_path=initial_checkpoint_path,
            initial_checkpoint_restore="params",  # each stage counts its own steps from 0 (summary: steps, FLOPs)
            seed=seed,
        )
        lengths = dataset_cfg.task_feature_lengths
        summary["stages"][name] = {
            "steps": steps,
            "seconds": time.time() - stage_start,
            "training_flops": steps * accounting.train_flops_per_step(
                model.config, dataset_cfg.batch_size, lengths["inputs"], lengths["targets"]
            ),
            "final_loss": _final_loss(stage_dirs[name]),
        }
        return state

    eval_seconds = 0.0

    def evaluate(name, state):
        """Scores `state` on every eval split into summary["eval"]["after <name>"] (files in eval/<stage folder>/)."""
        nonlocal eval_seconds
        eval_start = time.time()
        scores = summary["eval"][f"after {name}"] = {}
        for split, label in zip(eval_splits, eval_split_names):
            evaluator = eval_lib.InferenceEvaluator(
                data.DatasetConfig(eval_task, None, split=split, batch_size=eval_batch_size, shuffle=False, pack=False),
                model,
                partitioner,
                os.path.join(model_dir, "eval", os.path.basename(stage_dirs[name]), split),
                decoding_config=decoding.DecodingConfig(max_decode_length=max_decode_length),
                seed=seed,
            )
            results = evaluator.evaluate(state.params, int(jax.device_get(state.step)))
            evaluator.close()
            scores[label] = results[eval_task]
        eval_seconds += time.time() - eval_start

    # Both stages are evaluated: fine-tuning on set A's questions can cost set B what pre-training gave it.
    evaluate("pre-training", train_stage("pre-training", pretrain_dataset_cfg, pretrain_steps, pretrain_optimizer))
    evaluate("fine-tuning", train_stage(
        "fine-tuning", finetune_dataset_cfg, finetune_steps, finetune_optimizer,
        initial_checkpoint_path=os.path.join(stage_dirs["pre-training"], "checkpoints"),
    ))
    summary["stages"]["evaluation"] = {"seconds": eval_seconds}
    summary["total_seconds"] = time.time() - start

    if jax.process_index() == 0:
        with tf.io.gfile.GFile(os.path.join(model_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot(os.path.join(model_dir, "demo.png"), stage_dirs, summary["eval"])
        print(format_summary(summary, model_dir))
    return summary


def format_summary(summary: Mapping[str, Any], model_dir: str) -> str:
    lines = ["", f"{'stage':<14}{'steps':>7}{'time':>9}{'train FLOPs':>14}{'final loss':>12}"]
    for name, stage in summary["stages"].items():
        if "steps" in stage:
            lines.append(
                f"{name:<14}{stage['steps']:>7}{stage['seconds']:>8.0f}s{stage['training_flops']:>14.3g}"
                f"{stage['final_loss']:>12.3f}"
            )
        else:
            lines.append(f"{name:<14}{'':>7}{stage['seconds']:>8.0f}s")
    lines.append("")
    stages = list(summary["eval"])
    labels = list(summary["eval"][stages[0]])
    lines.append(f"{'':<16}" + "".join(f"{stage:>18}" for stage in stages))
    lines.append(f"{'questions about':<16}" + f"{'EM':>10}{'F1':>8}" * len(stages))
    for label in labels:
        lines.append(f"{label:<16}" + "".join(
            f"{summary['eval'][stage][label]['em']:>10.1f}{summary['eval'][stage][label]['f1']:>8.1f}" for stage in stages))
    lines.append("")
    lines.append(f"total {summary['total_seconds']:.0f} s; TensorBoard logs, summary.json and demo.png in {model_dir}")
    return "\n".join(lines)


if __name__ == "__main__":
    from t5x_lite import experiment as experiment_module

    eval_lib.run_entry_point(experiment_module.run, required_macros=("MODEL_DIR",))
