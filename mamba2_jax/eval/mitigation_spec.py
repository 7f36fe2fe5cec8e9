"""Training-free mitigations named by a spec string, applied to an evaluated model.

Mitigation specs (`--config.mitigation`): "" (none), or comma-separated items: at most one
preset name of `mamba2_jax.mitigations.PRESETS` (rri, rri_decay, longmamba, window_2k,
state_norm, ...) and `field=value` items with `Mamba2Config` mitigation fields (rri_decay_scale,
rri_insert_scale, dt_scale, ssd_window, state_norm, state_norm_chunk, state_norm_threshold),
e.g. "rri", "rri_decay_scale=0.9999,rri_insert_scale=0.75", "state_norm,calibrate=2". They go
to `mamba2_jax.mitigations.with_mitigations(model, preset=..., **fields)`. With state
normalization on and no explicit state_norm_threshold, the thresholds are calibrated by
`calibrate_state_norm(model, newline prompt, multiplier=calibrate (default 1))`; the newline
prompt has `calibrate_len` tokens (default T_train, else 8192).

(Moved unchanged from mamba2_jax/eval/sources.py, whose model loading is now
`mamba2_jax.checkpoints.load`.)
"""

from __future__ import annotations

import logging
from typing import Any

from mamba2_jax.data import get_tokenizer

log = logging.getLogger(__name__)


def parse_mitigation(spec: str) -> tuple[str | None, dict[str, Any]]:
  """ "" -> (None, {}); "rri" -> ("rri", {}); "rri,dt_scale=0.5" -> ("rri", {"dt_scale": 0.5});
  "a=1,b=true,c=0.5" -> (None, {a: 1, b: True, c: 0.5})."""
  preset, fields = None, {}
  for item in (spec or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      if preset is not None:
        raise ValueError(f"mitigation {spec!r}: two presets ({preset!r}, {item!r})")
      preset = item
      continue
    k, v = (t.strip() for t in item.split("=", 1))
    fields[k] = _parse_value(v)
  return preset, fields


def _parse_value(v: str):
  low = v.lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  try:
    return int(v)
  except ValueError:
    pass
  try:
    return float(v)
  except ValueError:
    return v


def apply_mitigation(model, spec: str, *, tokenizer=None, train_len: int | None = None):
  """`model` with the mitigation `spec` applied (see the module docstring); returns it unchanged
  for an empty spec."""
  from mamba2_jax import mitigations  # pylint: disable=g-import-not-at-top

  preset, fields = parse_mitigation(spec)
  if preset is None and not fields:
    return model
  multiplier = fields.pop("calibrate", None)
  calibrate_len = int(fields.pop("calibrate_len", 0) or train_len or 8192)
  calibrate_span = int(fields.pop("calibrate_span", 32))  # synthetic copy vocabularies
  model = mitigations.with_mitigations(model, preset=preset, **fields)
  state_norm_on = model.config.state_norm != "off"
  if multiplier is not None and not state_norm_on:
    raise ValueError(f"mitigation {spec!r}: calibrate= needs state normalization on")
  if state_norm_on and "state_norm_threshold" not in fields:
    from mamba2_jax.data.synthetic import SyntheticTokenizer, copy_prompt  # pylint: disable=g-import-not-at-top
    from mamba2_jax.eval.prompts import newline_prompt  # pylint: disable=g-import-not-at-top

    tok = get_tokenizer(tokenizer or "byte")
    if isinstance(tok, SyntheticTokenizer):  # no text: a copy stream of fresh pairs
      ref = copy_prompt(tok.vocab_size, calibrate_span, calibrate_len, 54321)[0][None]
      kind = "copy-task"
    else:
      ref, kind = newline_prompt(tok, calibrate_len)[None], "newline"
    multiplier = 1.0 if multiplier is None else float(multiplier)
    model = mitigations.calibrate_state_norm(model, ref, multiplier=multiplier)
    log.info(
      "state-norm thresholds calibrated on %d %s tokens, multiplier %g",
      ref.shape[1],
      kind,
      multiplier,
    )
  log.info("mitigation %r: preset %s, fields %s", spec, preset, fields)
  return model
