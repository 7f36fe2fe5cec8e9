"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Call `initialize()` first thing in a binary's main, before any jax backend starts. Sources, in
order: the flags --coordinator_address / --num_processes / --process_id (and
--local_device_ids); else the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; else JAX's own cluster detection (TPU VMs, SLURM, ...),
which is a no-op on a single host. On CPU hosts it also tunes glibc's malloc for XLA:CPU
(`mamba2_jax.runtime.tune_cpu_malloc`), which must happen before jax is imported.
"""

from __future__ import annotations

import logging
import os

from absl import flags

log = logging.getLogger(__name__)

_FLAGS = {}


def define_flags() -> None:
  _FLAGS["addr"] = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host)"
  )
  _FLAGS["n"] = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
  _FLAGS["id"] = flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
  _FLAGS["local"] = flags.DEFINE_string(
    "local_device_ids", None, "comma-separated local device ids of this process"
  )


def _flag(name):
  f = _FLAGS.get(name)
  return None if f is None else f.value


def initialize() -> None:
  # First, before numpy or jax start threads (see tune_cpu_malloc): XLA:CPU's per-step scratch
  # memory is then reused instead of mapped and page-faulted in afresh on every step. Only on
  # CPU hosts: the tuned heap never returns freed memory to the OS.
  from mamba2_jax.runtime import tune_for_this_host  # pylint: disable=g-import-not-at-top

  tune_for_this_host()
  import jax  # pylint: disable=g-import-not-at-top

  addr = _flag("addr") or os.environ.get("JAX_COORDINATOR_ADDRESS")
  n = _flag("n") if _flag("n") is not None else os.environ.get("JAX_NUM_PROCESSES")
  pid = _flag("id") if _flag("id") is not None else os.environ.get("JAX_PROCESS_ID")
  local = _flag("local")
  # CPU processes need a collectives backend to talk (tests, CPU clusters); no effect on TPU/GPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if addr:
    if n is None or pid is None:
      raise ValueError(
        "multi-host: --coordinator_address needs --num_processes and --process_id "
        "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
      )
    kw = {}
    if local:
      kw["local_device_ids"] = [int(i) for i in local.split(",")]
    jax.distributed.initialize(addr, int(n), int(pid), **kw)
  else:
    try:
      jax.distributed.initialize()  # auto-detected clusters; raises ValueError on one host
    except (ValueError, RuntimeError) as e:
      log.debug("single-process run (%s)", e)
      return
  log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
