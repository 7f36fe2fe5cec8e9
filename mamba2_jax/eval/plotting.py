"""Matplotlib helpers (Agg backend, no display needed): figures, the training-length marker."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

__all__ = ["plt", "mark_train_len", "save", "fmt_tokens"]


def fmt_tokens(n: float) -> str:
  """1024 -> '1K', 1048576 -> '1M', 1500 -> '1.5K' (binary multiples), 100 -> '100'."""
  n = float(n)
  for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
    if abs(n) >= scale:
      v = n / scale
      return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
  return f"{n:.0f}"


def mark_train_len(ax, train_len, *, half: bool = False, label: bool = True) -> None:
  """Red dashed vertical line at the training length (and a green one at half of it)."""
  if not train_len:
    return
  ax.axvline(
    train_len,
    color="red",
    linestyle="--",
    linewidth=1,
    label=f"train len {fmt_tokens(train_len)}" if label else None,
  )
  if half:
    ax.axvline(
      train_len / 2,
      color="green",
      linestyle="--",
      linewidth=1,
      label=f"half train len {fmt_tokens(train_len / 2)}" if label else None,
    )


def save(fig, path, dpi: int = 150) -> str:
  """Saves and closes `fig`; returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return str(path)
