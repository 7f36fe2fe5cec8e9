"""Runs a module of this project in one of the compile-check venvs (.venv-tpu / .venv-cuda).

libtpu and the CUDA plugin must not be loaded into the test process, so the compile checks run
in a subprocess with that venv's interpreter, the project on PYTHONPATH, every platform visible
and the test process's simulated-device XLA_FLAGS removed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.paths import ROOT


def venv_python(name: str) -> Path:
  """The interpreter of the venv ``name`` at the repository root (it may not exist)."""
  return ROOT / name / "bin" / "python"


def run_module(
  python: Path, module: str, *args: str, timeout: int, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="", **(extra_env or {}))
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [str(python), "-m", module, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
