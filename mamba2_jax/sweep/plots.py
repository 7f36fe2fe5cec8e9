"""The sweep report's figures: loss curves of several runs, a capacity law against its points."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["curve_plot", "fit_plot"]


def curve_plot(names, out: Path, title: str, key="loss") -> str | None:
  """One figure: (label, results, train_len) curves of bucketed `key` vs position."""
  from mamba2_jax.eval.plotting import plt, save  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4))
  any_line = False
  for i, (label, res, train_len) in enumerate(names):
    b = res.get("buckets") or {}
    if key not in b:
      continue
    x = (np.asarray(b["start"], float) + np.asarray(b["end"], float)) / 2
    color = f"C{i % 10}"
    ax.plot(x, np.asarray(b[key], float), color=color, linewidth=1.2, label=label)
    if train_len:
      ax.axvline(train_len, color=color, linestyle="--", linewidth=0.8)
    chance = (res.get("summary") or {}).get("chance_loss")
    if chance and not any_line:
      ax.axhline(chance, color="0.5", linestyle=":", linewidth=1, label="chance")
    any_line = True
  if not any_line:
    plt.close(fig)
    return None
  ax.set_xscale("log")
  ax.set_xlabel("position (tokens); dashed: each run's training length")
  ax.set_ylabel("loss (nats)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  return save(fig, out)


def fit_plot(points: dict, fit, out: Path, ylabel: str) -> str | None:
  from mamba2_jax.eval.plotting import plt, save  # pylint: disable=g-import-not-at-top

  xs = [k for k, v in points.items() if v is not None]
  if not xs:
    return None
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.scatter(xs, [points[k] for k in xs], color="C0", zorder=3, label="measured")
  if fit is not None:
    grid = np.linspace(0, max(xs) * 1.1, 200)
    ax.plot(grid, fit.predict(grid), color="C1", label=f"{fit.formula()}  (R² {fit.r2:.3f})")
  ax.set_xlabel("state size N_S (scalars)")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  return save(fig, out)
