"""The mitigation fields of `Mamba2Config` and named settings of them (paper §3)."""

from __future__ import annotations

import dataclasses
from typing import Any

from mamba2_jax.config import Mamba2Config

__all__ = ["MITIGATION_FIELDS", "PRESETS", "preset_fields"]

MITIGATION_FIELDS = (
  "rri_decay_scale",
  "rri_insert_scale",
  "dt_scale",
  "ssd_window",
  "state_norm",
  "state_norm_chunk",
  "state_norm_threshold",
)
# "off": the config's own defaults (every mitigation is off by default)
_OFF = {f.name: f.default for f in dataclasses.fields(Mamba2Config) if f.name in MITIGATION_FIELDS}

# Named settings (paper §3, docs/mitigations.md). Every preset sets all mitigation fields (others off), so
# presets do not stack by accident; override single fields with keyword arguments.
PRESETS: dict[str, dict[str, Any]] = {
  "off": {},
  "rri": dict(rri_decay_scale=0.9999, rri_insert_scale=0.75),  # v2 §3.2.2 (picked at 32K)
  "rri_decay": dict(rri_decay_scale=0.9999),  # repo 780M plot: alpha x 0.9999, B x 1
  "rri_0.99999_0.7": dict(rri_decay_scale=0.99999, rri_insert_scale=0.7),  # repo 780M plot
  "longmamba": dict(dt_scale=0.5),  # jzhang38/LongMamba default
  "longmamba_0.2": dict(dt_scale=0.2),  # repo 780M plot
  "window_1k": dict(ssd_window=1024),  # r is not given by the paper: sweep 1K..T_train
  "window_2k": dict(ssd_window=2048),
  "window_4k": dict(ssd_window=4096),
  "state_norm": dict(state_norm="chunk", state_norm_chunk=128),  # paper code: 128-token blocks
  "state_norm_token": dict(state_norm="token"),
}


def preset_fields(name: str, **overrides) -> dict[str, Any]:
  """All mitigation fields of preset `name` (others off), updated with `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"unknown mitigation preset {name!r}; allowed: {sorted(PRESETS)}")
  return {**_OFF, **PRESETS[name], **overrides}
