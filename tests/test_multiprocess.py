"""Several processes, one mesh: `train` on 2 processes x 4 simulated CPU devices, talking over loopback.

The claims, each an equality within a stated tolerance:
  - 2 processes x 4 devices on a (4, 2) mesh give the losses and parameters of 1 process x 8 devices on the same
    mesh, when both read the same 2 data shards (the default for 2 processes; `num_shards=2` for the one process,
    which then reads both and concatenates them in shard order, as the two processes' halves of the batch are).
    Tolerance: rtol 1e-5 on losses, atol 1e-5 on parameters (float32; only the order of cross-device sums
    differs; measured: 2e-7 and 4e-7).
  - A checkpoint written by 2 processes resumes in 1, and one written by 1 resumes in 2, with the same losses.
  - Killing one of the two processes (SIGKILL) stops the other, non-zero, within HEARTBEAT_TIMEOUT + 15 s, with
    an error naming the dead process; restarted, the run resumes from its last checkpoint and matches the
    uninterrupted one.
  - A process that cannot reach the coordinator, or whose peers never connect, fails within its
    --initialization_timeout, saying which.
  - One pass over data shards of different lengths (evaluation) stops both processes at the same batch; a
    drawn seed is the same on both; a gin config that differs between them is an error.
  - In this process: the 1-process 2-shard batch is the 2-process batch; an iterator state saved with 2 shards
    restores into 1 by skipping, with a warning.

Every child runs with its own XLA_FLAGS device count, a free port found by binding port 0 (retried when another
program takes it first), a timeout, and is killed when the test ends. Runs share a persistent compilation cache:
the 2-process runs compile the same programs, and a 2-core machine spends most of a run compiling.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio
from jax.sharding import NamedSharding, PartitionSpec

import tasks  # noqa: F401  (registers synthetic_reverse)
from t5x_lite import data

REPO = Path(__file__).resolve().parent.parent
STEPS = 9
HEARTBEAT_TIMEOUT = 10  # s: a process silent this long counts as dead
KILL_BOUND = HEARTBEAT_TIMEOUT + 15  # s: the survivor of a kill exits within this (measured: 6-11 s)
RUN_TIMEOUT = 300  # s: any one run
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
COMMON = [
    "--gin_file=gin/models/t5_1_1/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
    "--gin.MIXTURE_OR_TASK_NAME='synthetic_reverse'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
    "--gin.BATCH_SIZE=16",
    "--gin.network.T5Config.vocab_size=384",
    "--gin.MESH_SHAPE=(4, 2)",
    "--gin.train.train.log_every_steps=1",
    "--gin.train.train.checkpoint_period=3",
    "--gin.train.train.keep_checkpoints=None",
]
TWO_DATA_SHARDS = "--gin.train/data.DatasetConfig.num_shards=2"  # what 2 processes read by default


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Run:
    """The processes of one training run, started together, each logging to its own file; killed on exit."""

    def __init__(self, model_dir, steps, num_processes, *extra, cache_dir, log_dir):
        self.model_dir, self.steps, self.num_processes, self.extra = Path(model_dir), steps, num_processes, extra
        self.cache_dir, self.log_dir = cache_dir, Path(log_dir)
        self.processes: list[subprocess.Popen] = []

    def log(self, index: int) -> str:
        return (self.log_dir / f"process_{index}.log").read_text(errors="replace")

    def start(self) -> "Run":
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // self.num_processes}",
                   JAX_COMPILATION_CACHE_DIR=str(self.cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        command = [sys.executable, "-m", "t5x_lite.train", f"--gin.MODEL_DIR='{self.model_dir}'",
                   f"--gin.TRAIN_STEPS={self.steps}", *COMMON, *self.extra]
        if self.num_processes > 1:
            command += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={self.num_processes}",
                        f"--heartbeat_timeout={HEARTBEAT_TIMEOUT}", "--shutdown_timeout=60",
                        "--initialization_timeout=120"]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.num_processes):
            with open(self.log_dir / f"process_{index}.log", "w") as log:
                process_flag = [f"--process_id={index}"] if self.num_processes > 1 else []
                self.processes.append(subprocess.Popen(command + process_flag, cwd=REPO, env=env, stdout=log,
                                                       stderr=subprocess.STDOUT))
        return self

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.processes]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run in {self.model_dir} still going after {timeout} s:\n{self.tails()}")

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    def tails(self) -> str:
        return "\n".join(f"--- process {i} ---\n{self.log(i)[-3000:]}" for i in range(len(self.processes)))

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()


def train(model_dir, steps, num_processes, *extra, cache_dir, log_dir, attempts=3) -> Run:
    """Runs to completion (all processes exit 0); starts afresh on another port when the chosen one was taken."""
    for attempt in range(attempts):
        started = time.monotonic()
        with Run(model_dir, steps, num_processes, *extra, cache_dir=cache_dir, log_dir=log_dir).start() as run:
            codes = run.wait()
        if codes == [0] * num_processes:
            print(f"{num_processes} process(es) to step {steps} in {model_dir}: {time.monotonic() - started:.0f} s")
            return run
        if "could not start the coordinator" not in run.log(0) or attempt == attempts - 1:
            raise AssertionError(f"run in {model_dir} failed with exit codes {codes}:\n{run.tails()}")


def losses_by_step(model_dir) -> dict[int, list[float]]:
    """Every logged loss per step (a resumed run logs some steps twice). A process killed mid-write may leave a
    partial last line; it is skipped."""
    out = {}
    for line in (Path(model_dir) / "train" / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.setdefault(record["step"], []).append(record["loss"])
    return out


def saved_state(model_dir, step) -> dict:
    """The train state of a checkpoint step as numpy arrays, by path."""
    directory = Path(model_dir) / "checkpoints" / str(step) / "state"
    metadata = ocp.PyTreeCheckpointHandler().metadata(directory).tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_run(got_dir, want_dir, *, from_step=1):
    """Every logged step >= from_step of `got_dir` has `want_dir`'s loss; the final states match."""
    want, got = losses_by_step(want_dir), losses_by_step(got_dir)
    assert STEPS in got, sorted(got)
    for step, values in got.items():
        if step >= from_step:
            np.testing.assert_allclose(values, [want[step][0]] * len(values), rtol=LOSS_RTOL, err_msg=f"step {step}")
    want_state, got_state = saved_state(want_dir, STEPS), saved_state(got_dir, STEPS)
    assert want_state.keys() == got_state.keys()
    for path, value in want_state.items():
        np.testing.assert_allclose(got_state[path], value, rtol=0, atol=PARAM_ATOL, err_msg=path)


def copy_checkpoint(source_dir, step, target_dir):
    shutil.copytree(Path(source_dir) / "checkpoints" / str(step), Path(target_dir) / "checkpoints" / str(step))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compilation_cache")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, cache_dir):
    """The reference: 2 processes x 4 devices, from scratch, STEPS steps."""
    model_dir = tmp_path_factory.mktemp("two_processes")
    return train(model_dir / "run", STEPS, 2, cache_dir=cache_dir, log_dir=model_dir / "logs")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    """1 process x 8 devices reading the same 2 data shards, from scratch, STEPS steps."""
    model_dir = tmp_path_factory.mktemp("one_process")
    return train(model_dir / "run", STEPS, 1, TWO_DATA_SHARDS, cache_dir=cache_dir, log_dir=model_dir / "logs")


def test_two_processes_train_like_one(two_processes, one_process):
    assert sorted(losses_by_step(two_processes.model_dir)) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in losses_by_step(two_processes.model_dir).values()), "metrics written once"
    assert_same_run(two_processes.model_dir, one_process.model_dir)
    # Files and INFO logs come from process 0 only; both processes read only their own data shard.
    for name in ["config.gin", "operative_config.gin", "model-info.txt"]:
        assert (two_processes.model_dir / name).exists(), name
    assert "[process 0/2] Initialised from scratch" in two_processes.log(0)
    assert "Initialised from scratch" not in two_processes.log(1)
    shard_files = sorted(p.name for p in (two_processes.model_dir / "checkpoints" / "3" / "data_iterator").iterdir())
    assert {"shard_00000-of-00002.json", "shard_00001-of-00002.json"} <= set(shard_files)


def test_checkpoint_of_two_processes_resumes_in_one(two_processes, cache_dir, tmp_path):
    copy_checkpoint(two_processes.model_dir, 3, tmp_path / "run")
    run = train(tmp_path / "run", STEPS, 1, TWO_DATA_SHARDS, cache_dir=cache_dir, log_dir=tmp_path / "logs")
    assert "Resumed from step 3" in run.log(0)
    assert min(losses_by_step(run.model_dir)) == 4
    assert_same_run(run.model_dir, two_processes.model_dir)


def test_killed_process_stops_the_other_and_the_restart_resumes(two_processes, one_process, cache_dir, tmp_path):
    """Starts 2 processes from the 1-process run's step-3 checkpoint; once they have written step 6, SIGKILLs
    process 1: process 0 must exit non-zero within KILL_BOUND naming it. Both restarted resume from the last
    checkpoint; every logged step equals the uninterrupted 2-process run's."""
    model_dir = tmp_path / "run"
    copy_checkpoint(one_process.model_dir, 3, model_dir)
    with Run(model_dir, 1000, 2, cache_dir=cache_dir, log_dir=tmp_path / "killed_logs").start() as run:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (model_dir / "checkpoints" / "6").exists():
            assert all(p.poll() is None for p in run.processes), f"a process ended early:\n{run.tails()}"
            assert time.monotonic() < deadline, f"no step-6 checkpoint after {RUN_TIMEOUT} s:\n{run.tails()}"
            time.sleep(0.05)
        run.processes[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = run.processes[0].wait(timeout=KILL_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process 0 still running {KILL_BOUND} s after process 1 was killed:\n{run.tails()}")
        stopped_after = time.monotonic() - killed_at
    assert code != 0
    assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1\b", run.log(0)), run.tails()
    print(f"process 0 stopped {stopped_after:.1f} s after process 1 was killed (exit code {code})")

    restarted = train(model_dir, STEPS, 2, cache_dir=cache_dir, log_dir=tmp_path / "restart_logs")
    resumed = re.search(r"Resumed from step (\d+)", restarted.log(0))
    assert resumed and int(resumed.group(1)) >= 6, restarted.log(0)[-3000:]
    assert min(losses_by_step(model_dir)) == 4  # the killed run resumed from the 1-process checkpoint at step 3
    assert_same_run(model_dir, two_processes.model_dir)


def test_unreachable_coordinator_and_missing_peers_fail_within_the_timeout():
    """Process 1 with no coordinator listening: a ConnectionError naming the address. Process 0 whose peer never
    comes: exit status 1 saying so. Both within --initialization_timeout=3 s (plus start-up)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    commands = [[sys.executable, "-c", (
        "from t5x_lite import distributed\n"
        f"distributed.initialize(distributed.DistributedConfig(coordinator_address={address!r}, num_processes=2, "
        f"process_id={process_id}, initialization_timeout=3))\n")] for process_id, address in [(1, addresses[0]),
                                                                                             (0, addresses[1])]]
    started = time.monotonic()
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for command in commands]
    try:
        worker_output, coordinator_output = [p.communicate(timeout=120)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - started
    assert processes[0].returncode != 0
    assert (f"ConnectionError: Process 1 of 2 could not reach the coordinator at {addresses[0]} within 3 s"
            in worker_output), worker_output[-2000:]
    assert processes[1].returncode == 1
    assert (f"Process 0 of 2 started the coordinator at {addresses[1]}, but not all 2 processes connected within 3 s"
            in coordinator_output), coordinator_output[-2000:]
    assert elapsed < 30, f"took {elapsed:.0f} s"


TWO_PROCESS_CHECKS = """
import sys
from t5x_lite import distributed
distributed.initialize(distributed.DistributedConfig(coordinator_address=sys.argv[1], num_processes=2,
                                                     process_id=int(sys.argv[2]), heartbeat_timeout=10))
import jax
import tasks
from jax.sharding import NamedSharding, PartitionSpec
from t5x_lite import data
sharding = NamedSharding(jax.make_mesh((4, 2), ("data", "model")), PartitionSpec("data", None))
config = data.DatasetConfig("synthetic_reverse", {"inputs": 32, "targets": 32}, split="validation", batch_size=16,
                            shuffle=False)
own_shard = sum(1 for _ in config.dataset(repeat=False))  # this process's shard alone
weight = jax.jit(lambda batch: batch["decoder_loss_weights"].sum())  # a computation over both processes' devices
weights = [float(weight(batch)) for batch in data.GlobalBatchIterator.from_config(config, sharding, repeat=False)]
print("BATCHES", own_shard, len(weights), sum(weights), flush=True)
print("SEED", distributed.same_seed_on_all_processes(None), flush=True)
try:
    distributed.check_same_on_all_processes(f"text of process {sys.argv[2]}", "test text")
except ValueError as error:
    print("CHECK", error, flush=True)
"""


def test_uneven_shards_stop_together_and_processes_share_the_seed():
    """Packed, the validation split's 2 shards give different numbers of batches: in one pass both processes
    must stop after the shorter one (a process going on alone would wait forever in the next computation). A seed
    drawn on process 0 reaches both; a text that differs between the processes is an error on both."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    address = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_CHECKS, address, str(i)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [re.search(r"BATCHES (\d+) (\d+) ([\d.]+)", output) for output in outputs]
    assert all(results), "\n".join(output[-2000:] for output in outputs)
    shard_lengths = [int(r.group(1)) for r in results]
    assert shard_lengths[0] != shard_lengths[1], f"the test needs shards of different lengths: {shard_lengths}"
    assert [int(r.group(2)) for r in results] == [min(shard_lengths)] * 2
    assert results[0].group(3) == results[1].group(3)
    seeds = [re.search(r"SEED (\d+)", output).group(1) for output in outputs]
    assert seeds[0] == seeds[1], seeds
    for output in outputs:
        assert "CHECK The test text of process(es) [1] differs from process 0's" in output, output[-2000:]


def test_incomplete_or_inconsistent_settings_are_named():
    from t5x_lite import distributed

    distributed.initialize(distributed.DistributedConfig())  # one process: nothing to do
    with pytest.raises(ValueError, match="missing: --coordinator_address, --process_id"):
        distributed.initialize(distributed.DistributedConfig(num_processes=2))
    with pytest.raises(ValueError, match=r"--process_id=2 must be in 0 \.\. 1"):
        distributed.initialize(distributed.DistributedConfig(coordinator_address="10.0.0.1:8476", num_processes=2,
                                                             process_id=2))
    with pytest.raises(ValueError, match="'10.0.0.1' must be host:port"):
        distributed.initialize(distributed.DistributedConfig(coordinator_address="10.0.0.1", num_processes=2,
                                                             process_id=1))


# The data layout, in this process (8 devices): what makes the 2-process batches equal the 1-process ones.


@pytest.fixture
def batch_sharding():
    return NamedSharding(jax.make_mesh((4, 2), ("data", "model")), PartitionSpec("data", None))


def _config(**overrides):
    kwargs = {"batch_size": 16, "seed": 3, **overrides}
    return data.DatasetConfig("synthetic_reverse", {"inputs": 32, "targets": 32}, **kwargs)


def _numpy(batch):
    return {name: np.asarray(value) for name, value in batch.items()}


def test_one_process_reading_two_shards_builds_the_two_process_batch(batch_sharding):
    """With num_shards=2 one process's global batch is [shard 0's batch; shard 1's batch]: the rows that process 0
    and process 1 of a 2-process run read (each ShardInfo(i, 2), 8 rows)."""
    iterator = data.GlobalBatchIterator.from_config(_config(num_shards=2), batch_sharding)
    halves = [_config().dataset(shard_info=seqio.ShardInfo(i, 2)).as_numpy_iterator() for i in range(2)]
    for _ in range(3):
        got = _numpy(next(iterator))
        shard_batches = [next(half) for half in halves]
        for name, value in got.items():
            assert value.shape == (16, 32)
            np.testing.assert_array_equal(value, np.concatenate([b[name] for b in shard_batches]), err_msg=name)


def test_iterator_state_restores_under_another_shard_count_by_skipping(tmp_path, batch_sharding, caplog):
    """Saved with 2 data shards, restored with 1: the train state is unaffected; the pipeline restarts and skips
    the batches read, with a warning, and continues as a 1-shard run would at that position."""
    saved = data.GlobalBatchIterator.from_config(_config(num_shards=2), batch_sharding)
    for _ in range(3):
        next(saved)
    saved.save(str(tmp_path))
    expected = [_numpy(next(saved)) for _ in range(2)]
    same_layout = data.GlobalBatchIterator.from_config(_config(num_shards=2), batch_sharding)
    same_layout.restore(str(tmp_path))
    for want in expected:
        got = _numpy(next(same_layout))
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    one_shard = data.GlobalBatchIterator.from_config(_config(), batch_sharding)
    fresh = data.GlobalBatchIterator.from_config(_config(), batch_sharding)
    with caplog.at_level("WARNING"):
        one_shard.restore(str(tmp_path))
    assert "saved with 2 data shards; this run has 1 (1 per process)" in caplog.text
    assert one_shard.batches_read == 3
    for _ in range(3):
        next(fresh)
    for _ in range(2):
        want, got = _numpy(next(fresh)), _numpy(next(one_shard))
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_batch_that_does_not_split_over_the_mesh_is_named(batch_sharding):
    with pytest.raises(ValueError, match=r"global batch size 6 does not split evenly .* multiple of 4, e\.g\. 4 or 8"):
        data.GlobalBatchIterator.from_config(_config(batch_size=6), batch_sharding)
    with pytest.raises(ValueError, match=r"global_batch_size 20 must be a positive multiple of the number of data "
                                         r"shards \(processes\) 8"):
        data.GlobalBatchIterator.from_config(_config(batch_size=20, num_shards=8), batch_sharding)
