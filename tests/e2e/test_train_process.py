"""The training binary as real processes: SIGKILL + restart replays the exact losses, SIGTERM
saves and exits 0, and two processes joined by jax.distributed (127.0.0.1) train like one.

Each run is `python -m experiments.train` with the tiny config shrunk further (seq 32, batch 4,
d_model 32) and a constant learning rate, so `total_steps` can change between a killed run and
its continuation without changing the schedule.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.paths import ROOT

ARGS = [
  "--config=configs/train.py:tiny",
  "--config.seq_len=32",
  "--config.global_batch_size=4",
  "--config.model.d_model=32",
  "--config.model.chunk_size=16",
  "--config.log_every=1",
  "--config.optimizer.schedule=constant",
  "--config.optimizer.warmup_steps=2",
  "--config.checkpoint_every=4",
]


def _env(devices=1):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(PYTHONPATH=str(ROOT), JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
  return env


def _start(workdir, *extra, devices=1):
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *ARGS, *extra]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _run(workdir, *extra, devices=1, timeout=300):
  p = _start(workdir, *extra, devices=devices)
  out, err = p.communicate(timeout=timeout)
  assert p.returncode == 0, err[-3000:]
  return out


def _losses(workdir):
  """{step: loss} with the last value written for each step (a resumed run rewrites some)."""
  out = {}
  for line in open(Path(workdir) / "metrics.jsonl"):
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


def _wait_for(pred, proc, timeout=240):
  t0 = time.time()
  while not pred():
    if proc.poll() is not None:
      raise AssertionError("the run ended early: " + proc.stderr.read()[-3000:])
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


def _steps_logged(workdir):
  try:
    return max(_losses(workdir), default=0)
  except (FileNotFoundError, ValueError):
    return 0


def test_sigkill_then_resume_replays_identical_losses(tmp_path):
  ref, run = tmp_path / "ref", tmp_path / "run"
  _run(ref, "--config.total_steps=16")
  p = _start(run, "--config.total_steps=100000")
  _wait_for(lambda: (run / "checkpoints" / "8").is_dir() and _steps_logged(run) >= 10, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = _steps_logged(run)
  _run(run, "--config.total_steps=16")
  assert json.load(open(run / "train_complete"))["step"] == 16
  want, got = _losses(ref), _losses(run)
  assert sorted(got) == list(range(1, 17)) and killed_at < 16
  assert got == want  # bit-identical: same batches, same state after resume


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  run = tmp_path / "run"
  p = _start(run, "--config.total_steps=100000", "--config.checkpoint_every=1000")
  _wait_for(lambda: _steps_logged(run) >= 5, p)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  steps = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
  assert len(steps) == 1 and steps[0] >= 5  # off the 1000-step interval: the preemption save
  assert not (run / "train_complete").exists()
  # the continuation starts after the saved step
  _run(run, f"--config.total_steps={steps[0] + 2}", "--config.checkpoint_every=1000")
  got = _losses(run)
  assert max(got) == steps[0] + 2


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_two_processes_match_one_process(tmp_path, packing):
  """2 processes x 2 CPU devices vs 1 process x 4 devices, same global batch (data.num_shards
  = 2 logical shards in both): the same losses."""
  common = [
    "--config.total_steps=6",
    "--config.data.num_shards=2",
    f"--config.data.packing={packing}",
  ]
  one = tmp_path / "one"
  _run(one, *common, devices=4)
  multi = tmp_path / "multi"
  port = _free_port()
  procs = [
    _start(
      multi,
      *common,
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      devices=2,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a, b = _losses(one), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for s in a:
    assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])
  # only process 0 wrote logs; both wrote their data-iterator state
  it_files = os.listdir(multi / "checkpoints" / "6" / "data_iter")
  assert sorted(f for f in it_files if f.endswith(".json")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
