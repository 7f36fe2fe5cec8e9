"""The training binary with context parallelism: `--config.mesh_shape="(1,1,4,1)"` on 4 simulated
CPU devices logs the losses of `--config.mesh_shape="(1,1,1,1)"` on one (packed documents, so
document boundaries fall inside and across the 4 sequence shards)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from tests.paths import ROOT, cpu_env

ARGS = [
  "--config=configs/train.py:tiny",
  "--config.seq_len=64",
  "--config.global_batch_size=4",
  "--config.total_steps=3",
  "--config.model.d_model=32",
  "--config.model.n_layer=1",
  "--config.model.scan_unroll=1",
  "--config.model.chunk_size=16",
  "--config.data.packing=segments",
  "--config.log_every=1",
  "--config.checkpoint_every=10",
  "--config.optimizer.schedule=constant",
  "--config.optimizer.warmup_steps=2",
]


def _start(workdir, mesh_shape, devices):
  env = cpu_env(devices)
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    f"--workdir={workdir}",
    *ARGS,
    f"--config.mesh_shape={mesh_shape}",
  ]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _losses(workdir):
  recs = [json.loads(x) for x in open(Path(workdir) / "metrics.jsonl")]
  return [r["loss"] for r in sorted(recs, key=lambda r: r["step"]) if "loss" in r]


def test_cli_context_4_logs_the_losses_of_one_device(tmp_path):
  runs = [
    (tmp_path / "one", _start(tmp_path / "one", "(1,1,1,1)", 1)),
    (tmp_path / "cp4", _start(tmp_path / "cp4", "(1,1,4,1)", 4)),
  ]
  for _, p in runs:  # both at once: each is mostly compilation on one core
    _, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]
  one, cp4 = (_losses(w) for w, _ in runs)
  assert len(one) == 3 and all(np.isfinite(one))
  np.testing.assert_allclose(cp4, one, rtol=2e-5)
  assert json.load(open(tmp_path / "cp4" / "config.json"))["mesh_shape"] == [1, 1, 4, 1]
