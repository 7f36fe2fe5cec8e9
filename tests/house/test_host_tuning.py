"""Every binary a user runs (experiments/*.py, benchmarks/*.py) tunes the process for its host
(`import mamba2_jax.host_tuning`, or a call of `tune_for_this_host` / `tune_cpu_malloc`) before
it imports numpy, jax or anything else that could start threads. Read from the source; no jax."""

from __future__ import annotations

import ast
import re
import sys

from tests.paths import ROOT

TUNE_MODULE = "mamba2_jax.host_tuning"
TUNE_CALLS = ("tune_for_this_host", "tune_cpu_malloc")
# Modules that may be imported before the tuning: they import neither numpy nor jax.
LIGHT = ("mamba2_jax", "mamba2_jax.runtime", TUNE_MODULE)
# Binaries that do not tune, and why.
EXEMPT = {
  "experiments/prepare_data.py": "tokenizes on the host, no XLA: one malloc arena would only "
  "serialize the tokenizer's threads",
}


def _binaries() -> list:
  paths = sorted((ROOT / "experiments").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
  main = re.compile(r'^if __name__ == "__main__":', re.M)
  return [p for p in paths if main.search(p.read_text())]


def _imported(stmt) -> list[str]:
  """The modules a top-level statement imports when the module runs (inside `if`/`try` blocks
  too; not in function bodies, which run later)."""
  if isinstance(stmt, ast.Import):
    return [a.name for a in stmt.names]
  if isinstance(stmt, ast.ImportFrom):
    return [] if stmt.level else [stmt.module or ""]
  if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
    return []
  return [m for child in ast.iter_child_nodes(stmt) for m in _imported(child)]


def _heavy(module: str) -> bool:
  top = module.split(".")[0]
  return module not in LIGHT and top not in sys.stdlib_module_names


def _tunes(stmt) -> bool:
  """Whether a top-level statement tunes when the module runs (not in function bodies)."""
  if TUNE_MODULE in _imported(stmt):
    return True
  if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
    return False
  if isinstance(stmt, ast.Call):
    if getattr(stmt.func, "id", getattr(stmt.func, "attr", None)) in TUNE_CALLS:
      return True
  return any(_tunes(child) for child in ast.iter_child_nodes(stmt))


def tuning_problem(source: str) -> str | None:
  """None when the module tunes before its first import of a non-light module (or imports none
  at its top level), else what is wrong."""
  for stmt in ast.parse(source).body:
    if _tunes(stmt):
      return None
    heavy = [m for m in _imported(stmt) if _heavy(m)]
    if heavy:
      return f"line {stmt.lineno} imports {heavy[0]} before `import {TUNE_MODULE}`"
  return None


def test_every_binary_tunes_before_importing_numpy_or_jax():
  binaries = _binaries()
  names = {p.relative_to(ROOT).as_posix() for p in binaries}
  assert {"experiments/train.py", "experiments/evaluate.py", "benchmarks/model_cpu.py"} <= names
  assert set(EXEMPT) <= names, "an exempt binary no longer exists"
  bad = []
  for path in binaries:
    rel = path.relative_to(ROOT).as_posix()
    problem = tuning_problem(path.read_text())
    if problem and rel not in EXEMPT:
      bad.append(f"{rel}: {problem}")
  assert not bad, (
    f"binaries must start with `import {TUNE_MODULE}  # noqa: F401` (before numpy / jax):\n  "
    + "\n  ".join(bad)
  )


def test_the_check_sees_the_order():
  ok = f'"""doc"""\nimport os\nimport {TUNE_MODULE}  # noqa: F401\nimport jax\n'
  assert tuning_problem(ok) is None
  late = f"import numpy as np\nimport {TUNE_MODULE}\n"
  assert "numpy" in tuning_problem(late)
  via_library = "from mamba2_jax.eval import TASKS\n"  # imports jax and numpy itself
  assert "mamba2_jax.eval" in tuning_problem(via_library)
  call = "import sys\nfrom mamba2_jax.runtime import tune_cpu_malloc\nX = tune_cpu_malloc()\n"
  assert tuning_problem(call + "import jax\n") is None
  assert tuning_problem("import math\n") is None  # imports nothing heavy: nothing to tune
  lazy = "def f():\n  import jax\n\nif True:\n  import numpy\n"
  assert "numpy" in tuning_problem(lazy)  # a function's import runs later; an if's now
  later = "def main():\n  tune_for_this_host()\n\nimport jax\n"
  assert "jax" in tuning_problem(later)


def test_the_tuning_module_imports_neither_numpy_nor_jax():
  for rel in ("mamba2_jax/host_tuning.py", "mamba2_jax/runtime.py", "mamba2_jax/__init__.py"):
    tree = ast.parse((ROOT / rel).read_text())
    mods = [m for stmt in tree.body for m in _imported(stmt)]
    assert not [m for m in mods if _heavy(m)], f"{rel} imports {mods}"
