"""State-capacity estimates from sweep results (docs/evaluation.md §4, docs/sweeps.md §5.1).

Per state size N_S (recurrent-state scalars, `Mamba2Config.state_size`: SSM states plus conv
states, the paper's N_S = L·[2dN + (2d + 2N)(d_conv − 1)]):
  T_forget  the smallest training length without state collapse: the smallest trained T such
            that every run of that state size trained at T or longer passes the forgetting test
            (§2.4: the loss never exceeds 2x its maximum within T). None if no run passes.
            It is bracketed, T_forget in (T', T_forget], when a shorter run T' of that state
            size collapsed; otherwise (it is the shortest length that counts) only an upper
            bound: the fits use bracketed values only (`t_forget_bounds`). A run that never
            learned the task (`collapse_verdict`: its loss within T not clearly below chance,
            mamba2_jax.eval.criteria.is_learned) or whose test is undetermined counts neither
            as a pass nor as a collapse: it is left out.
  T_recall  the largest context length with passkey accuracy > 95%, maximised over the runs of
            that state size (§4.3).
Laws fitted over the state sizes (§5.1; the paper in K tokens and M scalars):
  T_forget = a * N_S + b                      (least squares)
  T_recall = a * (base ** N_S - 1) + c        (nonlinear least squares)
with R² = 1 - SS_res / SS_tot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from mamba2_jax.eval import criteria

__all__ = [
  "collapse_verdict",
  "t_forget",
  "t_forget_bounds",
  "t_recall",
  "Fit",
  "fit_linear",
  "fit_exponential",
  "r_squared",
]


def collapse_verdict(summary: dict | None, learned_max_loss: float | None = None):
  """(verdict, learned) of a collapse evaluation's summary (ppl_by_position / copy_task):
  verdict one of criteria.VERDICTS, learned True / False / None (unknown).

  learned is False if the loss within T is not clearly below chance (the task's "learned", or
  criteria.is_learned on its chance_loss for results written without it) or, with a sweep's
  `learned_max_loss`, above that; then the verdict is "not learned", whatever the test said.
  """
  s = summary or {}
  within = s.get("copy_loss_within_train", s.get("mean_loss_within_train"))
  learned = s.get("learned")
  if learned is None:
    learned = criteria.is_learned(within, s.get("chance_loss"))
  if learned_max_loss is not None and within is not None:
    learned = learned is not False and within <= learned_max_loss
  if learned is False:
    return "not learned", False
  passed = s.get("forget_test_passed")
  verdict = s.get("forget_verdict") or {True: "pass", False: "fail"}.get(passed, "n/a")
  return verdict, learned


def t_forget(points: Iterable[tuple[float, int, bool | None]]) -> dict[float, int | None]:
  """points: (state_size, train_len, passed) per run -> {state_size: T_forget or None}.
  passed None (not learned, undetermined) leaves the run out: never a pass, never a collapse."""
  by_state: dict[float, list[tuple[int, bool]]] = {}
  for ns, t, ok in points:
    if ok is None:
      by_state.setdefault(ns, [])
      continue
    by_state.setdefault(ns, []).append((int(t), bool(ok)))
  out = {}
  for ns, runs in sorted(by_state.items()):
    runs.sort()
    best = None
    for i in range(len(runs) - 1, -1, -1):  # longest first: extend while every run passes
      if not runs[i][1]:
        break
      best = runs[i][0]
    out[ns] = best
  return out


def t_forget_bounds(
  points: Iterable[tuple[float, int, bool | None]],
) -> dict[float, tuple[int | None, int | None]]:
  """points as for `t_forget` -> {state_size: (lower, T_forget)}: lower is the longest training
  length below T_forget (a run that collapsed), None if T_forget is the shortest length run (an
  upper bound only) or if there is no T_forget."""
  points = list(points)
  out = {}
  for ns, upper in t_forget(points).items():
    below = [
      int(t)
      for n, t, ok in points
      if n == ns and ok is not None and upper is not None and t < upper
    ]
    out[ns] = (max(below) if below else None, upper)
  return out


def t_recall(points: Iterable[tuple[float, int, int | None]]) -> dict[float, int | None]:
  """points: (state_size, train_len, the run's T_recall or None) -> {state_size: max T_recall}."""
  out: dict[float, int | None] = {}
  for ns, _, tr in points:
    cur = out.get(ns)
    if tr is not None and (cur is None or tr > cur):
      out[ns] = int(tr)
    else:
      out.setdefault(ns, cur)
  return dict(sorted(out.items()))


def r_squared(y, y_hat) -> float:
  y, y_hat = np.asarray(y, float), np.asarray(y_hat, float)
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  ss_res = float(np.sum((y - y_hat) ** 2))
  return float("nan") if ss_tot == 0 else 1.0 - ss_res / ss_tot


@dataclasses.dataclass
class Fit:
  law: str
  params: dict[str, float]
  r2: float
  n: int
  note: str = ""

  def predict(self, x):
    x = np.asarray(x, float)
    p = self.params
    if self.law == "linear":
      return p["a"] * x + p["b"]
    return p["a"] * (np.power(p["base"], x) - 1.0) + p["c"]

  def formula(self, x_name="N_S", digits=4) -> str:
    p = self.params

    def g(v):
      return f"{v:.{digits}g}"

    def plus(v):
      return f"+ {g(v)}" if v >= 0 else f"− {g(-v)}"

    if self.law == "linear":
      return f"{g(p['a'])}·{x_name} {plus(p['b'])}"
    return f"{g(p['a'])}·({p['base']:.{max(digits, 6)}g}^{x_name} − 1) {plus(p['c'])}"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def fit_linear(x: Sequence[float], y: Sequence[float]) -> Fit | None:
  """y = a x + b by least squares (None with fewer than 2 points)."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.size < 2 or np.ptp(x) == 0:
    return None
  a, b = np.polyfit(x, y, 1)
  note = "" if x.size > 2 else "2 points: exact, R² is not informative"
  return Fit("linear", {"a": float(a), "b": float(b)}, r_squared(y, a * x + b), int(x.size), note)


def fit_exponential(x: Sequence[float], y: Sequence[float]) -> Fit | None:
  """y = a (base^x - 1) + c by nonlinear least squares (None with fewer than 3 points).

  x is rescaled to [0, 1] for the solver (base^x = (base^s)^(x/s)), started from a grid of
  bases; the best fit (least squared error) is returned in the original units.
  """
  from scipy.optimize import curve_fit  # pylint: disable=g-import-not-at-top

  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.size < 3 or np.ptp(x) == 0:
    return None
  s = float(np.max(np.abs(x)))
  xs = x / s

  def law(u, a, log_base, c):
    return a * np.expm1(log_base * u) + c

  best = None
  for lb0 in (0.5, 1.0, 2.0, 4.0, 8.0):
    a0 = (y.max() - y.min()) / max(math.expm1(lb0), 1e-9)
    try:
      popt, _ = curve_fit(law, xs, y, p0=(a0, lb0, y.min()), maxfev=20000)
    except (RuntimeError, ValueError):
      continue
    err = float(np.sum((law(xs, *popt) - y) ** 2))
    if np.all(np.isfinite(popt)) and (best is None or err < best[0]):
      best = (err, popt)
  if best is None:
    return None
  a, lb, c = best[1]
  base = math.exp(lb / s)
  note = "" if x.size > 3 else "3 points and 3 parameters: exact, R² is not informative"
  return Fit(
    "exponential",
    {"a": float(a), "base": base, "c": float(c)},
    r_squared(y, law(xs, a, lb, c)),
    int(x.size),
    note,
  )
