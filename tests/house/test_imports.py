"""The house rules of the imports, read from the source of every first-party module.

Imports go one way: experiments/configs -> mamba2_jax -> pallas_kernels -> jax. Every import
statement counts, also the ones inside functions (a lazy import that hides a cycle is still a
cycle). An edge goes to the module an import names: `from a.b import c` is an edge to a.b.c when
that is a module of the repository, else to a.b.
"""

from __future__ import annotations

import ast

from tests.paths import ROOT

PACKAGES = ("mamba2_jax", "pallas_kernels", "experiments", "configs")
LIBRARY = ("mamba2_jax", "pallas_kernels")


def _module_name(path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, object]:
  found = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      found[_module_name(path)] = path
  return found


def _imports(name: str, path, modules) -> list[tuple[str, int]]:
  """(imported first-party module, line) of every import statement in the file."""
  is_pkg = path.name == "__init__.py"
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in modules and "." in t:
        t = t.rsplit(".", 1)[0]
      if t in modules:
        out.append((t, node.lineno))
  return out


def _graph():
  modules = _modules()
  return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def _violations(graph, modules, rule) -> list[str]:
  return [
    f"{modules[m].relative_to(ROOT)}:{line}: {m} imports {t}"
    for m, edges in graph.items()
    for t, line in edges
    if rule(m, t)
  ]


def _in(mod: str, *pkgs: str) -> bool:
  return any(mod == p or mod.startswith(p + ".") for p in pkgs)


def test_kernels_are_a_leaf():
  modules, graph = _graph()
  bad = _violations(graph, modules, lambda m, t: _in(m, "pallas_kernels") and _in(t, "mamba2_jax"))
  assert not bad, "pallas_kernels imports only jax and itself:\n" + "\n".join(bad)


def test_evaluation_never_imports_training():
  modules, graph = _graph()
  bad = _violations(
    graph, modules, lambda m, t: _in(m, "mamba2_jax.eval") and _in(t, "mamba2_jax.train")
  )
  assert not bad, "mamba2_jax.eval must not import mamba2_jax.train:\n" + "\n".join(bad)


def test_library_never_imports_binaries_or_configs():
  modules, graph = _graph()
  bad = _violations(
    graph, modules, lambda m, t: _in(m, *LIBRARY) and _in(t, "experiments", "configs")
  )
  assert not bad, "the library must not import experiments/ or configs/:\n" + "\n".join(bad)


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w, _ in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  _, graph = _graph()
  cycles = _cycles(graph)
  assert not cycles, "import cycles (each line: modules that import each other):\n" + "\n".join(
    " <-> ".join(c) for c in cycles
  )


def test_the_checks_see_a_violation():
  """The graph reader finds a lazy import and a cycle when there is one."""
  graph = {"a": [("b", 1)], "b": [("c", 2)], "c": [("a", 3)], "d": [("a", 4)]}
  assert _cycles(graph) == [["a", "b", "c"]]
  _, real = _graph()
  assert any(t == "mamba2_jax.mixer" and line > 1 for t, line in real["mamba2_jax.model"])
