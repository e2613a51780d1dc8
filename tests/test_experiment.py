"""The built-in experiment end to end on a very small knowledge base: every stage runs and writes its outputs."""
import json

import jax
import seqio

from t5x_lite import data, experiment, models, network, optimizers, partitioning
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
            pretrain_dataset_cfg=dataset("bios_e2e_pretrain_ssm_qa", {"inputs": 128, "targets": 16}),
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
        seqio.MixtureRegistry.remove("bios_e2e_pretrain_ssm_qa")
    run = tmp_path / "run"
    assert (run / "demo.png").stat().st_size > 0
    assert json.loads((run / "summary.json").read_text())["eval"] == summary["eval"]
    assert set(summary["eval"]) == {"set A", "set B"} and all("em" in m and "f1" in m for m in summary["eval"].values())
    for split in ("validation", "validation_a"):
        assert list((run / "eval" / split).glob("bios_e2e_cbqa-*.jsonl"))
    losses = [json.loads(line)["loss"] for line in (run / "pretrain" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
    assert (run / "finetune" / "checkpoints" / "4").is_dir()
    assert summary["stages"]["pre-training"]["training_flops"] > 0
