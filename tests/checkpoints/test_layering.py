"""Layering: checkpoints sit below training and evaluation; evaluation and sweeps never import
training; the data package has no import cycle (lazy imports included)."""

import ast
import subprocess
import sys

import pytest

from tests.paths import ROOT

PKG = ROOT / "mamba2_jax"


def _module(path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def _imports(path) -> set[str]:
  """Every module a file imports, at the top or inside functions."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


@pytest.mark.parametrize("package", ["checkpoints", "eval", "sweep", "data"])
def test_does_not_import_training(package):
  bad = {
    _module(p): sorted(m for m in _imports(p) if m.startswith("mamba2_jax.train"))
    for p in sorted((PKG / package).rglob("*.py"))
  }
  assert not {k: v for k, v in bad.items() if v}


def test_data_package_has_no_import_cycle():
  files = {_module(p): p for p in (PKG / "data").glob("*.py") if p.name != "__init__.py"}
  graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}

  def reach(start):
    seen, todo = set(), list(graph[start])
    while todo:
      m = todo.pop()
      if m not in seen:
        seen.add(m)
        todo.extend(graph[m])
    return seen

  assert not [m for m in graph if m in reach(m)]


def test_evaluation_and_sweeps_load_without_training():
  code = (
    "import sys\n"
    "import mamba2_jax.eval.jobs, mamba2_jax.sweep.launch, mamba2_jax.sweep.report\n"
    "import mamba2_jax.checkpoints.load\n"
    "print(sorted(m for m in sys.modules if m.startswith('mamba2_jax.train')))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"
