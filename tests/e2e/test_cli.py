"""The binaries' user errors (experiments/cli.py): one or two lines, exit code 2, no traceback
unless asked for (MAMBA2_JAX_VERBOSE=1 / --verbose). Few subprocesses: each starts python."""

import os
import subprocess
import sys

from tests.paths import ROOT


def _run(*args, verbose=False, platforms="cpu"):
  env = {**os.environ, "JAX_PLATFORMS": platforms}
  env.pop("MAMBA2_JAX_VERBOSE", None)
  if verbose:
    env["MAMBA2_JAX_VERBOSE"] = "1"
  p = subprocess.run(
    [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  return p, (p.stdout + p.stderr).strip().splitlines()


def test_config_errors_of_train(tmp_path):
  """`--config.totl_steps` printed 56 lines ending in a mangled "Did you mean"; a bad value, found
  after jax started, printed a traceback after jax's lines about the backends it did not find."""
  wd = f"--workdir={tmp_path / 'wd'}"
  p, lines = _run("experiments.train", "--config.totl_steps=3", wd)
  assert p.returncode == 2 and lines == [
    "train: unknown config field totl_steps in configs/train.py; did you mean total_steps?"
  ], lines
  bad_value = ("experiments.train", "--config.seq_len=0", wd)
  p, lines = _run(*bad_value, platforms="")  # jax probes every backend (tpu, proxy, ...)
  assert p.returncode == 2 and len(lines) == 2, lines
  assert lines[0] == "train: error: config.seq_len: must be an integer >= 1, got 0"
  p, lines = _run(*bad_value, verbose=True)
  assert p.returncode != 0 and "Traceback" in p.stderr
  assert not (tmp_path / "wd").exists()


def test_wrong_checkpoint_path_and_config_without_config_file(tmp_path):
  out = tmp_path / "ev"
  p, lines = _run(
    "experiments.evaluate",
    "--task=passkey",
    f"--checkpoint={tmp_path / 'nothing'}",
    f"--out={out}",
  )
  assert p.returncode == 2 and len(lines) <= 2 and "Traceback" not in p.stderr, lines
  assert lines[0].startswith("evaluate: error: --checkpoint") and "does not exist" in lines[0]
  assert not out.exists()  # a failed evaluate leaves no empty --out
  p, lines = _run(
    "experiments.evaluate",
    "--task=passkey",
    "--checkpoint=random:tiny",
    f"--out={out}",
    "--config.max_len=64",
  )
  assert p.returncode == 2 and len(lines) <= 2 and "Traceback" not in p.stderr, lines
  assert "add --config=configs/evaluate.py:passkey" in lines[0]
