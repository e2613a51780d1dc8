"""Several processes, one mesh: starting JAX's distributed runtime, and what the processes must agree on.

On a TPU pod or a GPU cluster one Python process runs per host (or per GPU), and `jax.distributed.initialize`
ties them into one runtime whose devices form one global mesh. The entry points call `initialize_from_flags()`
first thing in `main`, before anything touches a device:

    # explicit: the same command on every host, with its own --process_id
    python -m t5x_lite.train ... --coordinator_address=10.0.0.1:8476 --num_processes=4 --process_id=0
    # detected: SLURM, Open MPI, Cloud TPU pods and GKE tell JAX the address, the count and the id
    python -m t5x_lite.train ... --multiprocess=auto

On the CPU (tests, or a laptop) the processes exchange data over TCP with JAX's CPU collectives (gloo).

Failures are bounded, so no process hangs when another is gone:
  - A process that cannot reach the coordinator (process 0's address) raises ConnectionError, naming the
    address, after `initialization_timeout` seconds; a process whose peers do not all connect within that time
    exits with status 1, saying so.
  - When a process dies (killed, out of memory, machine lost), the others stop about `heartbeat_timeout`
    seconds later (the coordination service checks for missing heartbeats every few seconds; measured 6-11 s
    with 10 on a busy 2-core machine; tests/test_multiprocess.py allows heartbeat_timeout + 15 s). JAX's
    coordination service terminates each survivor (SIGABRT, status 134) with "The following tasks are unhealthy
    (stopped sending heartbeats): <process ids>". Losing process 0, which runs the coordination service, stops
    the others at once.
  - A process that raises an error exits at once with status 1 after printing it, instead of waiting up to
    `shutdown_timeout` seconds for the others at JAX's exit barrier; the others then stop as above.

Nothing here reads gin; `DistributedConfig` + `initialize` work from a notebook too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging as std_logging
import os
import socket
import sys
import threading
import time

import jax
import numpy as np
from absl import flags, logging


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the others (the arguments of `jax.distributed.initialize`).

    Attributes:
      multiprocess: "off" (one process, unless the three explicit settings below are given) or "auto" (ask JAX to
        detect the cluster: SLURM, Open MPI, Cloud TPU, GKE; explicit settings override what it detects).
      coordinator_address: "host:port" of process 0, where it runs the coordination service; every process gives
        the same. The port must be free on that host and reachable from the others.
      num_processes, process_id: how many processes, and which one this is (0 .. num_processes - 1).
      local_device_ids: the local devices this process uses (e.g. one GPU per process); None: all of them.
      initialization_timeout: seconds to reach the coordinator and for all processes to connect.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as dead and the others stop.
      shutdown_timeout: seconds a finishing process waits at exit for the others to finish too.
    """

    multiprocess: str = "off"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100
    shutdown_timeout: int = 300

    @property
    def explicit(self) -> dict[str, object]:
        return {name: value for name, value in [("coordinator_address", self.coordinator_address),
                                                 ("num_processes", self.num_processes),
                                                 ("process_id", self.process_id)] if value is not None}

    @property
    def enabled(self) -> bool:
        return self.multiprocess == "auto" or bool(self.explicit)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the distributed flags of the entry points (once; later calls do nothing)."""
    if "coordinator_address" in flag_values:
        return
    defaults = DistributedConfig()
    flags.DEFINE_enum("multiprocess", "off", ["off", "auto"],
                      "'auto': join a multi-process run whose coordinator address, process count and process id JAX "
                      "detects (SLURM, Open MPI, Cloud TPU pods, GKE); explicit flags override. 'off': one process, "
                      "unless --coordinator_address, --num_processes and --process_id are given.",
                      flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordination service (same for all).",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "number of processes in the run", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "this process's id, 0 .. num_processes - 1", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_list("local_device_ids", None, "local device ids this process uses (e.g. its GPU); default all",
                      flag_values=flag_values)
    flags.DEFINE_integer("initialization_timeout", defaults.initialization_timeout,
                         "seconds to reach the coordinator and for all processes to connect", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("heartbeat_timeout", defaults.heartbeat_timeout,
                         "seconds after which a silent process counts as dead and the others stop", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("shutdown_timeout", defaults.shutdown_timeout,
                         "seconds a finished process waits at exit for the others", lower_bound=1,
                         flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> DistributedConfig:
    ids = flag_values.local_device_ids
    return DistributedConfig(
        multiprocess=flag_values.multiprocess,
        coordinator_address=flag_values.coordinator_address,
        num_processes=flag_values.num_processes,
        process_id=flag_values.process_id,
        local_device_ids=tuple(int(i) for i in ids) if ids else None,
        initialization_timeout=flag_values.initialization_timeout,
        heartbeat_timeout=flag_values.heartbeat_timeout,
        shutdown_timeout=flag_values.shutdown_timeout,
    )


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`initialize(config_from_flags())`: the one line each entry point runs first in `main`."""
    initialize(config_from_flags(flag_values))


def initialize(config: DistributedConfig) -> None:
    """Joins the multi-process run described by `config` (does nothing for a single process).

    Must run before anything touches a device (jax.devices(), a computation, a device_put). On return every
    process's devices are visible to all, logging below WARNING is silenced on processes other than 0, log lines
    carry "[process i/n]", and an uncaught error ends this process at once (see the module docstring).

    Raises:
      ValueError: incomplete or inconsistent settings, or "auto" outside a cluster JAX recognises.
      ConnectionError: the coordinator could not be reached within `initialization_timeout` seconds.
      RuntimeError: JAX's devices were used before (jax.distributed.initialize says so).
    """
    if not config.enabled:
        return
    if config.multiprocess not in ("off", "auto"):
        raise ValueError(f"multiprocess={config.multiprocess!r}; valid: 'off', 'auto'")
    explicit = config.explicit
    if config.multiprocess != "auto":
        missing = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id") if name not in explicit]
        if missing:
            raise ValueError(f"A multi-process run needs --coordinator_address, --num_processes and --process_id (or "
                             f"--multiprocess=auto on SLURM, Open MPI or a TPU pod); missing: {', '.join(missing)} "
                             f"(given: {explicit}).")
        if not 0 <= config.process_id < config.num_processes:
            raise ValueError(f"--process_id={config.process_id} must be in 0 .. {config.num_processes - 1} "
                             f"(--num_processes={config.num_processes}).")
    if config.coordinator_address is not None:
        _split_address(config.coordinator_address)  # fail early on a malformed address
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process; initialize it once.")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP

    who = (f"process {config.process_id} of {config.num_processes}" if config.process_id is not None
           else "this process (id and count detected)")
    deadline = time.monotonic() + config.initialization_timeout
    if config.process_id not in (None, 0) and config.coordinator_address is not None:
        _wait_for_coordinator(config.coordinator_address, deadline, who, config.initialization_timeout)

    address = config.coordinator_address or "the detected coordinator"
    watchdog = threading.Timer(max(deadline - time.monotonic(), 1.0), _give_up_connecting,
                               args=(who, address, config.num_processes, config.initialization_timeout,
                                     config.process_id))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
            local_device_ids=list(config.local_device_ids) if config.local_device_ids else None,
            initialization_timeout=config.initialization_timeout,
            heartbeat_timeout_seconds=config.heartbeat_timeout,
            shutdown_timeout_seconds=config.shutdown_timeout,
        )
        # The backend's start exchanges every process's devices: inside the time limit too.
        num_devices, num_local_devices = jax.device_count(), jax.local_device_count()
    except ValueError as error:
        if config.multiprocess == "auto":
            raise ValueError(f"--multiprocess=auto found no cluster that JAX recognises (SLURM, Open MPI, Cloud TPU, "
                             f"GKE) to supply what was not given ({error}); give --coordinator_address, "
                             "--num_processes and --process_id instead.") from error
        raise
    except jax.errors.JaxRuntimeError as error:
        if "Failed to start RPC server" in str(error):
            raise RuntimeError(f"{who.capitalize()} could not start the coordinator at {address} ({error}): is the "
                               "port already in use on this host? Choose another port in --coordinator_address for "
                               "every process.") from error
        raise
    finally:
        watchdog.cancel()

    index, count = jax.process_index(), jax.process_count()
    _configure_logging(index, count)
    _exit_at_once_on_error(index, count, config.heartbeat_timeout)
    logging.info(
        "Joined a run of %d processes (%d devices, %d local) coordinated at %s. If a process dies, the others stop "
        "about --heartbeat_timeout=%d s later.", count, num_devices, num_local_devices, address, config.heartbeat_timeout)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} must be host:port, e.g. 10.0.0.1:8476 or [::1]:8476")
    return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, deadline: float, who: str, timeout: int) -> None:
    """Returns once a TCP connection to the coordinator's port succeeds (process 0 may start later than us)."""
    host, port = _split_address(address)
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.1)):
                return
        except OSError as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"{who.capitalize()} could not reach the coordinator at {address} within {timeout} s (last error: "
                f"{last_error}). Process 0 runs the coordinator there: is it running, is {host} reachable from this "
                "host, and is the port open? (--coordinator_address, --initialization_timeout)")
        time.sleep(0.25)


def _give_up_connecting(who: str, address: str, num_processes: int | None, timeout: int,
                        process_id: int | None) -> None:
    # Runs on a timer thread while the main thread waits inside jax.distributed.initialize; JAX's own timeout
    # would end the process with a bare DEADLINE_EXCEEDED (later), so say what happened and exit first.
    what = {None: "waited for the coordinator", 0: "started the coordinator"}.get(process_id, "reached the coordinator")
    everyone = f"all {num_processes} processes" if num_processes else "all processes"
    _print_and_exit(f"{who.capitalize()} {what} at {address}, but not {everyone} connected within {timeout} s "
                    "(--initialization_timeout). Start every process with the same --coordinator_address and "
                    "--num_processes and its own --process_id, and check that the address is reachable from every "
                    "host.")


def _print_and_exit(message: str, status: int = 1) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"t5x_lite.distributed: {message}\n")
    sys.stderr.flush()
    os._exit(status)


class _ProcessPrefix(std_logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: std_logging.LogRecord) -> bool:
        if not getattr(record, "_process_prefixed", False):
            record.msg = f"{self.prefix}{record.msg}"
            record._process_prefixed = True
        return True


def _configure_logging(index: int, count: int) -> None:
    """Log lines say which process wrote them; only process 0 logs below WARNING (one copy of the run's log)."""
    logging.get_absl_handler().addFilter(_ProcessPrefix(f"[process {index}/{count}] "))
    if index != 0:
        logging.set_verbosity(logging.WARNING)


def _exit_at_once_on_error(index: int, count: int, heartbeat_timeout: int) -> None:
    """An uncaught error prints its traceback and ends the process at once: exiting normally would wait up to
    --shutdown_timeout at JAX's exit barrier for processes that may be waiting for this one in a collective."""
    previous = sys.excepthook

    def hook(exc_type, exc, traceback) -> None:
        previous(exc_type, exc, traceback)
        _print_and_exit(f"process {index} of {count} failed with {exc_type.__name__}; exiting without waiting for "
                        f"the others, which stop about --heartbeat_timeout={heartbeat_timeout} s later.")

    sys.excepthook = hook


# ------------------------------------------------------------------------------------------------------------
# What the processes must agree on.


def same_seed_on_all_processes(seed: int | None) -> int:
    """`seed`, or when None a random seed drawn by process 0 and broadcast, so every process uses the same."""
    if seed is not None:
        return int(seed)
    drawn = np.int32(int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        drawn = multihost_utils.broadcast_one_to_all(drawn)
    seed = int(drawn)
    logging.info("No seed given: drew seed %d (set it, e.g. --gin.SEED=%d, to repeat this run).", seed, seed)
    return seed


def check_same_on_all_processes(text: str, what: str) -> None:
    """Raises ValueError on every process when `text` (e.g. the parsed gin config) differs between processes."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    differing = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differing:
        raise ValueError(f"The {what} of process(es) {differing} differs from process 0's: start every process "
                         "with the same command line (only the distributed flags may differ).")

