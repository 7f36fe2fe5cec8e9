"""The evaluation ledger OUT/evaluated_steps.json, keyed by the settings that change results.

An output directory holds the results of one set of settings: the task config less
`NON_RESULT_FIELDS` (progress bars, plot limits, memory/speed knobs), the model source and the
tokenizer; the ledger records them, their key (a hash) and, per checkpoint step, what is done or
failing. Every results.json and metrics line carries the key too. Evaluating into an OUT whose
ledger (or, without a ledger, whose results) come from other settings raises `SettingsMismatch`,
which names the differing settings, unless `overwrite`: then the earlier results are moved to
OUT/superseded/<their key>/ and the evaluation starts afresh. So a run never reports "done"
with results of another command (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from mamba2_jax.errors import InvalidInput
from mamba2_jax.eval import io

LEDGER = "evaluated_steps.json"
METRICS = "metrics.jsonl"
SUPERSEDED = "superseded"
# config fields that do not change the numbers (streaming is exact in chunk_len; batches are
# independent rows): they may differ between a result and the command that reuses it
NON_RESULT_FIELDS = frozenset(
  {
    "progress",
    "chunk_len",
    "batch_size",
    "log_x",
    "ppl_ymax",
    "loss_ymax",
    "plot_layers",
    "plot_heads",
  }
)
# the files a task writes into OUT itself (a non-workdir source), moved aside by overwrite
_OUT_FILES = ("results.json", "preds_*.jsonl", "*.npz", "*.png")


class SettingsMismatch(InvalidInput):
  """OUT holds results of other settings than the evaluation asked for."""


def _source(spec: str) -> str:
  """A model source as a key: local paths absolute, random:... and URLs (gs://...) as given."""
  if ":" in spec.split("/", 1)[0] or not spec:
    return spec
  return os.path.abspath(spec)


def result_settings(cfg, source: str, tokenizer: str = "") -> dict:
  """The settings a result depends on: {"config": task config less NON_RESULT_FIELDS,
  "checkpoint": the model source, "tokenizer": the requested tokenizer ("" = the source's)}."""
  config = io.to_jsonable(cfg)
  return {
    "config": {k: config[k] for k in sorted(config) if k not in NON_RESULT_FIELDS},
    "checkpoint": _source(source),
    "tokenizer": tokenizer or "",
  }


def settings_key(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _flat(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def settings_diff(old: dict | None, new: dict) -> list[str]:
  """ "name: old -> new" for each setting that differs."""
  if old is None:
    return ["the earlier results do not record their settings (an older version wrote them)"]
  a, b = _flat(old), _flat(new)
  return [
    f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
    for k in sorted(set(a) | set(b))
    if a.get(k, "(unset)") != b.get(k, "(unset)")
  ]


class Ledger:
  """OUT/evaluated_steps.json: the settings of OUT's results and which steps are done/failing.

  Created for settings `settings` and written by `start()`, before any evaluation writes into OUT
  (so that partial outputs such as passkey's preds_*.jsonl are covered); see the module
  docstring for a mismatch.
  """

  def __init__(self, out, task: str, settings: dict, *, overwrite: bool = False):
    self.out = Path(out)
    self.path = self.out / LEDGER
    self.key = settings_key(settings)
    data = io.read_json(self.path)
    if data is None or data.get("settings_key") != self.key or data.get("task") != task:
      earlier = self._earlier_results(data)
      if earlier and not overwrite:
        if data is not None and data.get("task") != task:
          raise SettingsMismatch(
            f"{self.path} belongs to task {data.get('task')!r}, not {task!r}; use one output "
            "directory per task (or overwrite=True, --overwrite, to move its results aside)"
          )
        diffs = settings_diff((data or {}).get("settings"), settings)
        raise SettingsMismatch(self._message(task, diffs, earlier))
      fresh = {"task": task, "settings_key": self.key, "settings": settings}
      fresh.update(evaluated={}, failed={})
      if earlier:  # moved aside: OUT belongs to these settings from now on
        self._move_aside((data or {}).get("settings_key") or "unknown", earlier)
        io.write_json(self.path, fresh)
      data = fresh
    self.data = data

  def start(self) -> None:
    """Writes the ledger before a model's evaluation writes anything into OUT (a run that
    fails before that, e.g. on a wrong checkpoint path, leaves OUT as it was)."""
    if not self.path.exists():
      io.write_json(self.path, self.data)

  def _earlier_results(self, data: dict | None) -> list[Path]:
    """OUT's results (step_<N>/ dirs, task files, metrics, the ledger), [] if there are none."""
    found = [p for p in self.out.glob("step_*") if p.is_dir()]
    for pattern in _OUT_FILES:
      found += self.out.glob(pattern)
    if (self.out / METRICS).exists():
      found.append(self.out / METRICS)
    if not found and not (data or {}).get("evaluated"):
      return []  # nothing evaluated (at most load failures): the new settings take OUT over
    return sorted(set(found + ([self.path] if self.path.exists() else [])))

  def _message(self, task: str, diffs: list[str], earlier: list[Path]) -> str:
    return (
      f"{self.out} holds {task} results of other settings than this evaluation ("
      + "; ".join(diffs)
      + "). Use a new output directory (--out), or overwrite=True (--overwrite) to move its "
      f"{len(earlier)} result files/dirs to {self.out / SUPERSEDED}/<their key>/ and evaluate "
      "afresh."
    )

  def _move_aside(self, old_key: str, paths: list[Path]) -> None:
    dest = self.out / SUPERSEDED / old_key
    if dest.exists():
      dest = dest.with_name(f"{old_key}-{time.strftime('%Y%m%d-%H%M%S')}")
    dest.mkdir(parents=True)
    for p in paths:
      os.replace(p, dest / p.name)

  def done(self, step) -> bool:
    return str(step) in self.data["evaluated"]

  def attempts(self, step) -> int:
    return self.data["failed"].get(str(step), {}).get("attempts", 0)

  def record_done(self, step, line: dict) -> None:
    self.data["evaluated"][str(step)] = {"time": time.time(), "metrics": line}
    self.data["failed"].pop(str(step), None)
    io.write_json(self.path, self.data)

  def record_failure(self, step, error: BaseException) -> None:
    entry = self.data["failed"].setdefault(str(step), {"attempts": 0})
    entry.update(
      attempts=entry["attempts"] + 1, error=f"{type(error).__name__}: {error}", time=time.time()
    )
    io.write_json(self.path, self.data)
