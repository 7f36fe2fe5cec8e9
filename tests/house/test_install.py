"""The project is installed into the checkout's .venv (scripts/setup.sh: `pip install -e .`), so a
user's own script in any directory imports it: the README's snippet, run from a temporary
directory, and `python -m experiments.train` there with the project's configs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT

SNIPPET = """
import jax.numpy as jnp
from flax import nnx
from mamba2_jax import Mamba2Config, Mamba2LM
import configs, experiments, mamba2_jax, pallas_kernels

model = Mamba2LM(Mamba2Config.preset("tiny"), rngs=nnx.Rngs(0))
logits = model(jnp.zeros((1, 16), jnp.int32))
assert logits.shape[:2] == (1, 16), logits.shape
for m in (mamba2_jax, pallas_kernels, experiments, configs):
  print(m.__file__)
"""


def _run(args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
  )


@pytest.fixture(scope="module")
def installed():
  """Skips for an interpreter outside the checkout (setup.sh manages .venv, not other venvs)."""
  if not Path(sys.prefix).resolve().is_relative_to(ROOT):
    pytest.skip(
      f"{Path(sys.prefix).resolve()} is not this checkout's .venv (scripts/setup.sh installs into that)"
    )


def test_readme_snippet_from_another_directory(installed, tmp_path):
  p = _run(["-c", SNIPPET], tmp_path)
  assert p.returncode == 0, p.stderr[-2000:] + "\n(run bash scripts/setup.sh)"
  files = [Path(f) for f in p.stdout.split()]
  assert len(files) == 4 and all(f.is_relative_to(ROOT) for f in files), files


def test_binary_from_another_directory(installed, tmp_path):
  """experiments importable, configs/train.py read from the project: the config is loaded (and
  its typo found) without a configs/ folder in the working directory."""
  p = _run(["-m", "experiments.train", "--config.totl_steps=3", "--workdir=wd"], tmp_path)
  assert p.returncode == 2, p.stderr[-2000:]
  assert p.stderr.strip() == (
    f"train: unknown config field totl_steps in {ROOT / 'configs/train.py'}; did you mean "
    "total_steps?"
  )
