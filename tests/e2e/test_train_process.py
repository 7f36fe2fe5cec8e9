"""The training binary as real processes: SIGKILL + restart replays the exact losses (and
metrics.jsonl holds each step once), Ctrl-C (SIGINT to the process group) and SIGTERM save the
current step and exit 0 quietly, and two processes joined by jax.distributed (127.0.0.1) train
like one.

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
from tests.paths import ROOT, cpu_env

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


def _start(workdir, *extra, devices=1):
  """The run in a new session (process group), as a shell runs a foreground job."""
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *ARGS, *extra]
  return subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=cpu_env(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )


def _run(workdir, *extra, devices=1, timeout=300):
  p = _start(workdir, *extra, devices=devices)
  out, err = p.communicate(timeout=timeout)
  assert p.returncode == 0, err[-3000:]
  return out


def _train_steps(workdir):
  """The steps of metrics.jsonl's training rows, in file order."""
  with open(Path(workdir) / "metrics.jsonl") as f:
    return [rec["step"] for rec in map(json.loads, f) if "loss" in rec]


def _losses(workdir):
  """{step: loss} of metrics.jsonl's training rows."""
  out = {}
  for line in open(Path(workdir) / "metrics.jsonl"):
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


def _checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(Path(workdir) / "checkpoints") if s.isdigit())


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
  # the rows of the replayed steps 9..killed_at were dropped on resume, then written once
  assert _train_steps(run) == list(range(1, 17)) and killed_at < 16
  assert got == want  # bit-identical: same batches, same state after resume


def test_ctrl_c_and_sigterm_save_the_current_step_and_exit_quietly(tmp_path):
  """Ctrl-C (SIGINT to the process group), then the same command resumes and gets a SIGTERM:
  each saves the step it was at (off the 1000-step interval), exits 0 without a traceback, and
  metrics.jsonl holds every step once."""
  run = tmp_path / "run"
  # a data worker process too: Ctrl-C reaches it as well (it must stay quiet)
  args = (
    "--config.total_steps=100000",
    "--config.checkpoint_every=1000",
    "--config.data.num_workers=1",
  )
  p = _start(run, *args)
  _wait_for(lambda: _steps_logged(run) >= 3, p)
  os.killpg(p.pid, signal.SIGINT)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  assert "Traceback" not in err and len(err.splitlines()) <= 12, err
  assert "SIGINT" in err and "Ctrl-C again" in err
  first = _checkpoint_steps(run)
  assert len(first) == 1 and first[0] == _steps_logged(run) >= 3
  assert not (run / "train_complete").exists()

  p = _start(run, *args)  # resumes after the saved step
  _wait_for(lambda: _steps_logged(run) >= first[0] + 2, p)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  assert "Traceback" not in err, err
  steps = _checkpoint_steps(run)
  assert steps[0] == first[0] and len(steps) == 2 and steps[1] == _steps_logged(run)
  assert _train_steps(run) == list(range(1, steps[1] + 1))
  assert not (run / "train_complete").exists()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# packing="segments" (the general case: per-document segment ids travel with the rows); the
# concat packing's per-host split is the same code path (tests/data covers both packings).
# "context": the sequences split over 4 devices of 2 processes, so both processes hold every
# row and read the same data (one data reader, mamba2_jax.train.sharding.data_readers).
@pytest.mark.parametrize("mesh", ["data", "context"])
def test_two_processes_match_one_process(tmp_path, mesh):
  """2 processes x 2 CPU devices vs 1 process x 4 devices, same global batch (data.num_shards
  = 2 logical shards in both): the same losses."""
  common = [
    "--config.total_steps=6",
    "--config.data.num_shards=2",
    "--config.data.packing=segments",
    f"--config.mesh_shape={'(-1,1,1)' if mesh == 'data' else '(1,1,4,1)'}",
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
