"""Result files: JSON (numpy-aware, written atomically), append-only JSONL with crash tolerance."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def to_jsonable(obj: Any) -> Any:
  """numpy scalars/arrays, tuples, Paths, ConfigDicts -> plain JSON types; NaN/inf -> None."""
  if hasattr(obj, "to_dict") and callable(obj.to_dict):
    obj = obj.to_dict()
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_jsonable(obj.tolist())
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    f = float(obj)
    return f if math.isfinite(f) else None
  if isinstance(obj, (np.bool_,)):
    return bool(obj)
  if isinstance(obj, Path):
    return str(obj)
  return obj


def write_json(path, obj: Any) -> None:
  """Writes `obj` as indented JSON; the file appears only once complete (tmp + rename)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n")
  os.replace(tmp, path)


def read_json(path, default: Any = None) -> Any:
  path = Path(path)
  if not path.exists():
    return default
  return json.loads(path.read_text())


def read_jsonl(path) -> list[dict]:
  """Lines of a JSONL file. A torn last line (a crash while appending) is dropped and the file is
  truncated to the last complete line, so appending can resume; a bad line elsewhere raises."""
  path = Path(path)
  if not path.exists():
    return []
  raw = path.read_bytes()
  rows, offset = [], 0
  lines = raw.split(b"\n")
  for i, line in enumerate(lines):
    start, offset = offset, offset + len(line) + 1
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if any(rest.strip() for rest in lines[i + 1 :]):
        raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
      log.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
      with open(path, "r+b") as f:
        f.truncate(start)
      return rows
  if raw and not raw.endswith(b"\n"):  # a complete last object without its newline
    with open(path, "ab") as f:
      f.write(b"\n")
  return rows


def append_jsonl(path, rows: list[dict]) -> None:
  """Appends rows (one JSON object per line) and flushes them to disk."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    for row in rows:
      f.write(json.dumps(to_jsonable(row), allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
