"""Padding of kernel inputs along one axis (the chunked sequence, headdim, d_state)."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["pad_axis"]


def pad_axis(t, target: int, axis: int = 1, mode: str = "constant"):
  """Pad ``t`` along ``axis`` up to length ``target`` (zeros, or 'edge' repeat)."""
  n = t.shape[axis]
  if n == target:
    return t
  widths = [(0, 0)] * t.ndim
  widths[axis] = (0, target - n)
  return jnp.pad(t, widths, mode=mode)
