"""The built-in experiment end to end on a very small knowledge base: every stage runs and writes its outputs."""
import json

import gin
import pytest
import seqio

import tasks  # noqa: F401  (registers the built-in knowledge base's tasks)
from t5x_lite import data, experiment, gin_utils, models, network, optimizers, partitioning
from tasks import bios


def test_pretrain_finetune_evaluate_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("T5X_LITE_CACHE_DIR", str(tmp_path / "cache"))
    bios.register_bios_tasks(num_people=24, seed=1, prefix="bios_e2e")
    try:
        config = network.T5Config(vocab_size=1152, emb_dim=32, num_heads=8, head_dim=4, mlp_dim=64,
                                  num_encoder_layers=1, num_decoder_layers=1)
        dataset = lambda name, lengths: data.DatasetConfig(name, lengths, batch_size=16, seed=0)
        summary = experiment.run(
            model=models.EncoderDecoderModel(config),
            partitioner=partitioning.Partitioner((8, 1)),
            model_dir=str(tmp_path / "run"),
            pretrain_dataset_cfg=dataset("bios_e2e_pretrain_ssm_qa", {"inputs": 136, "targets": 56}),
            pretrain_steps=30,
            pretrain_optimizer=lambda logical_axes: optimizers.adafactor(0.01, logical_axes),
            finetune_dataset_cfg=dataset("bios_e2e_cbqa", {"inputs": 32, "targets": 16}),
            finetune_steps=4,
            finetune_optimizer=lambda logical_axes: optimizers.adafactor(0.001, logical_axes),
            eval_task="bios_e2e_cbqa",
            eval_batch_size=16,
            max_decode_length=8,
            log_every_steps=5,
            checkpoint_period=30,
        )
    finally:
        for name in ("cbqa", "ssm", "span_corruption"):
            seqio.TaskRegistry.remove(f"bios_e2e_{name}")
        for mixture in ("pretrain_ssm_qa", "pretrain_span_corruption_qa"):
            seqio.MixtureRegistry.remove(f"bios_e2e_{mixture}")
    run = tmp_path / "run"
    assert (run / "demo.png").stat().st_size > 0
    assert json.loads((run / "summary.json").read_text())["eval"] == summary["eval"]
    assert set(summary["eval"]) == {"after pre-training", "after fine-tuning"}
    for scores in summary["eval"].values():
        assert set(scores) == {"set A", "set B"} and all("em" in m and "f1" in m for m in scores.values())
    for stage in ("pretrain", "finetune"):
        for split in ("validation", "validation_a"):
            assert list((run / "eval" / stage / split).glob("bios_e2e_cbqa-*.jsonl"))
    table = experiment.format_summary(summary, str(run))
    set_b = summary["eval"]["after fine-tuning"]["set B"]
    assert f"{set_b['em']:.1f}" in table.splitlines()[-3]
    losses = [json.loads(line)["loss"] for line in (run / "pretrain" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
    assert (run / "finetune" / "checkpoints" / "4").is_dir()
    assert summary["stages"]["pre-training"]["training_flops"] > 0


@pytest.mark.parametrize("gin_file, mixture, lengths", [
    ("gin/experiments/bios_demo.gin", "bios_pretrain_ssm_qa", {"inputs": 136, "targets": 56}),
    ("gin/experiments/bios_span_corruption.gin", "bios_pretrain_span_corruption_qa", {"inputs": 128, "targets": 29}),
])
def test_experiment_gin_files_differ_only_in_the_pretraining_objective(gin_file, mixture, lengths):
    gin.clear_config()
    try:
        gin_utils.parse([gin_file], [])
        with gin.config_scope("pretrain"):
            pretrain = gin.get_configurable(data.DatasetConfig)()
        with gin.config_scope("finetune"):
            finetune = gin.get_configurable(data.DatasetConfig)()
        assert (pretrain.mixture_or_task_name, pretrain.task_feature_lengths) == (mixture, lengths)
        assert finetune.mixture_or_task_name == "bios_cbqa"
        assert gin.query_parameter("experiment.run.eval_task") == "bios_cbqa"
        assert gin.query_parameter("%PRETRAIN_STEPS") == 600
    finally:
        gin.clear_config()
    if mixture == "bios_pretrain_ssm_qa":  # every biography's six masked values fit the targets
        ssm = seqio.get_mixture_or_task("bios_ssm").get_dataset(None, split="train", shuffle=False)
        assert max(len(ex["targets"]) for ex in ssm.as_numpy_iterator()) <= lengths["targets"]
