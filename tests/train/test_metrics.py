"""The training metrics writer on resume: metrics.jsonl rows past the restored step are dropped
(`truncate_metrics`) and the TensorBoard writer starts a new event file whose SessionLog.START
at the restored step + 1 makes TensorBoard discard the older events from there on.
"""

from __future__ import annotations

import json
import struct

import jax.numpy as jnp

from mamba2_jax.train.metrics import MetricsLogger, truncate_metrics


def _write_rows(path, steps, torn=False):
  with open(path, "w") as f:
    for s in steps:
      f.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")
      if s == 4:
        f.write(json.dumps({"step": 4, "eval/loss": 0.5}) + "\n")
    if torn:
      f.write('{"step": 9, "lo')  # a write cut off by SIGKILL


def _steps(path):
  return [json.loads(line)["step"] for line in open(path)]


def test_truncate_metrics_drops_rows_past_the_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  assert truncate_metrics(path, 3) == 0  # no file yet
  _write_rows(path, range(1, 9), torn=True)
  assert truncate_metrics(path, 4) == 5  # steps 5..8 and the torn line
  assert _steps(path) == [1, 2, 3, 4, 4]  # the eval row of step 4 stays
  before = open(path).read()
  assert truncate_metrics(path, 4) == 0 and open(path).read() == before
  assert truncate_metrics(path, 0) == 5 and open(path).read() == ""


def _events(path):
  """(step, is SessionLog.START) of every record of a TensorBoard event file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out, data = [], open(path, "rb").read()
  while data:
    (n,) = struct.unpack("<Q", data[:8])
    ev = event_pb2.Event.FromString(data[12 : 12 + n])
    out.append((ev.step, ev.session_log.status == event_pb2.SessionLog.START))
    data = data[12 + n + 4 :]
  return out


def test_resumed_logger_never_writes_a_step_twice(tmp_path):
  kw = dict(log_every=1, flops_per_step=1.0, peak_flops=1.0, tokens_per_step=1, total_steps=8)
  _write_rows(tmp_path / "metrics.jsonl", range(1, 8))  # a run killed after step 7

  logger = MetricsLogger(str(tmp_path), start_step=4, enabled=True, **kw)  # restored step 4
  for step in range(5, 9):
    logger.push(step, {"loss": jnp.float32(2.0)}, {"lr": 0.1})
  logger.flush()
  logger.close()
  assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 4, 5, 6, 7, 8]

  files = sorted((tmp_path / "tensorboard").iterdir())
  assert len(files) == 1
  events = _events(files[0])
  # one SessionLog.START at step 5 (TensorBoard drops the older events of steps >= 5), before
  # any scalar; the scalars are of steps 5..8
  starts = [i for i, (_, start) in enumerate(events) if start]
  assert len(starts) == 1 and events[starts[0]][0] == 5
  assert sorted({s for s, _ in events[starts[0] + 1 :]}) == [5, 6, 7, 8]
