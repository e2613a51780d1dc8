"""The `train` entry point end to end: resume after a kill, fine-tuning, restore across meshes, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

import tasks  # noqa: F401  (registers synthetic_reverse for the runs in this process)
from t5x_lite import checkpoints, gin_utils, models, optimizers, partitioning, train, trainer
from tests.helpers import TINY, random_batch

REPO = Path(__file__).resolve().parent.parent
TINY_GIN = "gin/models/t5_1_1/tiny.gin"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The synthetic tasks use the byte vocabulary (259 ids): a 384-entry table keeps the tiny model tiny.
COMMON_BINDINGS = [
    "MIXTURE_OR_TASK_NAME = 'synthetic_reverse'",
    "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}",
    "BATCH_SIZE = 16",
    "network.T5Config.vocab_size = 384",
    "train.train.log_every_steps = 1",
    "train.train.checkpoint_period = 3",
]
COMMON = [f"--gin_bindings={binding}" for binding in COMMON_BINDINGS]


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


def train_in_process(model_dir, *bindings, run_gin="gin/runs/finetune.gin"):
    """`train.train` configured as `run_train` configures it, in this process (so that tests can watch it)."""
    gin.clear_config()
    try:
        gin_utils.parse([TINY_GIN, run_gin], [f"MODEL_DIR = '{model_dir}'", *COMMON_BINDINGS, *bindings])
        gin_utils.check_required_macros(train.REQUIRED_MACROS, optional=train.OPTIONAL_MACROS)
        return gin.get_configurable(train.train)()
    finally:
        gin.clear_config()


@pytest.fixture
def first_states(monkeypatch):
    """(trainer, host copy of the state) that each Trainer's first train step is given, one per run."""
    seen = []
    train_step = trainer.Trainer.train_step

    def recording_train_step(self, state, batch):
        if not any(recorded is self for recorded, _ in seen):
            seen.append((self, jax.device_get(state)))
        return train_step(self, state, batch)

    monkeypatch.setattr(trainer.Trainer, "train_step", recording_train_step)
    return seen


def saved_state(checkpoint_directory, step, on_trainer):
    """Checkpoint `step` of `checkpoint_directory` as host arrays, read onto `on_trainer`'s abstract state."""
    with checkpoints.Checkpointer(str(checkpoint_directory), save_interval_steps=1) as checkpointer:
        return jax.device_get(checkpointer.restore(on_trainer.abstract_state.as_dict(), step=step))


def checkpoint_steps(model_dir):
    return sorted(int(p.name) for p in (Path(model_dir) / "checkpoints").iterdir() if p.name.isdigit())


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


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


def test_finetuning_from_params_starts_at_step_0_with_a_fresh_optimizer_state(uninterrupted, tmp_path, first_states):
    """finetune.gin's default, INITIAL_CHECKPOINT_RESTORE='params': the newest checkpoint's parameters, a fresh
    optimizer state, step 0; TRAIN_STEPS counts the fine-tuning steps; the loss goes on from pre-training's."""
    model_dir = tmp_path / "finetune"
    state = train_in_process(
        model_dir, "TRAIN_STEPS = 2", "DROPOUT_RATE = 0.0", f"INITIAL_CHECKPOINT_PATH = '{uninterrupted / 'checkpoints'}'"
    )
    [(finetuner, first)] = first_states
    pretrained = saved_state(uninterrupted / "checkpoints", 15, finetuner)
    assert int(first.step) == 0
    assert_trees_equal(first.params, pretrained["params"])
    assert_trees_equal(first.opt_state, jax.device_get(finetuner.optimizer.init(pretrained["params"])))
    assert int(state.step) == 2 and sorted(losses_by_step(model_dir)) == [1, 2] and checkpoint_steps(model_dir) == [2]
    first_finetune_loss = losses_by_step(model_dir)[1][0]
    assert first_finetune_loss < losses_by_step(uninterrupted)[1][0] - 0.5, "not the loss of a model from scratch"
    assert abs(first_finetune_loss - losses_by_step(uninterrupted)[15][0]) < 0.5, "the pre-trained model's loss"


def test_train_state_restore_continues_the_checkpoints_step_and_optimizer_state(uninterrupted, tmp_path, first_states):
    """'train_state' (T5X's fine-tuning): the first step trains from the checkpoint's step, parameters and optimizer
    state, and TRAIN_STEPS is absolute: 14 from step 12 is 2 steps."""
    model_dir = tmp_path / "finetune"
    state = train_in_process(
        model_dir, "TRAIN_STEPS = 14", "INITIAL_CHECKPOINT_RESTORE = 'train_state'",
        f"INITIAL_CHECKPOINT_PATH = '{uninterrupted / 'checkpoints' / '12'}'",
    )
    [(finetuner, first)] = first_states
    assert_trees_equal(first.as_dict(), saved_state(uninterrupted / "checkpoints", 12, finetuner))
    assert int(first.step) == 12
    assert int(state.step) == 14 and sorted(losses_by_step(model_dir)) == [13, 14]
    assert checkpoint_steps(model_dir) == [14]


def test_train_steps_relative_counts_from_where_the_run_started_however_often_it_restarts(uninterrupted, tmp_path):
    """TRAIN_STEPS_RELATIVE=4 from step 12 stops at 16, also when restarted after a preemption (resuming at 15) or
    after it finished (T5X would count from the step it resumed at: 19, then 20)."""
    model_dir = tmp_path / "finetune"
    bindings = (
        "TRAIN_STEPS_RELATIVE = 4", "INITIAL_CHECKPOINT_RESTORE = 'train_state'",
        f"INITIAL_CHECKPOINT_PATH = '{uninterrupted / 'checkpoints' / '12'}'",
    )
    assert int(train_in_process(model_dir, *bindings).step) == 16
    assert sorted(losses_by_step(model_dir)) == [13, 14, 15, 16] and checkpoint_steps(model_dir) == [15, 16]
    assert json.loads((model_dir / "run_start.json").read_text())["step"] == 12

    shutil.rmtree(model_dir / "checkpoints" / "16")  # preempted after step 15's checkpoint
    assert int(train_in_process(model_dir, *bindings).step) == 16
    assert checkpoint_steps(model_dir) == [15, 16] and len(losses_by_step(model_dir)[16]) == 2

    assert int(train_in_process(model_dir, *bindings).step) == 16  # finished: trains no more
    assert checkpoint_steps(model_dir) == [15, 16] and max(losses_by_step(model_dir)) == 16


def test_train_state_restore_names_an_optimizer_state_that_does_not_match(uninterrupted, tmp_path):
    """The tiny model's Adafactor state is unfactored; a run that factors it cannot take it over: the error names
    the differing leaves and 'params', and nothing is trained."""
    with pytest.raises(checkpoints.TreeMismatchError) as error:
        train_in_process(
            tmp_path / "factored", "TRAIN_STEPS = 20", "INITIAL_CHECKPOINT_RESTORE = 'train_state'",
            f"INITIAL_CHECKPOINT_PATH = '{uninterrupted / 'checkpoints'}'",
            "optimizers.adafactor.min_dim_size_to_factor = 16",
        )
    message = str(error.value)
    assert "INITIAL_CHECKPOINT_RESTORE='train_state'" in message and "INITIAL_CHECKPOINT_RESTORE='params'" in message
    assert "shape mismatches: opt_state/v/" in message and "params/" not in message
    assert not (tmp_path / "factored" / "run_start.json").exists()


@pytest.mark.parametrize("train_steps", [10, 15])
def test_train_steps_not_beyond_the_restored_step_is_named(uninterrupted, tmp_path, train_steps):
    expected = (
        rf"TRAIN_STEPS={train_steps} is not beyond step 15.*TRAIN_STEPS={15 + train_steps} for {train_steps} "
        rf"steps more, or TRAIN_STEPS_RELATIVE={train_steps}"
    )
    with pytest.raises(ValueError, match=expected):
        train_in_process(
            tmp_path / "finetune", f"TRAIN_STEPS = {train_steps}", "INITIAL_CHECKPOINT_RESTORE = 'train_state'",
            f"INITIAL_CHECKPOINT_PATH = '{uninterrupted / 'checkpoints'}'",
        )
    assert checkpoint_steps(tmp_path / "finetune") == []


def test_resuming_past_the_final_step_is_named(uninterrupted, tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, model_dir)
    with pytest.raises(ValueError, match=r"checkpoint at step 15, past the final step 10 that TRAIN_STEPS=10 gives"):
        train_in_process(model_dir, "TRAIN_STEPS = 10", run_gin="gin/runs/pretrain.gin")


@pytest.mark.parametrize("bindings, expected", [
    (["INITIAL_CHECKPOINT_RESTORE = 'optimizer'"],
     r"INITIAL_CHECKPOINT_RESTORE\) must be one of \('params', 'train_state'\); got 'optimizer'"),
    (["TRAIN_STEPS_RELATIVE = 5"], r"set one of .* got TRAIN_STEPS=3, TRAIN_STEPS_RELATIVE=5"),
    (["TRAIN_STEPS = 0"], r"TRAIN_STEPS must be an int >= 1; got 0"),
])
def test_bad_step_and_restore_settings_are_named(tmp_path, bindings, expected):
    with pytest.raises(ValueError, match=expected):
        train_in_process(tmp_path / "run", "TRAIN_STEPS = 3", *bindings, run_gin="gin/runs/pretrain.gin")


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


def test_train_steps_relative_stands_in_for_train_steps(clean_gin):
    settings = ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'x'", "INITIAL_CHECKPOINT_PATH = '/tmp/c'"]
    gin_utils.parse([TINY_GIN, "gin/runs/finetune.gin"], settings)
    with pytest.raises(ValueError, match=r"not set: TRAIN_STEPS or TRAIN_STEPS_RELATIVE; .* --gin.TRAIN_STEPS=\.\.\."):
        gin_utils.check_required_macros(train.REQUIRED_MACROS, optional=train.OPTIONAL_MACROS)
    for steps in ["TRAIN_STEPS = 100", "TRAIN_STEPS_RELATIVE = 100"]:
        gin.clear_config()
        gin_utils.parse([TINY_GIN, "gin/runs/finetune.gin"], [*settings, steps])
        gin_utils.check_required_macros(train.REQUIRED_MACROS, optional=train.OPTIONAL_MACROS)


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
