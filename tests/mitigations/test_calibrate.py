"""State-norm calibration (measured norms -> thresholds) and `with_mitigations` (shared
parameters, thresholds kept or refilled, presets).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import ConfigError
from mamba2_jax.mitigations import (
  PRESETS,
  StateNormThreshold,
  calibrate_state_norm,
  measure_state_norms,
  preset_fields,
  state_norm_thresholds,
  with_mitigations,
)
from tests.mitigations import helpers
from tests.mitigations.helpers import CFG, close, decode_step, run_decode

model, tokens = helpers.model, helpers.tokens


def test_calibrate_state_norm_sets_measured_values(model, tokens):
  _, c = run_decode(model, tokens[:, :1])
  norms = []
  for t in range(1, tokens.shape[1]):
    norms.append(np.linalg.norm(np.asarray(c.ssm), axis=(-2, -1)).max(axis=1))  # (n_layer, H)
    _, c = decode_step(model, tokens[:, t], c)
  norms.append(np.linalg.norm(np.asarray(c.ssm), axis=(-2, -1)).max(axis=1))
  want_max, want_final = np.max(norms, axis=0), norms[-1]
  close(measure_state_norms(model, tokens, stride=1), want_max, 1e-5)
  close(measure_state_norms(model, tokens, reduce="final"), want_final, 1e-5)
  m = with_mitigations(model, state_norm="chunk")
  assert calibrate_state_norm(m, tokens, multiplier=2.0, stride=1) is m
  close(state_norm_thresholds(m), 2.0 * want_max, 1e-5)
  calibrate_state_norm(m, tokens, reduce="final", per_head=False)
  close(state_norm_thresholds(m), np.full_like(want_final, want_final.max()), 1e-5)
  with pytest.raises(ValueError, match="state normalization is off"):
    calibrate_state_norm(model, tokens)


def test_with_mitigations_shares_parameters_and_keeps_default_state(model):
  assert not any(isinstance(v, StateNormThreshold) for _, v in nnx.to_flat_state(nnx.state(model)))
  assert model.init_cache(1).pos is None and model.init_cache(1).win_h is None
  m = with_mitigations(model, rri_decay_scale=0.9999, rri_insert_scale=0.75)
  assert m.config.rri_decay_scale == 0.9999 and model.config.rri_decay_scale == 1.0
  assert m.layers.mixer.in_proj_x.get_value() is model.layers.mixer.in_proj_x.get_value()
  n = with_mitigations(model, state_norm="chunk", state_norm_threshold=3.0)
  assert np.all(np.asarray(state_norm_thresholds(n)) == 3.0)
  assert state_norm_thresholds(n).shape == (CFG.n_layer, CFG.nheads)
  params = nnx.to_flat_state(nnx.state(n, nnx.Param))
  assert not any(isinstance(v, StateNormThreshold) for _, v in params)
  n.layers.mixer.state_norm_tau.set_value(jnp.full((CFG.n_layer, CFG.nheads), 7.0))
  kept = with_mitigations(n, rri_decay_scale=0.99)  # thresholds survive other changes
  assert np.all(np.asarray(state_norm_thresholds(kept)) == 7.0)
  refilled = with_mitigations(n, state_norm_threshold=2.0)
  assert np.all(np.asarray(state_norm_thresholds(refilled)) == 2.0)
  off = with_mitigations(n, preset="off")
  assert off.config == model.config and not hasattr(off.layers.mixer, "state_norm_tau")
  assert with_mitigations(model, preset="rri").config.rri_insert_scale == 0.75
  with pytest.raises(ConfigError, match="unknown field"):
    with_mitigations(model, no_such_field=1)
  with pytest.raises(ValueError, match="shape"):
    with_mitigations(model, d_state=8)
  for name in PRESETS:
    CFG.replace(**preset_fields(name))
