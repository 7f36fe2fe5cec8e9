"""The README and docs/ stand alone: a short front door, links and cited paths that exist, and no
citation of notes kept outside the repository. Plain text checks; no jax."""

from __future__ import annotations

import glob
import itertools
import re
import subprocess
import unicodedata
from pathlib import Path

from tests.paths import ROOT

README_MAX_LINES = 250
COMMANDS = ["bash scripts/demo.sh", "bash scripts/test.sh"]
PATH_PREFIXES = (
  "mamba2_jax/",
  "pallas_kernels/",
  "experiments/",
  "configs/",
  "benchmarks/",
  "scripts/",
  "tests/",
  "docs/",
)
PATH_SUFFIXES = (".py", ".md", ".sh", ".json", ".png", "/")
# Notes that live outside the repository; code and docs cite docs/ pages or the paper instead.
EXTERNAL_NOTES = re.compile(r"\b(paper|probes|ssd|stack|aot_compile)\.md\b")

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PATH_CHARS = re.compile(r"^[A-Za-z0-9_./*{},-]+$")


def _doc_files() -> list[Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(path: Path):
  """(line number, text) of the lines outside fenced code blocks."""
  in_fence = False
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if FENCE.match(line):
      in_fence = not in_fence
      continue
    if not in_fence:
      yield n, line


def _anchors(path: Path) -> set[str]:
  """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces -> '-',
  repeats numbered -1, -2, ..."""
  seen: dict[str, int] = {}
  out = set()
  for _, line in _prose_lines(path):
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    keep = (ch for ch in m.group(1).lower() if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    slug = "".join(keep).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def _expand_braces(pattern: str) -> list[str]:
  """`a_{x,y}.py` -> [`a_x.py`, `a_y.py`] (shell-style, no nesting)."""
  parts = re.split(r"\{([^{}]*)\}", pattern)
  choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
  return ["".join(c) for c in itertools.product(*choices)]


def _exists(rel: str) -> bool:
  for candidate in _expand_braces(rel):
    if any(ch in candidate for ch in "*?["):
      if glob.glob(str(ROOT / candidate)):
        return True
    elif (ROOT / candidate).exists():
      return True
  return False


def _cited_path(span: str) -> str | None:
  """The repository path a code span names, or None when it does not look like one."""
  text = span.strip()
  text = text.split("::", 1)[0]  # tests/test_x.py::test_name
  if not text.startswith(PATH_PREFIXES):
    return None
  head, sep, _ = text.partition(":")  # configs/train.py:tiny
  if sep and head.endswith(PATH_SUFFIXES):
    text = head
  if not PATH_CHARS.match(text) or not text.endswith(PATH_SUFFIXES):
    return None
  return text


def test_readme_is_short():
  n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
  assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


def test_readme_opens_with_the_two_commands():
  lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
  starts = [i for i, line in enumerate(lines) if FENCE.match(line)]
  assert len(starts) >= 2, "README.md has no fenced block"
  block = lines[starts[0] + 1 : starts[1]]
  commands = [line.split("#", 1)[0].strip() for line in block]
  commands = [c for c in commands if c]
  assert commands == COMMANDS, f"README.md's first block runs {commands}, expected {COMMANDS}"
  prose = [line for line in lines[: starts[0]] if line.strip() and not line.startswith("#")]
  assert not prose, f"README.md has text before the two commands: {prose}"


def test_relative_links_exist():
  missing = []
  for path in _doc_files():
    for n, line in _prose_lines(path):
      for target in LINK.findall(line):
        if target.startswith(("http://", "https://", "mailto:")):
          continue
        rel, _, anchor = target.partition("#")
        dest = path.parent / rel if rel else path
        if not dest.exists():
          missing.append(f"{path.relative_to(ROOT)}:{n}: link {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
          missing.append(f"{path.relative_to(ROOT)}:{n}: link {target}: no such heading")
  assert not missing, "links to files or headings that do not exist:\n  " + "\n  ".join(missing)


def test_cited_paths_exist():
  missing = []
  for path in _doc_files():
    for n, line in _prose_lines(path):
      for span in CODE_SPAN.findall(line):
        rel = _cited_path(span)
        if rel is not None and not _exists(rel):
          missing.append(f"{path.relative_to(ROOT)}:{n}: `{span}`")
  assert not missing, "paths cited in the docs that do not exist:\n  " + "\n  ".join(missing)


def test_no_citation_of_notes_outside_the_repository():
  files = subprocess.run(
    ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
  ).stdout.split(b"\0")
  hits = []
  for name in filter(None, (f.decode() for f in files)):
    if name == "tests/house/test_docs.py" or not (ROOT / name).is_file():
      continue
    try:
      text = (ROOT / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
      continue  # binary fixtures
    for n, line in enumerate(text.splitlines(), 1):
      if EXTERNAL_NOTES.search(line):
        hits.append(f"{name}:{n}: {line.strip()}")
  assert not hits, (
    "citations of notes outside the repository (cite a docs/ page or the paper's section):\n  "
    + "\n  ".join(hits)
  )


def test_path_check_understands_the_citation_forms():
  assert _cited_path("configs/train.py:tiny") == "configs/train.py"
  assert _cited_path("tests/house/test_docs.py::test_readme_is_short") == "tests/house/test_docs.py"
  assert _cited_path("docs/demo/") == "docs/demo/"
  assert _cited_path("python -m experiments.train") is None
  assert _cited_path("configs/sweeps/*.py") == "configs/sweeps/*.py"
  assert _exists("configs/{base,train}.py") and _exists("configs/sweeps/*.py")
  assert not _exists("docs/no_such_page.md")
  assert "facts-from-the-paper-13-and-5-state-capacity" in _anchors(ROOT / "docs" / "sweeps.md")
  assert EXTERNAL_NOTES.search("see docs/ssd.md") and not EXTERNAL_NOTES.search("model_and_ssd.md")
