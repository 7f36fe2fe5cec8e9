"""Training-free state-collapse mitigations of *Stuffed Mamba* (paper §3), in one package.

Everything is a config field (mamba2_jax/config.py) applied by every layer and head in the
forward, in prefill with a cache and in the decode step:

  rri_decay_scale  c_a in (0, 1]  alpha_t *= c_a, i.e. log alpha_t = dt_t A + log c_a (RRI)
  rri_insert_scale c_b > 0        B_t *= c_b (RRI)
  dt_scale         s > 0          dt_t *= s after softplus/clip (LongMamba: decay and insertion)
  ssd_window       r >= 1         y_t reads h_t - alpha_{t-r+1:t} h_{t-r} (eq. 8); 0 = off
  state_norm       off|token|chunk, state_norm_chunk, state_norm_threshold: h *= min(1, tau/||h||)

Modules:
  presets       MITIGATION_FIELDS, PRESETS (named settings), preset_fields
  spec          the "preset,field=value" spec of the evaluation CLI: parse_mitigation,
                apply_mitigation
  validate      the rules of the config fields (Mamba2Config.validate calls them)
  ssm           the SSM of a layer with the configured mitigations: ssm_sequence (forward and
                prefill) and ssm_step (decode), the two calls of the mixer
  state_norm    state normalization: normalize_state, block_normalized_ssd, the thresholds'
                variable type
  window_cache  the sliding window's cache across prefill pieces and decode steps (the in-op
                window correction is mamba2_jax/ssd/window.py)
  configure     with_mitigations(model, preset, **fields): same parameters, new config
  calibrate     measure_state_norms, calibrate_state_norm, thresholds get/set

Names are imported lazily (the model imports the leaf modules ssm / state_norm /
window_cache; configure and calibrate import the model).
"""

import importlib

_EXPORTS = {
  "MITIGATION_FIELDS": "presets",
  "PRESETS": "presets",
  "preset_fields": "presets",
  "parse_mitigation": "spec",
  "apply_mitigation": "spec",
  "STATE_NORMS": "validate",
  "validate_fields": "validate",
  "ssm_sequence": "ssm",
  "ssm_step": "ssm",
  "StateNormThreshold": "state_norm",
  "threshold_variable": "state_norm",
  "normalize_state": "state_norm",
  "block_normalized_ssd": "state_norm",
  "window_prefill": "window_cache",
  "window_step": "window_cache",
  "with_mitigations": "configure",
  "measure_state_norms": "calibrate",
  "calibrate_state_norm": "calibrate",
  "set_state_norm_threshold": "calibrate",
  "state_norm_thresholds": "calibrate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
