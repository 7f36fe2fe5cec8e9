"""What the raw-input readers exchange: input files, documents and the bad-input policy.

`InputFile` (one file, or one chunk of a TFDS split), `Document` (a text with where it came from),
`BadInput` (fail on, or count, bad input) and `BadInputError`. A leaf of mamba2_jax/data: the
readers (sources.py, tfds_source.py) import it, and sources.py re-exports it.
"""

from __future__ import annotations

import dataclasses
import logging

from mamba2_jax.errors import UserError

BAD_KINDS = (
  "empty_file",
  "unreadable_file",
  "blank_line",
  "invalid_utf8",
  "malformed_json",
  "missing_text",
  "invalid_unicode",
)
MAX_EXAMPLES = 20


class BadInputError(UserError, ValueError):
  """A problem in an input file; the message starts with `PATH: line N:` / `PATH: row N:`."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


class BadInput:
  """Fail on, or count, bad input. `on_error` is "fail" or "skip"."""

  def __init__(self, on_error: str = "fail"):
    if on_error not in ("fail", "skip"):
      raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    self.on_error = on_error
    self.counts: dict[str, int] = {}
    self.examples: list[str] = []

  def __call__(self, kind: str, path: str, where: str, msg: str) -> None:
    text = f"{path}: {where + ': ' if where else ''}{msg}"
    if self.on_error == "fail":
      raise BadInputError(kind, text + "  (pass --on_error=skip to skip and count such input)")
    self.counts[kind] = self.counts.get(kind, 0) + 1
    if len(self.examples) < MAX_EXAMPLES:
      self.examples.append(text)
      logging.warning("skipped bad input: %s", text)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_dict(self) -> dict:
    return {
      "on_error": self.on_error,
      "counts": dict(sorted(self.counts.items())),
      "total": self.total,
      "examples": list(self.examples),
    }

  def merge(self, d: dict) -> None:
    for k, v in d.get("counts", {}).items():
      self.counts[k] = self.counts.get(k, 0) + v
    self.examples.extend(d.get("examples", [])[: max(0, MAX_EXAMPLES - len(self.examples))])


@dataclasses.dataclass(frozen=True)
class InputFile:
  path: str  # local path or fsspec URL
  size: int  # bytes on disk
  fmt: str  # "jsonl" | "parquet" | "txt"
  origin: str = ""  # "builtin:shakespeare" for built-in corpora
  set_name: str | None = None  # forced set name (built-in corpora)
  tfds: dict | None = None  # fmt "tfds": a chunk of a TFDS split (mamba2_jax/data/tfds_source.py)

  def to_dict(self) -> dict:
    return {
      "path": self.path,
      "size": self.size,
      "format": self.fmt,
      **({"origin": self.origin} if self.origin else {}),
      **({"tfds": self.tfds} if self.tfds else {}),
    }


@dataclasses.dataclass
class Document:
  text: str
  meta: dict
  set_name: str | None
  path: str
  where: str  # "line 12", "row 3", "" (whole file)
  raw_pos: int = 0  # bytes of the file (compressed) consumed so far, for progress bars
