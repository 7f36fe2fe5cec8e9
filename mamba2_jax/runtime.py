"""Process-level settings for fast CPU runs.

Every binary (experiments/, benchmarks/) starts with `import mamba2_jax.host_tuning`, which calls
:func:`tune_for_this_host` before numpy or jax are imported; a library user does the same as the
first line of a program (README). Nothing here imports numpy or jax.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TUNED: list[bool] = []  # the result of this process's tune_for_this_host(), once called


def tune_for_this_host() -> bool:
  """Applies :func:`tune_cpu_malloc` where :func:`cpu_only_host` (once per process; later calls
  return the first call's result). Returns whether malloc was tuned. Measured on a 2-core CPU:
  1.5x the model benchmark's training step (docs/benchmarks.md). MAMBA2_JAX_TUNE_MALLOC=0
  turns it off (=1 forces it on)."""
  if not _TUNED:
    _TUNED.append(cpu_only_host() and tune_cpu_malloc())
  return _TUNED[0]


def tune_cpu_malloc() -> bool:
  """Keeps freed memory in glibc's heap instead of returning it to the OS after every call.

  XLA:CPU allocates each step's large temporaries afresh (one buffer of all of a step's
  scratch, e.g. 590 MB for the model benchmark's training step at L=2048); by default glibc
  serves blocks over 32 MiB with mmap and unmaps them on free, so every step pays page faults
  on all of its scratch memory. Three settings (the same as MALLOC_MMAP_MAX_=0,
  MALLOC_TRIM_THRESHOLD_=18446744073709551615, MALLOC_ARENA_MAX=1 in the environment):

  - no mmap for large blocks and never a trim of the heap's top (a threshold of -1 is
    SIZE_MAX: any finite one is exceeded by a large enough step, e.g. the 2.3 GB scratch at
    L=8192, which was then returned and faulted in again on every step: 546K faults, 1.6 s of
    kernel time per step);
  - a single malloc arena: XLA allocates from its worker threads, and a thread's own arena
    serves blocks larger than its 64 MiB heaps with mmap whatever the mmap limit, so without
    this the step's scratch is still mapped and unmapped on every call (measured: 143K page
    faults and ~0.25 s of kernel time per 0.3 s step of the model benchmark at L=2048; 0 with
    a single arena).

  A thread picks its arena at its first allocation, so call this before anything starts
  threads: before importing numpy or jax (numpy's OpenBLAS starts one at import) — first thing
  in a binary's main. Called later it still removes most of the faults. Returns False where
  it does not apply (not glibc).
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  return (
    bool(libc.mallopt(_M_ARENA_MAX, 1))
    and bool(libc.mallopt(_M_MMAP_MAX, 0))
    and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
  )


def cpu_only_host() -> bool:
  """Whether this process will most likely compute on the CPU: MAMBA2_JAX_TUNE_MALLOC=1/0
  decides if set; else JAX_PLATFORMS (its first entry) if set; else no TPU (/dev/accel*,
  /dev/vfio/*) or NVIDIA GPU (/dev/nvidia*) device files."""
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  forced = os.environ.get("MAMBA2_JAX_TUNE_MALLOC")
  if forced is not None:
    return forced.strip().lower() not in ("0", "false", "no", "")
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*"))
