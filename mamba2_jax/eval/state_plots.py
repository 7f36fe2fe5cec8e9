"""Plots of `state_stats`: per-head state norms and retention, explosion heatmap, input stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mamba2_jax.eval.plotting import fmt_tokens, mark_train_len, plt, save


def _per_head(
  stats_key,
  ylabel,
  stats,
  positions,
  results,
  out: Path,
  name,
  *,
  transform=None,
  ylim=None,
  logy=False,
) -> str:
  layers, heads = results["plot_layers"], results["plot_heads"]
  fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.2), squeeze=False)
  for ax, layer in zip(axes[0], layers):
    y = stats[stats_key][:, layer]
    y = transform(y) if transform else y
    for h in heads:
      ax.plot(positions, y[:, h], linewidth=1, label=f"head {h}")
    mark_train_len(ax, results["train_len"], label=False)
    ax.set_title(f"layer {layer}", fontsize=9)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(ylabel)
    if ylim:
      ax.set_ylim(*ylim)
    if logy:
      ax.set_yscale("log")
  axes[0][-1].legend(fontsize=6, ncol=2)
  return save(fig, out / name)


def plot_all(stats: dict, positions: np.ndarray, snaps: dict, results: dict, out: Path):
  paths = [
    _per_head("norm", "state norm ||h||_F", stats, positions, results, out, "state_norm.png"),
    _per_head(
      "log_retention",
      "retention alpha_{1:t}",
      stats,
      positions,
      results,
      out,
      "retention.png",
      transform=np.exp,
      ylim=(0, 1.02),
    ),
  ]
  ratio = np.asarray(results["explosion_ratio"], float)
  if np.isfinite(ratio).any():
    fig, ax = plt.subplots(
      figsize=(max(4, 0.18 * ratio.shape[1] + 2), max(3, 0.12 * ratio.shape[0] + 1.5))
    )
    im = ax.imshow(
      np.log10(np.clip(ratio, 1e-3, 1e6)), aspect="auto", cmap="magma", interpolation="nearest"
    )
    fig.colorbar(im, ax=ax, label="log10(max norm beyond / within T_train)")
    for d in results["exploding_heads"]:
      ax.plot(d["head"], d["layer"], "c.", markersize=4)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(
      f"state norm explosion ratio (dots: > {results['config'].explode_factor:g}x)", fontsize=9
    )
    paths.append(save(fig, out / "explosion_ratio.png"))

  layer = results["plot_layers"][0]
  heads = results["plot_heads"]
  fig, axes = plt.subplots(2, 3, figsize=(13, 6))
  panels = [
    ("dt_mean", "dt (per head)", True),
    ("x_mean", "x mean over P (per head)", True),
    ("x_var", "x var over P (per head)", True),
    ("B_mean", "B mean / var over N", False),
    ("C_mean", "C mean / var over N", False),
    ("conv_mean", "conv state mean / var", False),
  ]
  for ax, (key, title, per_head) in zip(axes.flat, panels):
    if per_head:
      for h in heads:
        ax.plot(positions, stats[key][:, layer, h], linewidth=0.8, label=f"head {h}")
    else:
      var_key = key.replace("mean", "var")
      ax.plot(positions, stats[key][:, layer], label="mean")
      ax.plot(positions, stats[var_key][:, layer], label="var")
      ax.legend(fontsize=6)
    mark_train_len(ax, results["train_len"], label=False)
    ax.set_title(f"layer {layer}: {title}", fontsize=9)
    ax.set_xlabel("position (tokens)")
  axes.flat[0].legend(fontsize=6, ncol=2)
  paths.append(save(fig, out / "inputs.png"))

  if snaps:
    h = results["histogram"]
    values = {p: np.asarray(v, float).ravel() for p, v in sorted(snaps.items())}
    allv = np.concatenate(list(values.values()))
    if np.isfinite(allv).all() and allv.size:
      bins = np.linspace(allv.min(), allv.max() + 1e-12, 41)
      fig, ax = plt.subplots(figsize=(5, 3.2))
      for p, v in values.items():
        ax.hist(v, bins=bins, histtype="step", log=True, label=f"t = {fmt_tokens(p)}")
      ax.set_title(f"state entries, layer {h['layer']} head {h['head']}", fontsize=9)
      ax.set_xlabel("value")
      ax.set_ylabel("count (log)")
      ax.legend(fontsize=7)
      paths.append(save(fig, out / "state_hist.png"))
  return paths
