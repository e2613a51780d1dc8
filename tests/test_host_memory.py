"""host_memory: after keep_freed_memory(), a train step's buffers reuse the pages freed by the step before.

Each case runs in a fresh process (malloc's settings are per process and must come before JAX's threads) that
imports tensorflow and seqio first, as the entry points do, and counts the minor page faults (getrusage) of each of
STEPS train steps of a tiny model at a batch large enough (32 x 512/128) that XLA's buffers are mmapped by
default:
  - by default every step faults its buffers in afresh (about 63,600 pages of 4 KiB here);
  - after keep_freed_memory() the median step faults in under 2% of that. Not every step: now and then a freed
    block can't take the next one (malloc's alignment padding) and the heap grows once more (measured: 0-1 of 8).
"""
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from t5x_lite import host_memory

REPO = Path(__file__).resolve().parent.parent
STEPS = 8

CHILD = """
import json, resource, sys
import tensorflow, seqio  # as the entry points do, before anything else
from t5x_lite import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, optax
from t5x_lite import models, partitioning, trainer
from tests import helpers
train = trainer.Trainer(models.EncoderDecoderModel(helpers.TINY), partitioning.Partitioner((1, 1)), optax.sgd(0.1))
state = train.init_state()
batch = jax.device_put(helpers.random_batch(batch_size=32, inputs_length=512, targets_length=128))
faults = []
for _ in range(int(sys.argv[2]) + 1):  # the first step compiles
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, metrics = train.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults[1:]}))
"""


def step_page_faults(mode):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(STEPS)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt's settings are glibc's")
def test_train_steps_reuse_freed_pages():
    default, kept = step_page_faults("default"), step_page_faults("keep")
    assert kept["kept"] and not default["kept"]
    assert min(default["faults"]) > 50_000, default
    assert statistics.median(kept["faults"]) < 0.02 * statistics.median(default["faults"]), (kept, default)


def test_only_where_jax_runs_on_the_cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.jax_runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.jax_runs_on_cpu()


def test_flag_turns_it_off(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for argv, kept in ((["--keep_freed_host_memory=false"], False), ([], True)):
        flag_values = flags.FlagValues()
        host_memory.define_flags(flag_values)
        flag_values(["prog", *argv])
        assert host_memory.keep_freed_memory_from_flags(flag_values) is kept
    assert calls == [1]
