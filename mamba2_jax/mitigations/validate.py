"""The rules of the mitigation fields of `Mamba2Config` (called by `Mamba2Config.validate`).

The rules shared with the SSD op's own arguments (a scale is finite and > 0, a window is an
int, the impls with a window) come from mamba2_jax.ssd, so each rule is written once.
"""

from __future__ import annotations

import math

from mamba2_jax.ssd.api import WINDOW_IMPLS
from mamba2_jax.ssd.common import is_count, is_positive_finite

__all__ = ["STATE_NORMS", "validate_fields"]

STATE_NORMS = ("off", "token", "chunk")


def validate_fields(config, fail) -> None:
  """Check the mitigation fields of `config`; `fail(field, rule)` raises (a ConfigError)."""

  def number(f):
    v = getattr(config, f)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
      fail(f, f"must be a number, got {v!r}")
    return float(v)

  if not 0.0 < number("rri_decay_scale") <= 1.0:
    fail("rri_decay_scale", f"must be in (0, 1] (1 = off), got {config.rri_decay_scale!r}")
  for f in ("rri_insert_scale", "dt_scale"):
    v = number(f)
    if not is_positive_finite(v):
      fail(f, f"must be a finite number > 0 (1 = off), got {v!r}")
  w = config.ssd_window
  if not is_count(w, 0):
    fail("ssd_window", f"must be an integer >= 0 (0 = off), got {w!r}")
  if config.state_norm not in STATE_NORMS:
    fail("state_norm", f"must be one of {STATE_NORMS}, got {config.state_norm!r}")
  q = config.state_norm_chunk
  if not is_count(q, 1):
    fail("state_norm_chunk", f"must be a positive integer, got {q!r}")
  if not number("state_norm_threshold") > 0.0:
    fail("state_norm_threshold", f"must be > 0 (inf allowed), got {config.state_norm_threshold!r}")
  window_impls = ("auto", *sorted(WINDOW_IMPLS))  # 'auto' resolves to a window impl
  if w > 0 and config.ssd_impl not in window_impls:
    fail(
      "ssd_window",
      f"needs ssd_impl in {window_impls} (the Pallas impls have no "
      f"window), got ssd_impl={config.ssd_impl!r}",
    )
  if w > 0 and config.state_norm != "off":
    fail(
      "ssd_window",
      f"cannot be combined with state_norm (the window differences the "
      f"un-normalized state sequence), got ssd_window={w}, state_norm={config.state_norm!r}",
    )
