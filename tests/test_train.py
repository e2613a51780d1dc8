"""The `train` entry point end to end: resume after a kill, fine-tuning, restore across meshes, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, gin_utils, models, optimizers, partitioning, trainer
from tests.helpers import TINY, random_batch

REPO = Path(__file__).resolve().parent.parent
TINY_GIN = "gin/models/t5_1_1/tiny.gin"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The synthetic tasks use the byte vocabulary (259 ids): a 384-entry table keeps the tiny model tiny.
COMMON = [
    "--gin.MIXTURE_OR_TASK_NAME='synthetic_reverse'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
    "--gin.BATCH_SIZE=16",
    "--gin.network.T5Config.vocab_size=384",
    "--gin.train.train.log_every_steps=1",
    "--gin.train.train.checkpoint_period=3",
]


def train_command(model_dir, steps, *extra, run_gin="gin/runs/pretrain.gin"):
    return [
        sys.executable, "-m", "t5x_lite.train", f"--gin_file={TINY_GIN}", f"--gin_file={run_gin}",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}", *COMMON, *extra,
    ]


def run_train(model_dir, steps, *extra, run_gin="gin/runs/pretrain.gin", check=True):
    result = subprocess.run(
        train_command(model_dir, steps, *extra, run_gin=run_gin),
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def losses_by_step(model_dir):
    """Every logged loss, per step (a resumed run logs some steps twice: both must agree)."""
    out = {}
    for line in (Path(model_dir) / "train" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], []).append(record["loss"])
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    run_train(model_dir, 15)
    return model_dir


def test_a_run_writes_its_files(uninterrupted):
    for name in ["config.gin", "operative_config.gin", "model-info.txt", "train/metrics.jsonl"]:
        assert (uninterrupted / name).exists(), name
    assert list((uninterrupted / "train").glob("events.out.tfevents.*"))
    info = (uninterrupted / "model-info.txt").read_text()
    assert "decoder/layers_0/mlp/wi_0/kernel" in info and "logical_axes=('embed', 'mlp')" in info
    # tiny.gin with a 384-entry vocabulary: 2 x 384 x 64 embeddings + 2 encoder + 2 decoder layers + norms + biases.
    assert info.strip().endswith("total parameters: 247,040")
    assert "network.T5Config.vocab_size = 384" in (uninterrupted / "operative_config.gin").read_text()
    losses = losses_by_step(uninterrupted)
    assert sorted(losses) == list(range(1, 16))
    assert losses[15][0] < losses[1][0] - 0.5, "the loss falls"
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir()) == [9, 12, 15]


def test_killed_run_resumes_with_the_same_losses(uninterrupted, tmp_path):
    """SIGKILL a run after its step-3 checkpoint; the restarted run resumes from the last good checkpoint
    and every logged step equals the uninterrupted run's (same batches, same updates)."""
    model_dir = tmp_path / "killed"
    process = subprocess.Popen(train_command(model_dir, 1000), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (model_dir / "checkpoints" / "3").exists():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    resumed = run_train(model_dir, 15)
    assert "Resumed from step" in resumed.stderr
    expected = losses_by_step(uninterrupted)
    got = losses_by_step(model_dir)
    assert 15 in got
    for step, values in got.items():
        if step <= 15:
            np.testing.assert_allclose(values, [expected[step][0]] * len(values), rtol=1e-6, err_msg=f"step {step}")


def test_finetuning_starts_from_the_initial_checkpoint(uninterrupted, tmp_path):
    result = run_train(
        tmp_path / "finetune", 2,
        f"--gin.INITIAL_CHECKPOINT_PATH='{uninterrupted / 'checkpoints'}'", "--gin.DROPOUT_RATE=0.0",
        run_gin="gin/runs/finetune.gin",
    )
    assert "Initialised parameters from" in result.stderr
    first_finetune_loss = losses_by_step(tmp_path / "finetune")[1][0]
    first_scratch_loss = losses_by_step(uninterrupted)[1][0]
    last_pretrain_loss = losses_by_step(uninterrupted)[15][0]
    assert first_finetune_loss < first_scratch_loss - 0.5
    assert abs(first_finetune_loss - last_pretrain_loss) < 0.5


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    """A train state saved on mesh (4, 2) restores onto (2, 4) and onto one device with identical values."""
    model = models.EncoderDecoderModel(TINY)
    source = trainer.Trainer(model, partitioning.Partitioner((4, 2)), optimizers.adafactor)
    state = source.init_state()
    batch = jax.device_put(random_batch(), source.partitioner.batch_sharding)
    state, _ = source.train_step(state, batch)
    with checkpoints.Checkpointer(str(tmp_path), save_interval_steps=1) as checkpointer:
        checkpointer.save(1, state.as_dict())
    saved = jax.device_get(state.as_dict())
    for mesh_shape in [(2, 4), (1, 1)]:
        devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
        target = trainer.Trainer(model, partitioning.Partitioner(mesh_shape, devices=devices), optimizers.adafactor)
        with checkpoints.Checkpointer(str(tmp_path), save_interval_steps=1) as checkpointer:
            restored = checkpointer.restore(target.abstract_state.as_dict())
        for got, want, sharding in zip(
            jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(target.state_shardings.as_dict())
        ):
            np.testing.assert_array_equal(np.asarray(got), want)
            assert got.sharding == sharding


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_missing_required_macro_is_named(clean_gin):
    gin_utils.parse([TINY_GIN, "gin/runs/pretrain.gin"], ["TRAIN_STEPS = 3", "MIXTURE_OR_TASK_NAME = 'synthetic_reverse'"])
    with pytest.raises(ValueError, match="MODEL_DIR"):
        gin_utils.check_required_macros(("MODEL_DIR", "TRAIN_STEPS", "MIXTURE_OR_TASK_NAME"))


def test_finetune_requires_the_initial_checkpoint(clean_gin):
    gin_utils.parse([TINY_GIN, "gin/runs/finetune.gin"], ["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 3"])
    with pytest.raises(ValueError, match="INITIAL_CHECKPOINT_PATH"):
        gin_utils.check_required_macros(("MODEL_DIR",), optional=("INITIAL_CHECKPOINT_PATH",))


def test_a_runs_folder_in_the_working_directory_does_not_break_includes(clean_gin, tmp_path, monkeypatch):
    """finetune.gin includes 'runs/pretrain.gin', which gin also looks up as package `runs`: a plain runs/ folder
    where Python looks for packages (here the working directory, as after `make demo`) must not make that fail."""
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    gin_utils.parse([os.path.join(REPO_ROOT, TINY_GIN), "runs/finetune.gin"], ["MODEL_DIR = '/tmp/x'"])
    assert gin.query_parameter("%MODEL_DIR") == "/tmp/x"


def test_unknown_binding_is_named(clean_gin):
    with pytest.raises(ValueError, match="bogus_width"):
        gin_utils.parse([TINY_GIN], ["network.T5Config.bogus_width = 3"])
    with pytest.raises(FileNotFoundError, match="no_such.gin"):
        gin_utils.parse(["gin/models/no_such.gin"], [])


def test_command_line_errors_come_before_any_compile(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "t5x_lite.train", f"--gin_file={TINY_GIN}", "--gin_file=gin/runs/pretrain.gin",
         "--gin.TRAIN_STEPS=3", *COMMON],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode != 0 and "required gin macro(s) not set: MODEL_DIR" in missing.stderr
    unknown_task = run_train(tmp_path / "x", 3, "--gin.MIXTURE_OR_TASK_NAME='synthetic_revers'", check=False)
    assert unknown_task.returncode != 0
    assert "No seqio Task or Mixture is registered as 'synthetic_revers'" in unknown_task.stderr
    assert "synthetic_reverse" in unknown_task.stderr  # the close match is suggested
    assert not (tmp_path / "x" / "checkpoints").exists()
