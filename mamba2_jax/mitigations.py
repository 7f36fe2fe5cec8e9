"""Training-free state-collapse mitigations of *Stuffed Mamba* (paper §3) on a Mamba2LM.

Everything is a config field (mamba2_jax/config.py) applied by every layer and head in the
forward, in prefill with a cache and in the decode step (mixer.py):

  rri_decay_scale  c_a in (0, 1]  alpha_t *= c_a, i.e. log alpha_t = dt_t A + log c_a (RRI)
  rri_insert_scale c_b > 0        B_t *= c_b (RRI)
  dt_scale         s > 0          dt_t *= s after softplus/clip (LongMamba: decay and insertion)
  ssd_window       r >= 1         y_t reads h_t - alpha_{t-r+1:t} h_{t-r} (eq. 8); 0 = off
  state_norm       off|token|chunk, state_norm_chunk, state_norm_threshold: h *= min(1, tau/||h||)

`with_mitigations(model, **fields)` returns a model sharing the parameters with a new config;
`calibrate_state_norm(model, tokens, multiplier)` measures per-(layer, head) state norms of the
model without state normalization on a reference prompt and stores tau in the model.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba2_jax.model import Mamba2LM
from mamba2_jax.state_norm import StateNormThreshold

__all__ = [
  "MITIGATION_FIELDS",
  "PRESETS",
  "preset_fields",
  "with_mitigations",
  "measure_state_norms",
  "calibrate_state_norm",
  "set_state_norm_threshold",
  "state_norm_thresholds",
]

MITIGATION_FIELDS = (
  "rri_decay_scale",
  "rri_insert_scale",
  "dt_scale",
  "ssd_window",
  "state_norm",
  "state_norm_chunk",
  "state_norm_threshold",
)
_OFF = dict(
  rri_decay_scale=1.0,
  rri_insert_scale=1.0,
  dt_scale=1.0,
  ssd_window=0,
  state_norm="off",
  state_norm_chunk=128,
  state_norm_threshold=math.inf,
)

# Named settings (docs/mitigations.md §3). Every preset sets all mitigation fields (others off), so
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


def with_mitigations(model: Mamba2LM, preset: str | None = None, **config_fields) -> Mamba2LM:
  """A Mamba2LM with `model.config.replace(**config_fields)` and the same parameter arrays.

  Parameters are shared, not copied. `preset`: start from `preset_fields(preset)` (every
  mitigation field reset) before applying `config_fields`. State-norm thresholds: kept from
  `model` when it has them and `state_norm_threshold` is not given, else filled with the
  (new) `state_norm_threshold`. The default config creates no threshold variable.
  """
  fields = dict(config_fields)
  if preset is not None:
    fields = preset_fields(preset, **fields)
  config = model.config.replace(**fields)
  abstract = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  old = dict(nnx.to_flat_state(nnx.state(model)))
  refill = "state_norm_threshold" in fields
  for path, var in nnx.to_flat_state(state):
    if path in old and not (refill and isinstance(var, StateNormThreshold)):
      value = old[path].get_value()
    elif isinstance(var, StateNormThreshold):
      value = jnp.full(var.shape, config.state_norm_threshold, var.dtype)
    else:
      raise ValueError(
        f"with_mitigations: {'/'.join(map(str, path))} missing from the model "
        "(only mitigation fields may change the variables)"
      )
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(
        f"with_mitigations: {'/'.join(map(str, path))} has shape {value.shape}, "
        f"the new config needs {var.shape} (change only mitigation fields)"
      )
    var.set_value(value)
  return nnx.merge(graphdef, state)


def _threshold_variable(model: Mamba2LM) -> StateNormThreshold:
  mixer = model.layers.mixer
  if not hasattr(mixer, "state_norm_tau"):
    raise ValueError(
      "state normalization is off in this model (config.state_norm='off'); "
      "enable it first, e.g. with_mitigations(model, state_norm='chunk')"
    )
  return mixer.state_norm_tau


def state_norm_thresholds(model: Mamba2LM) -> jax.Array:
  """The thresholds tau (n_layer, nheads) float32 of a model with state normalization on."""
  return _threshold_variable(model)[...]


def set_state_norm_threshold(model: Mamba2LM, tau) -> Mamba2LM:
  """Sets tau in place: a scalar (all layers and heads), (nheads,) or (n_layer, nheads)."""
  var = _threshold_variable(model)
  tau = jnp.asarray(tau, jnp.float32)
  try:
    full = jnp.broadcast_to(tau, var.shape)
  except ValueError:
    raise ValueError(
      f"state-norm threshold of shape {tau.shape} does not broadcast to "
      f"(n_layer, nheads) = {tuple(var.shape)}"
    ) from None
  if not bool(jnp.all(full > 0)):
    raise ValueError("state-norm thresholds must be > 0")
  var.set_value(full)
  return model


def measure_state_norms(
  model: Mamba2LM, tokens, *, reduce: str = "max", stride: int | None = None
) -> jax.Array:
  """Per-(layer, head) Frobenius norm of the SSM state of `model` with state_norm off.

  tokens (b, L) int: the reference prompt(s). The prompt is prefilled in pieces of `stride`
  tokens (default config.state_norm_chunk; 1 = every position, via the decode step) and the
  norms are read after each piece. reduce: "max" (over the pieces' ends, i.e. positions
  stride-1, 2*stride-1, ..., and L-1) or "final" (after the last token); always the max over
  the batch. Returns (n_layer, nheads) float32. Other mitigations stay as configured.
  """
  if reduce not in ("max", "final"):
    raise ValueError(f"measure_state_norms: reduce must be 'max' or 'final', got {reduce!r}")
  plain = model if model.config.state_norm == "off" else with_mitigations(model, state_norm="off")
  toks = jnp.asarray(tokens, jnp.int32)
  if toks.ndim == 1:
    toks = toks[None]
  stride = stride or plain.config.state_norm_chunk
  if stride < 1:
    raise ValueError(f"measure_state_norms: stride must be >= 1, got {stride}")
  graphdef, state = nnx.split(plain)

  @jax.jit
  def piece(state, toks, cache):
    m = nnx.merge(graphdef, state)
    if toks.shape[1] == 1:
      _, cache = m.decode_step(toks[:, 0], cache)
    else:
      _, cache = m.prefill(toks, cache)
    norms = jnp.sqrt(jnp.sum(jnp.square(cache.ssm), axis=(-2, -1)))  # (n_layer, b, H)
    return jnp.max(norms, axis=1), cache

  cache = plain.init_cache(toks.shape[0])
  best = None
  L = toks.shape[1]
  for start in range(0, L, stride):
    norms, cache = piece(state, toks[:, start : start + stride], cache)
    best = norms if best is None or reduce == "final" else jnp.maximum(best, norms)
  return best


def calibrate_state_norm(
  model: Mamba2LM,
  tokens,
  multiplier: float = 1.0,
  *,
  reduce: str = "max",
  stride: int | None = None,
  per_head: bool = True,
) -> Mamba2LM:
  """Sets tau_{l,h} = multiplier * measured state norm (see `measure_state_norms`) in place.

  `model` must have state normalization on (its thresholds variable exists); the measurement
  runs the same parameters with state_norm off. per_head=False: one threshold, the max over
  all layers and heads. Returns `model` (for chaining).
  """
  _threshold_variable(model)
  if not (math.isfinite(multiplier) and multiplier > 0):
    raise ValueError(
      f"calibrate_state_norm: multiplier must be a finite number > 0, got {multiplier}"
    )
  norms = measure_state_norms(model, tokens, reduce=reduce, stride=stride)
  if not per_head:
    norms = jnp.max(norms)
  tau = multiplier * norms
  # an all-zero state (e.g. a head that never saw input) would give tau = 0; keep it positive
  tau = jnp.where(tau > 0, tau, np.finfo(np.float32).tiny)
  return set_state_norm_threshold(model, tau)
