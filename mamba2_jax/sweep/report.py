"""Sweep report: per-run results, state-capacity estimates, fits and plots -> report.md.

Reads WORKDIR/sweep.json and, per run, runs/<name>/train/config.json (training length
T = seq_len x tbptt_segments, model -> N_S) and the newest results.json of every evaluation
(runs/<name>/eval/<eval>/step_<N>/ or the eval dir itself). Collapse is judged by the forgetting
test of the sweep's `collapse_eval` (default: the first ppl_by_position / copy_task eval without
a mitigation), recall by `recall_eval` (default: the first passkey eval without a mitigation).
A run whose loss within T is not clearly below chance never learned the task
(`capacity.collapse_verdict`, mamba2_jax.eval.criteria.is_learned); a sweep may also set
`learned_max_loss`, a stricter bound on that loss. Such a run's forgetting test says nothing:
it reads "not learned" and is left out of T_forget.
Writes WORKDIR/report/{report.md, report.json, *.png}.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mamba2_jax.checkpoints import workdir as workdir_lib
from mamba2_jax.config import Mamba2Config
from mamba2_jax.eval import criteria
from mamba2_jax.sweep import capacity
from mamba2_jax.sweep import plots as plots_lib
from mamba2_jax.sweep.grid import CURVE_TASKS

__all__ = ["collect", "write_report"]


def _read(path: Path, default=None):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return default


def _latest_results(eval_dir: Path) -> dict | None:
  steps = sorted(
    (int(p.name.split("_", 1)[1]), p)
    for p in eval_dir.glob("step_*")
    if p.name.split("_", 1)[1].isdigit()
  )
  for _, p in reversed(steps):
    r = _read(p / "results.json")
    if r is not None:
      r["_dir"] = str(p)
      return r
  r = _read(eval_dir / "results.json")
  if r is not None:
    r["_dir"] = str(eval_dir)
  return r


def collect(workdir) -> dict[str, Any]:
  """{"sweep": ..., "runs": [{name, values, status, train_len, state_size, evals: {...}}]}."""
  workdir = Path(workdir)
  meta = _read(workdir / "sweep.json")
  if meta is None:
    raise FileNotFoundError(
      f"{workdir}/sweep.json not found: not a sweep directory "
      "(run python -m experiments.sweep first)"
    )
  runs = []
  for r in meta["runs"]:
    d = workdir / "runs" / r["name"]
    cfg = workdir_lib.read_run_config(d / "train", {})
    model = cfg.get("model")
    entry = {
      "name": r["name"],
      "values": r["values"],
      "status": _read(d / "status.json", {}),
      "train_len": workdir_lib.train_len(cfg),
      "state_size": Mamba2Config.from_dict(model).state_size if model else None,
      "params": Mamba2Config.from_dict(model).num_params() if model else None,
      "evals": {},
    }
    for ed in sorted((d / "eval").glob("*")) if (d / "eval").is_dir() else []:
      res = _latest_results(ed)
      if res is not None:
        entry["evals"][ed.name] = res
    runs.append(entry)
  return {"sweep": meta["sweep"], "runs": runs}


def _pick(sweep: dict, key: str, tasks) -> str | None:
  if sweep.get(key):
    return sweep[key]
  evals = sweep.get("evals") or {}
  for name, e in evals.items():
    if e.get("task") in tasks and not e.get("mitigation"):
      return name
  return None


def _fmt(v, digits=3):
  if v is None:
    return "–"
  if isinstance(v, bool):
    return "yes" if v else "**no**"
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    return f"{v:.{digits}g}"
  return str(v)


def _within_beyond(summary: dict):
  return (
    summary.get("copy_loss_within_train", summary.get("mean_loss_within_train")),
    summary.get("copy_loss_beyond_train", summary.get("mean_loss_beyond_train")),
  )


def _mitigation_evals(run, sweep, collapse) -> list[str]:
  """The run's collapse eval and its task's evals under a mitigation (not other prompts)."""
  task = (sweep.get("evals") or {}).get(collapse or "", {}).get("task")
  return [
    n
    for n, res in run["evals"].items()
    if n == collapse or (res.get("task") == task and res.get("config", {}).get("mitigation"))
  ]


# the report's cell for each forgetting verdict ("no collapse")
_VERDICT_CELL = {"pass": "yes", "fail": "**no**", "not learned": "not learned", "n/a": "–"}


def _mitigation_table(runs, sweep, collapse, learned_max=None) -> list[str]:
  """The collapse eval and its mitigation variants, per run."""
  rows = []
  for r in runs:
    for n in _mitigation_evals(r, sweep, collapse):
      res = r["evals"][n]
      s = res.get("summary", {})
      within, beyond = _within_beyond(s)
      verdict, _ = capacity.collapse_verdict(s, learned_max)
      rows.append(
        f"| {r['name']} | {n} | {res.get('config', {}).get('mitigation') or 'none'} "
        f"| {_fmt(within)} | {_fmt(beyond)} | {_VERDICT_CELL[verdict]} |"
      )
  if len({row.split(" | ")[2] for row in rows}) <= 1:
    return []
  return [
    "",
    "## Mitigations",
    "",
    "Loss inside / beyond the training length with each "
    "training-free mitigation (config.mitigation of the evaluation):",
    "",
    "| run | eval | mitigation | loss ≤ T | loss > T | no collapse |",
    "|---|---|---|---|---|---|",
    *rows,
  ]


def _state_table(runs) -> list[str]:
  """state_stats summaries: exploding heads, norm growth, the longest retention at T_train."""
  rows = []
  for r in runs:
    for n, res in r["evals"].items():
      if res.get("task") != "state_stats":
        continue
      s = res.get("summary", {})
      ret = res.get("retention_at_train_len")
      half = _half_lives(ret, res.get("train_len"))
      rows.append(
        f"| {r['name']} | {_fmt(s.get('num_exploding_heads'))} | "
        f"{_fmt(s.get('max_explosion_ratio'))} | "
        f"{_fmt(s.get('max_state_norm_within_train'))} | {_fmt(s.get('max_state_norm'))}"
        f" | {_fmt(half[0])} / {_fmt(half[1])} |"
      )
  if not rows:
    return []
  return [
    "",
    "## State statistics",
    "",
    "Per-head SSM state norms over the evaluation stream "
    "(exploding: max norm beyond T_train > explode_factor x max within). Memory half-life "
    "of a head: T·ln 2 / −ln α_{1:T}, with the retention α_{1:T} the product of its decays "
    "over the first T_train tokens (how far back half of an input's weight survives):",
    "",
    "| run | exploding heads | max norm ratio beyond/within T | max norm ≤ T | max norm "
    "| memory half-life, median / max over heads (tokens) |",
    "|---|---|---|---|---|---|",
    *rows,
  ]


def _half_lives(retention, train_len):
  """(median, max) over heads of T ln2 / -ln(alpha_{1:T}); (None, None) without data."""
  if retention is None or not train_len or not np.size(retention):
    return None, None
  a = np.clip(np.asarray(retention, float).reshape(-1), 1e-300, 1.0)
  with np.errstate(divide="ignore"):
    h = np.where(a < 1.0, train_len * math.log(2) / -np.log(a), np.inf)
  return float(np.median(h)), float(np.max(h))


def write_report(workdir, out_dir=None) -> Path:
  """Builds report.md / report.json / plots (replacing the PNGs of an earlier report in
  `out_dir`, default WORKDIR/report); returns the report.md path."""
  from mamba2_jax.eval.plotting import plt  # noqa: F401  pylint: disable=g-import-not-at-top

  data = collect(workdir)
  sweep, runs = data["sweep"], data["runs"]
  out = Path(out_dir or Path(workdir) / "report")
  out.mkdir(parents=True, exist_ok=True)
  for stale in out.glob("*.png"):  # plots of an earlier report (e.g. of fewer or other evals)
    stale.unlink()
  collapse = _pick(sweep, "collapse_eval", CURVE_TASKS)
  recall = _pick(sweep, "recall_eval", ("passkey",))

  learned_max = sweep.get("learned_max_loss")
  forget_pts, recall_pts, rows = [], [], []
  for r in runs:
    cres = r["evals"].get(collapse) if collapse else None
    verdict, r["learned"] = capacity.collapse_verdict((cres or {}).get("summary"), learned_max)
    r["verdict"] = verdict if cres is not None else None
    passed = {"pass": True, "fail": False}.get(verdict)  # not learned / n/a: no evidence
    tr = (r["evals"].get(recall) or {}).get("summary", {}).get("t_recall") if recall else None
    if r["state_size"] is not None and r["train_len"] is not None:
      if cres is not None:
        forget_pts.append((r["state_size"], r["train_len"], passed))
      if recall and recall in r["evals"]:
        recall_pts.append((r["state_size"], r["train_len"], tr))
    rows.append((r, cres, tr))

  bounds = capacity.t_forget_bounds(forget_pts)
  t_forget = {k: v for k, (_, v) in bounds.items()}
  t_recall = capacity.t_recall(recall_pts)
  f_items = [(k, v) for k, (lo, v) in bounds.items() if lo is not None]  # bracketed only
  r_items = [(k, v) for k, v in t_recall.items() if v is not None]
  fit_f = capacity.fit_linear([k for k, _ in f_items], [v for _, v in f_items])
  fit_r = capacity.fit_exponential([k for k, _ in r_items], [v for _, v in r_items])

  lines = [
    f"# Sweep report: {sweep.get('name', Path(workdir).name)}",
    "",
    f"Sweep directory `{Path(workdir).resolve()}`, {len(runs)} runs. Collapse judged by "
    f"`{collapse}` (the forgetting test: FAIL if the loss anywhere exceeds "
    f"{_fmt(2.0)}x its maximum within the training length)"
    + (
      f"; recall by `{recall}` (T_recall: the largest length with passkey accuracy > 95%)"
      if recall
      else ""
    )
    + "."
    + " A run counts as having learned the task when its loss within T is clearly below chance"
    f" (at most {1 - criteria.LEARNED_MARGIN:g} x chance)"
    + (f" and at most {learned_max:g}" if learned_max is not None else "")
    + '; runs that did not read "not learned" and are left out of T_forget.',
    "",
    "## Runs",
    "",
  ]
  header = [
    "run",
    "N_S",
    "params",
    "T_train",
    "state",
    "no collapse",
    "first fail",
    "loss ≤ T",
    "loss > T",
    "learned",
  ] + (["T_recall"] if recall else [])
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r, cres, tr in rows:
    s = (cres or {}).get("summary", {})
    within, beyond = _within_beyond(s)
    cells = [
      r["name"],
      _fmt(r["state_size"]),
      _fmt(r["params"]),
      _fmt(r["train_len"]),
      r["status"].get("state", "not run"),
      _VERDICT_CELL.get(r["verdict"], "–"),
      _fmt(s.get("first_fail_position") if r["verdict"] == "fail" else None),
      _fmt(within),
      _fmt(beyond),
      _fmt(r["learned"]),
    ] + ([_fmt(tr)] if recall else [])
    lines.append("| " + " | ".join(cells) + " |")

  lines += _mitigation_table(runs, sweep, collapse, learned_max) + _state_table(runs)
  lines += [
    "",
    "## State capacity",
    "",
    "T_forget is bracketed, (T', T], when the next shorter run T' collapsed; "
    '"≤ T" when T is the shortest length that counts (an upper bound, not fitted).',
    "",
    "| N_S | T_forget | T_recall |",
    "|---|---|---|",
  ]
  for ns in sorted(set(t_forget) | set(t_recall)):
    lo, hi = bounds.get(ns, (None, None))
    tf = _fmt(hi) if hi is None else (f"{hi} ({lo}, {hi}]" if lo is not None else f"≤ {hi}")
    lines.append(f"| {_fmt(ns)} | {tf} | {_fmt(t_recall.get(ns))} |")
  lines.append("")
  for label, fit, pts, what in (
    ("T_forget = a·N_S + b", fit_f, f_items, "a bracketed value"),
    ("T_recall = a·(base^N_S − 1) + c", fit_r, r_items, "a value"),
  ):
    if fit is None:
      lines.append(
        f"- {label}: not fitted ({len(pts)} state size(s) with {what}; the linear "
        "fit needs 2, the exponential 3)."
      )
    else:
      lines.append(
        f"- {label}: **{fit.formula()}**, R² = {fit.r2:.4f} over {fit.n} state "
        f"sizes{'; ' + fit.note if fit.note else ''}."
      )
  plots = []
  p = plots_lib.fit_plot(dict(f_items), fit_f, out / "t_forget_fit.png", "T_forget (tokens)")
  if p:
    plots.append(("T_forget vs state size", p))
  p = plots_lib.fit_plot(dict(r_items), fit_r, out / "t_recall_fit.png", "T_recall (tokens)")
  if p:
    plots.append(("T_recall vs state size", p))

  # loss curves: every run of the collapse eval in one figure, then each run's mitigations
  if collapse:
    curves = [
      (r["name"], r["evals"][collapse], r["train_len"]) for r in runs if collapse in r["evals"]
    ]
    p = plots_lib.curve_plot(
      curves, out / "loss_by_position.png", f"{collapse}: loss by position, every run"
    )
    if p:
      plots.append(("Loss by position, every run (dashed: training length)", p))
    for r in runs:  # the collapse eval and the same task under mitigations: one figure per run
      same = _mitigation_evals(r, sweep, collapse)
      if len(same) > 1:
        curves = [
          (
            f"{n} ({r['evals'][n].get('config', {}).get('mitigation') or 'none'})",
            r["evals"][n],
            r["train_len"],
          )
          for n in same
        ]
        p = plots_lib.curve_plot(
          curves, out / f"mitigations_{r['name']}.png", f"{r['name']}: mitigations"
        )
        if p:
          plots.append((f"{r['name']}: with and without mitigations", p))
  # per-run plots of the evals (passkey heatmaps, state statistics) copied next to the report
  for r in runs:
    for n, res in r["evals"].items():
      for src in res.get("plots") or []:
        src = Path(src)
        if src.exists() and src.name in (
          "heatmap.png",
          "state_norm.png",
          "retention.png",
          "explosion_ratio.png",
        ):
          dst = out / f"{r['name']}__{n}__{src.name}"
          shutil.copyfile(src, dst)
          plots.append((f"{r['name']} / {n}: {src.stem.replace('_', ' ')}", str(dst)))
  lines += ["", "## Plots", ""]
  for title, path in plots:
    lines += [f"### {title}", "", f"![{title}]({Path(path).name})", ""]
  report = {
    "collapse_eval": collapse,
    "recall_eval": recall,
    "t_forget": {str(k): v for k, v in t_forget.items()},
    "t_forget_lower": {str(k): lo for k, (lo, _) in bounds.items()},
    "t_recall": {str(k): v for k, v in t_recall.items()},
    "fit_t_forget": fit_f.to_dict() if fit_f else None,
    "fit_t_recall": fit_r.to_dict() if fit_r else None,
    "runs": [
      {
        "name": r["name"],
        "values": r["values"],
        "state_size": r["state_size"],
        "train_len": r["train_len"],
        "status": r["status"].get("state"),
        "learned": r["learned"],
        "verdict": r["verdict"],
        "summaries": {n: e.get("summary") for n, e in r["evals"].items()},
      }
      for r in runs
    ],
  }
  (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
  path = out / "report.md"
  path.write_text("\n".join(lines) + "\n")
  return path
