"""State-norm thresholds: measure a model's state norms, calibrate tau from them, get / set tau.

`calibrate_state_norm(model, tokens, multiplier)` measures per-(layer, head) state norms of the
model without state normalization on a reference prompt and stores tau in the model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba2_jax.model import Mamba2LM

from .configure import with_mitigations
from .state_norm import StateNormThreshold

__all__ = [
  "measure_state_norms",
  "calibrate_state_norm",
  "set_state_norm_threshold",
  "state_norm_thresholds",
]


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
