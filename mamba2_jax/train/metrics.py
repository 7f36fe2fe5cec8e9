"""Training observability: progress line, WORKDIR/metrics.jsonl, TensorBoard, profiler window.

Metrics of step N are device arrays; `MetricsLogger.push(step, metrics)` keeps them and
materialises the previous step's, so reading them never stalls the device (the step N+1 is
already dispatched when step N's values are fetched). Only process 0 writes.

A run resumed from step S never writes a step twice: `truncate_metrics` drops the rows of
metrics.jsonl past S (written after the checkpoint, before a crash), and the TensorBoard
writer starts a new event file with `purge_step=S + 1`, whose SessionLog.START tells
TensorBoard to discard the older events of steps > S.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax

log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "MetricsLogger", "Profiler", "peak_flops", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per chip (datasheets), by jax device_kind prefix.
_PEAK = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
}


def peak_flops() -> float:
  """Peak FLOP/s of all devices: datasheet bf16 rates for TPUs/GPUs; on CPU, a measured fp32
  2048^3 matmul (about 50 ms)."""
  dev = jax.devices()[0]
  for prefix, rate in sorted(_PEAK.items(), key=lambda kv: -len(kv[0])):
    if dev.device_kind.startswith(prefix):
      return rate * jax.device_count()
  if dev.platform != "cpu":
    return float("nan")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  ts = []
  for _ in range(3):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    ts.append(time.perf_counter() - t0)
  # simulated CPU devices share the same cores: the machine's peak, not per device
  return 2 * 2048**3 / min(ts)


def truncate_metrics(path: str, last_step: int) -> int:
  """Rewrites the JSONL file `path` (atomically) without its rows of steps > `last_step` and
  any unreadable (torn) lines; returns how many rows were dropped (0: the file is unchanged)."""
  if not os.path.exists(path):
    return 0
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        step = json.loads(line).get("step", 0)
      except (ValueError, AttributeError):
        step = None
      if step is None or step > last_step:
        dropped += 1
      else:
        keep.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)
  return dropped


class MetricsLogger:
  """One-step-late metrics: progress line every `log_every` steps, JSONL + TensorBoard.
  `start_step`: the step the run starts after (the restored step, 0 for a fresh run); what
  the workdir holds past it is dropped."""

  def __init__(
    self,
    workdir: str,
    *,
    log_every: int,
    flops_per_step: float,
    peak_flops: float,
    tokens_per_step: int,
    total_steps: int,
    start_step: int = 0,
    enabled: bool | None = None,
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.log_every = log_every
    self.flops_per_step, self.peak = flops_per_step, peak_flops
    self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
    self.pending: tuple[int, Any, dict[str, float]] | None = None
    self.window_start: tuple[int, float] | None = None
    self.data_wait = 0.0
    self.last: dict[str, float] = {}
    self.tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, METRICS_FILE)
      dropped = truncate_metrics(path, start_step)
      if dropped:
        log.info(
          "%s: dropped %d rows past step %d (replayed from there)", path, dropped, start_step
        )
      self.jsonl = open(path, "a")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        # a new event file starting with SessionLog.START at start_step + 1: TensorBoard
        # discards the events of steps >= start_step + 1 from the older files
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
      except ImportError:  # optional: JSONL still has everything
        log.warning("tensorboardX is not installed: no TensorBoard event files")

  def add_data_wait(self, seconds: float) -> None:
    self.data_wait += seconds

  def push(self, step: int, metrics: dict[str, jax.Array], extra: dict[str, float]) -> dict | None:
    """Queues step `step`'s device metrics; returns the previous step's values (host floats),
    or None. `extra` holds host values known now (e.g. lr)."""
    prev = self.flush()
    self.pending = (step, metrics, extra)
    return prev

  def flush(self) -> dict | None:
    """Materialises and writes the queued step (blocks until it is computed)."""
    if self.pending is None:
      return None
    step, metrics, extra = self.pending
    self.pending = None
    vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
    vals.update(extra)
    vals["step"] = step
    self.last = vals
    if step % self.log_every == 0 or step == self.total_steps:
      self._write(step, vals)
    return vals

  def _write(self, step: int, vals: dict[str, float]) -> None:
    now = time.perf_counter()
    if self.window_start is not None:
      s0, t0 = self.window_start
      dt = max(now - t0, 1e-9)
      n = step - s0
      vals["steps_per_s"] = n / dt
      vals["tokens_per_s"] = n * self.tokens_per_step / dt
      vals["mfu"] = n * self.flops_per_step / dt / self.peak if self.peak else float("nan")
      vals["data_wait_frac"] = self.data_wait / dt
    self.window_start, self.data_wait = (step, now), 0.0
    if not self.enabled:
      return
    self.jsonl.write(
      json.dumps(
        {
          k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
          for k, v in vals.items()
        }
      )
      + "\n"
    )
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in vals.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
    eta = ""
    if "steps_per_s" in vals and vals["steps_per_s"] > 0:
      eta = f" eta {(self.total_steps - step) / vals['steps_per_s'] / 60:.1f}min"
    rate = (
      f" {vals['tokens_per_s']:,.0f} tok/s mfu {vals['mfu']:.1%} "
      f"data-wait {vals['data_wait_frac']:.0%}"
      if "tokens_per_s" in vals
      else ""
    )
    print(
      f"step {step}/{self.total_steps} loss {vals['loss']:.4f} lr {vals.get('lr', 0):.2e} "
      f"gnorm {vals.get('grad_norm', float('nan')):.3f}{rate}{eta}",
      flush=True,
    )

  def write_eval(self, step: int, vals: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **vals}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in vals.items():
        self.tb.add_scalar(k, v, step)
    print(f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in vals.items()), flush=True)

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()


class Profiler:
  """jax.profiler trace of steps [start, start + count) on process 0 (start None = off)."""

  def __init__(self, workdir: str, start: int | None, count: int):
    self.start, self.stop = start, None if start is None else start + count
    self.dir = os.path.join(workdir, "profile")
    self.active = False

  def step(self, step: int) -> None:
    if self.start is None or jax.process_index() != 0:
      return
    if step == self.start and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True
    elif step == self.stop and self.active:
      jax.profiler.stop_trace()
      self.active = False
      log.info("profile of steps %d..%d written to %s", self.start, self.stop - 1, self.dir)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
