"""Sweep grids as data: `configs/sweeps/*.py` -> a list of runs, each a set of config overrides.

A sweep config (ml_collections) holds
  train_config     the base training config, "configs/train.py:<variant>"
  train_overrides  ((dotted key, value), ...) applied to every run
  grid             ((key, (v1, v2, ...)), ...) or, for keys that vary together (a zipped axis),
                   ((key1, key2, ...), ((v11, v12, ...), (v21, v22, ...))[, labels]); the runs
                   are the product over the axes
  tokens_per_step  if > 0: global_batch_size = tokens_per_step // (seq_len * tbptt_segments)
  evals            {name: {task, mitigation, overrides, max_len_factor}}: evaluation tasks run
                   on each run's final checkpoint (configs/evaluate.py:<task>)
  eval_grid        optional axes crossed with every eval (e.g. mitigation x max_len_factor)
  checkpoint       optional: evaluate this fixed checkpoint instead of training
Each run gets a stable name from its grid values (e.g. "d_state-16_seq_len-64") and a
directory WORKDIR/runs/<name>/ with train/ (the trainer's workdir) and eval/<eval name>/.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Any

from mamba2_jax.checkpoints.workdir import train_len

__all__ = ["Run", "EvalSpec", "CURVE_TASKS", "expand", "eval_specs", "format_value"]

# evaluation tasks whose bucketed loss curve carries the forgetting test (collapse)
CURVE_TASKS = ("ppl_by_position", "copy_task")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  name: str
  task: str
  mitigation: str = ""
  overrides: tuple = ()  # ((key, value), ...) for configs/evaluate.py:<task>
  max_len_factor: int = 0  # if > 0: the task's max_len / lengths scale with seq_len


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  values: tuple  # ((key, value), ...) the grid values of this run
  overrides: tuple  # ((key, value), ...) every training override, in order

  def value(self, key, default=None):
    return dict(self.overrides).get(key, default)

  def train_len(self) -> int | None:
    """T_train of the run, seq_len x tbptt_segments (None without seq_len)."""
    return train_len(dict(self.overrides))


def format_value(v) -> str:
  if isinstance(v, float):
    return f"{v:g}"
  if isinstance(v, (tuple, list)):
    return "x".join(format_value(x) for x in v)
  return str(v)


def _slug(key: str, value) -> str:
  short = key.rsplit(".", 1)[-1]
  text = f"{short}-{format_value(value)}"
  return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)


def _axes(grid):
  """Normalises grid axes to [(keys tuple, [values tuple, ...], [run-name part, ...]), ...].

  An axis is (key, values), (keys, value tuples) for keys that vary together, or (keys, value
  tuples, labels) with explicit run-name parts. Without labels a zipped axis is named by its
  first key whose values are all distinct, else by every key whose values differ.
  """
  axes = []
  for axis in grid:
    if len(axis) not in (2, 3):
      raise ValueError(
        f"sweep grid: each axis must be (key, values), (keys, value tuples) or "
        f"(keys, value tuples, labels); got {axis!r}"
      )
    keys, values = axis[0], axis[1]
    if isinstance(keys, str):
      keys, vals = (keys,), [(v,) for v in values]
    else:
      keys = tuple(keys)
      vals = [tuple(v) for v in values]
      bad = [v for v in vals if len(v) != len(keys)]
      if bad:
        raise ValueError(
          f"sweep grid: zipped axis {keys} needs {len(keys)} values per entry; got {bad[0]!r}"
        )
    if not vals:
      raise ValueError(f"sweep grid: axis {keys!r} has no values")
    if len(axis) == 3:
      labels = [str(x) for x in axis[2]]
      if len(labels) != len(vals):
        raise ValueError(
          f"sweep grid: axis {keys!r} has {len(vals)} values but {len(labels)} labels"
        )
    else:
      cols = list(zip(*vals))
      distinct = [i for i, c in enumerate(cols) if len(set(map(str, c))) == len(c)]
      use = distinct[:1] or [i for i, c in enumerate(cols) if len(set(map(str, c))) > 1] or [0]
      labels = ["_".join(_slug(keys[i], v[i]) for i in use) for v in vals]
    axes.append((keys, vals, labels))
  return axes


def expand(sweep) -> list[Run]:
  """All runs of a sweep config, in grid order (the last axis varies fastest)."""
  base = tuple((k, v) for k, v in sweep.train_overrides)
  axes = _axes(sweep.grid)
  runs, names = [], set()
  for combo in itertools.product(*(range(len(vals)) for _, vals, _ in axes)):
    values = tuple((k, v) for (keys, vals, _), i in zip(axes, combo) for k, v in zip(keys, vals[i]))
    over = dict(base)
    over.update(values)
    tps = int(sweep.get("tokens_per_step", 0) or 0)
    if tps:
      rows = train_len(over) or 0  # tokens per batch row
      if rows <= 0:
        raise ValueError("sweep: tokens_per_step needs seq_len in the grid or train_overrides")
      over["global_batch_size"] = max(1, tps // rows)
    name = "_".join(labels[i] for (_, _, labels), i in zip(axes, combo)) or "base"
    if name in names:
      raise ValueError(
        f"sweep: two runs would be named {name!r}; give the axes labels "
        "((keys, values, labels)) that distinguish their values"
      )
    names.add(name)
    runs.append(Run(name=name, values=values, overrides=tuple(over.items())))
  return runs


def eval_specs(sweep) -> list[EvalSpec]:
  """The evaluations of every run: `evals` entries, each crossed with `eval_grid` when given
  (((field, (v1, v2, ...)), ...) over "mitigation", "max_len_factor" or task config keys, e.g.
  mitigation settings x evaluation lengths); the names get the grid values appended."""
  grid = _axes(sweep.get("eval_grid") or ())
  out = []
  for name, e in (sweep.get("evals") or {}).items():
    for combo in itertools.product(*(range(len(v)) for _, v, _ in grid)) if grid else [()]:
      fields = {
        "mitigation": e.get("mitigation", "") or "",
        "max_len_factor": int(e.get("max_len_factor", 0) or 0),
      }
      over = dict(tuple(o) for o in e.get("overrides", ()))
      suffix = []
      for (keys, vals, labels), i in zip(grid, combo):
        for k, v in zip(keys, vals[i]):
          (fields if k in fields else over)[k] = v
        suffix.append(labels[i] if vals[i][0] != "" else f"{keys[0]}-none")
      out.append(
        EvalSpec(
          name="_".join([name, *suffix]),
          task=e["task"],
          mitigation=fields["mitigation"],
          overrides=tuple(over.items()),
          max_len_factor=int(fields["max_len_factor"]),
        )
      )
  return out


def to_json(runs: list[Run]) -> str:
  return json.dumps(
    [{"name": r.name, "values": dict(r.values), "overrides": dict(r.overrides)} for r in runs],
    indent=2,
    default=str,
  )


def cli_value(v: Any) -> str:
  """A value as ml_collections parses it from --config.key=VALUE."""
  if isinstance(v, bool):
    return "True" if v else "False"
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(cli_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)
