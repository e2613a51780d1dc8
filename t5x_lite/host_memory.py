"""Host memory kept for reuse from one step to the next: glibc malloc told not to give freed memory back.

On the CPU, XLA allocates each run of an executable its temporary buffer afresh (2.9 GB for T5.1.1-small's train
step at batch 8, lengths 512/114) and frees it at the end. glibc's malloc serves a block that large with mmap and
frees it with munmap, so the next step's buffer is new memory again: every page of it is faulted in and zeroed
by the kernel. Measured on a 2-core machine: 730,000 page faults and 1.4 s of kernel time in a 6.2 s step.

`keep_freed_memory()` sets three of glibc's malloc options (mallopt(3)):
  - M_ARENA_MAX = 1: every thread allocates from the main arena. A thread's own arena is built of 64 MiB heaps,
    and a block larger than that is always mmapped, whatever M_MMAP_MAX says.
  - M_MMAP_MAX = 0: large blocks come from the main arena's heap (brk), not from mmap.
  - M_TRIM_THRESHOLD = -1: freed memory at the top of that heap is never given back to the kernel.
The next step then reuses the pages the last one freed: no page faults, and the step is 8-12% faster (benchmark
figures in the README). The cost is that the process's resident memory stays at its peak between steps, which
a training process reaches every step anyway.

Call it first thing in a process, before JAX starts its backend: a thread that already has an arena of its own
keeps it (called after, it changes nothing). The entry points (train, eval, infer, the experiment), the
benchmark and the step profiler call `keep_freed_memory_on_cpu()`, which does so when JAX is going to run on the
CPU; on a GPU or TPU host the large buffers are on the device, and one arena would only slow the input pipeline's
threads (measured here: a span-corruption pipeline about 37% slower with one arena). The entry points'
`--keep_freed_host_memory=false` turns it off. It does nothing where the C library is not glibc (macOS, musl).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform

from absl import flags

# mallopt(3)'s parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory for reuse (see the module docstring). Returns False, having done
    nothing, where the C library is not glibc; raises OSError if glibc refuses a setting."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    for param, value in SETTINGS:
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc's mallopt({param}, {value}) failed")
    return True


def jax_runs_on_cpu() -> bool:
    """Whether JAX is going to run on the CPU, told without starting its backends: JAX_PLATFORMS names the CPU
    first, or it is unset and no accelerator plugin (the `jax_plugins` namespace or entry points, libtpu) is
    installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


def keep_freed_memory_on_cpu() -> bool:
    """`keep_freed_memory()` when JAX is going to run on the CPU; False, having done nothing, elsewhere."""
    return jax_runs_on_cpu() and keep_freed_memory()


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """--keep_freed_host_memory, for the entry points' command lines (once; later calls do nothing)."""
    if "keep_freed_host_memory" in flag_values:
        return
    flags.DEFINE_bool(
        "keep_freed_host_memory", True,
        "keep memory that XLA frees for the next step instead of giving it back to the kernel (glibc only; see "
        "t5x_lite/host_memory.py)",
        flag_values=flag_values,
    )


def keep_freed_memory_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """`keep_freed_memory_on_cpu()` unless --keep_freed_host_memory=false."""
    return flag_values.keep_freed_host_memory and keep_freed_memory_on_cpu()
