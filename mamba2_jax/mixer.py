"""Mamba2Mixer: in_proj -> (z, x, B, C, dt) -> causal conv -> SSD -> gated RMSNorm -> out_proj.

The official fused in_proj (columns [z | x | B | C | dt]) and conv1d (channels [x | B | C]) are
stored as separate parameters so that tensor parallelism can shard heads cleanly (z, x, dt,
A_log, D, the gated norm and out_proj rows over "heads"/"inner"; B and C over "group_state").
The checkpoint importer splits the official tensors (mamba2_jax/checkpoints/hub.py).

`ssm_inputs` computes what the SSM consumes (x, B, C, dt, z after in_proj, conv and SiLU) for a
sequence or one decode token; state introspection (mamba2_jax/eval/introspect.py) uses it too.
The SSM itself, with the state-collapse mitigations of the config (mamba2_jax/mitigations/), is
one call: `mitigations.ssm.ssm_sequence` in the forward and prefill, `ssm_step` in the decode
step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.config import Mamba2Config
from mamba2_jax.context_conv import causal_convs
from mamba2_jax.layers import (
  A_log_init,
  conv_step,
  dense,
  dt_bias_init,
  gated_rms_norm,
  param,
  uniform_init,
)
from mamba2_jax.mitigations import ssm as mitigated
from mamba2_jax.mitigations.state_norm import threshold_variable


class SSMInputs(NamedTuple):
  """What the SSM of a layer consumes, for a sequence (b, L, ...) or one token (b, ...).

  x:  (b, [L,] H, P)  after conv + SiLU (compute dtype)
  B:  (b, [L,] G, N)  after conv + SiLU and rri_insert_scale
  C:  (b, [L,] G, N)  after conv + SiLU
  dt: (b, [L,] H)     raw (in_proj output; `Mamba2Mixer.processed_dt` gives the SSM's dt)
  z:  (b, [L,] d_inner) gate input
  conv: the new conv contexts (conv_x, conv_B, conv_C), each (b, d_conv-1, channels)
  """

  x: jax.Array
  B: jax.Array
  C: jax.Array
  dt: jax.Array
  z: jax.Array
  conv: tuple[jax.Array, jax.Array, jax.Array]


class Mamba2Mixer(nnx.Module):
  """One Mamba-2 mixer. Inputs/outputs (b, L, d_model) in the config's compute dtype."""

  def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
    c = self.config = config
    d, e, h, gn, k = c.d_model, c.d_inner, c.nheads, c.ngroups * c.d_state, c.d_conv
    pdt = c.param_jnp_dtype
    bound_in = 1.0 / math.sqrt(d)
    self.in_proj_z = param(uniform_init(rngs.params(), (d, e), bound_in, pdt), ("embed", "inner"))
    self.in_proj_x = param(uniform_init(rngs.params(), (d, e), bound_in, pdt), ("embed", "inner"))
    self.in_proj_B = param(
      uniform_init(rngs.params(), (d, gn), bound_in, pdt), ("embed", "group_state")
    )
    self.in_proj_C = param(
      uniform_init(rngs.params(), (d, gn), bound_in, pdt), ("embed", "group_state")
    )
    self.in_proj_dt = param(uniform_init(rngs.params(), (d, h), bound_in, pdt), ("embed", "heads"))
    if c.proj_bias:
      self.in_proj_bias = param(jnp.zeros((c.d_in_proj,), pdt), ("in_proj",))
    bound_conv = 1.0 / math.sqrt(k)  # depthwise: fan_in = d_conv
    self.conv_x = param(
      uniform_init(rngs.params(), (k, e), bound_conv, pdt), ("conv_width", "inner")
    )
    self.conv_B = param(
      uniform_init(rngs.params(), (k, gn), bound_conv, pdt), ("conv_width", "group_state")
    )
    self.conv_C = param(
      uniform_init(rngs.params(), (k, gn), bound_conv, pdt), ("conv_width", "group_state")
    )
    if c.conv_bias:
      self.conv_x_bias = param(uniform_init(rngs.params(), (e,), bound_conv, pdt), ("inner",))
      self.conv_B_bias = param(
        uniform_init(rngs.params(), (gn,), bound_conv, pdt), ("group_state",)
      )
      self.conv_C_bias = param(
        uniform_init(rngs.params(), (gn,), bound_conv, pdt), ("group_state",)
      )
    self.dt_bias = param(
      dt_bias_init(rngs.params(), h, c.dt_min, c.dt_max, c.dt_init_floor), ("heads",)
    )
    self.A_log = param(A_log_init(rngs.params(), h, c.A_init_range), ("heads",))
    self.D = param(
      jnp.ones((e,) if c.D_has_hdim else (h,), jnp.float32),
      ("inner",) if c.D_has_hdim else ("heads",),
    )
    self.norm = param(jnp.ones((e,), pdt), ("inner",))
    bound_out = 1.0 / math.sqrt(e)
    out = uniform_init(rngs.params(), (e, d), bound_out, jnp.float32)
    if c.rescale_prenorm_residual:
      out = out / math.sqrt(c.n_layer)  # official: one residual branch per layer (no MLP)
    self.out_proj = param(out.astype(pdt), ("inner", "embed"))
    if c.proj_bias:
      self.out_proj_bias = param(jnp.zeros((d,), pdt), ("embed",))
    if c.state_norm != "off":  # thresholds tau per head; non-trainable (not an nnx.Param)
      self.state_norm_tau = threshold_variable(jnp.full((h,), c.state_norm_threshold, jnp.float32))

  # Parameter views --------------------------------------------------------------------------
  def _opt(self, name):
    v = getattr(self, name, None)
    return None if v is None else v[...]

  def _in_bias(self, part):
    """Slice of the fused official in_proj bias for one of z, x, B, C, dt (or None)."""
    b = self._opt("in_proj_bias")
    if b is None:
      return None
    c = self.config
    e, gn = c.d_inner, c.ngroups * c.d_state
    start = {"z": 0, "x": e, "B": 2 * e, "C": 2 * e + gn, "dt": 2 * e + 2 * gn}[part]
    size = {"z": e, "x": e, "B": gn, "C": gn, "dt": c.nheads}[part]
    return b[start : start + size]

  def _project(self, u):
    """u (..., d_model) -> z, x, B, C, dt (pre-conv), each in the compute dtype."""
    c = self.config
    names = ("z", "x", "B", "C", "dt")
    kernels = [getattr(self, f"in_proj_{n}")[...] for n in names]
    # one GEMM (and one weight-gradient GEMM) instead of five for a sequence; a decode step's
    # single token (u: (b, d_model)) reads the five weights where they are (the concatenation
    # would copy the whole weight on every token)
    if c.fused_in_proj and u.ndim > 2:
      y = dense(u, jnp.concatenate(kernels, axis=1), self._opt("in_proj_bias"), c.compute_dtype)
      e, gn = c.d_inner, c.ngroups * c.d_state
      return tuple(jnp.split(y, [e, 2 * e, 2 * e + gn, 2 * e + 2 * gn], axis=-1))
    return tuple(dense(u, k, self._in_bias(n), c.compute_dtype) for n, k in zip(names, kernels))

  def _D(self):
    c = self.config
    D = self.D[...]
    return D.reshape(c.nheads, c.headdim) if c.D_has_hdim else D

  def _output(self, y, z):
    c = self.config
    y = gated_rms_norm(y, z, self.norm[...], c.ngroups, c.norm_eps, c.compute_dtype)
    return dense(y, self.out_proj[...], self._opt("out_proj_bias"), c.compute_dtype)

  def _tau(self):
    """State-norm thresholds (H,), or None with state_norm off: constants of the model, never
    trained (no gradient)."""
    if self.config.state_norm == "off":
      return None
    return jax.lax.stop_gradient(self.state_norm_tau[...])

  # SSM inputs ----------------------------------------------------------------------------------
  def decay_rate(self) -> jax.Array:
    """A = -exp(A_log) (H,) float32."""
    return -jnp.exp(self.A_log[...].astype(jnp.float32))

  def processed_dt(self, dt: jax.Array) -> jax.Array:
    """Raw dt (..., H) -> the SSM's float32 dt (bias, softplus, dt_limit, dt_scale)."""
    return mitigated.processed_dt(self.config, dt, self.dt_bias[...])

  def log_decay(self, dt: jax.Array) -> jax.Array:
    """log alpha = dt * A (+ log rri_decay_scale) (..., H) from the processed dt."""
    return mitigated.log_decay(self.config, dt, self.decay_rate())

  def ssm_inputs(
    self, u: jax.Array, cache: Mamba2Cache | None = None, *, segment_ids: jax.Array | None = None
  ) -> SSMInputs:
    """u (b, L, d_model) (a sequence, continuing the conv context of `cache` when given) or
    u (b, d_model) (one decode token; `cache` required) -> `SSMInputs`."""
    c = self.config
    z, xr, Br, Cr, dt = self._project(u)
    if u.ndim == 2:  # one token
      x, cx = conv_step(xr, self.conv_x[...], self._opt("conv_x_bias"), cache.conv_x)
      B, cB = conv_step(Br, self.conv_B[...], self._opt("conv_B_bias"), cache.conv_B)
      C, cC = conv_step(Cr, self.conv_C[...], self._opt("conv_C_bias"), cache.conv_C)
      x, B, C = jax.nn.silu(x), jax.nn.silu(B), jax.nn.silu(C)
    else:  # conv + SiLU as one op (mamba2_jax/conv.py); under a context mesh per sequence
      # shard, with halos (mamba2_jax/context_conv.py)
      convs = [
        (t, getattr(self, n)[...], self._opt(f"{n}_bias"), getattr(cache, n, None))
        for t, n in ((xr, "conv_x"), (Br, "conv_B"), (Cr, "conv_C"))
      ]
      (x, cx), (B, cB), (C, cC) = causal_convs(convs, segment_ids)
    lead = u.shape[:-1]
    B = mitigated.scale_B(c, B)
    return SSMInputs(
      x=x.reshape(*lead, c.nheads, c.headdim),
      B=B.reshape(*lead, c.ngroups, c.d_state),
      C=C.reshape(*lead, c.ngroups, c.d_state),
      dt=dt,
      z=z,
      conv=(cx, cB, cC),
    )

  # Full-sequence forward (training, prefill) ---------------------------------------------------
  def __call__(
    self, u: jax.Array, *, segment_ids: jax.Array | None = None, cache: Mamba2Cache | None = None
  ) -> tuple[jax.Array, Mamba2Cache | None]:
    """u (b, L, d_model) -> (out (b, L, d_model), new per-layer cache or None).

    With `cache` (per-layer, no leading layer axis) the sequence continues from it and the new
    cache is returned; without, the layer starts from a zero state and returns None.
    """
    c = self.config
    b, L, _ = u.shape
    inp = self.ssm_inputs(u, cache, segment_ids=segment_ids)
    y, h, extra = mitigated.ssm_sequence(
      c, *self._ssm_args(inp), segment_ids=segment_ids, cache=cache, **self._ssm_params()
    )
    out = self._output(y.reshape(b, L, c.d_inner).astype(c.compute_dtype), inp.z)
    if cache is None:
      return out, None
    return out, self._new_cache(cache, inp, h, extra)

  # One-token recurrent step (decode) ---------------------------------------------------------
  def step(self, u: jax.Array, cache: Mamba2Cache) -> tuple[jax.Array, Mamba2Cache]:
    """u (b, d_model) -> (out (b, d_model), cache). O(1) in the sequence length."""
    c = self.config
    inp = self.ssm_inputs(u, cache)
    y, h, extra = mitigated.ssm_step(c, *self._ssm_args(inp), cache=cache, **self._ssm_params())
    out = self._output(y.reshape(u.shape[0], c.d_inner).astype(c.compute_dtype), inp.z)
    return out, self._new_cache(cache, inp, h, extra)

  # What the sequence path and the step share -------------------------------------------------
  def _ssm_args(self, inp: SSMInputs) -> tuple:
    """The positional SSM operands: x, dt, A (the decay rate), B, C."""
    return inp.x, inp.dt, self.decay_rate(), inp.B, inp.C

  def _ssm_params(self) -> dict:
    return dict(D=self._D(), dt_bias=self.dt_bias[...], tau=self._tau())

  @staticmethod
  def _new_cache(cache: Mamba2Cache, inp: SSMInputs, h, extra: dict) -> Mamba2Cache:
    cx, cB, cC = inp.conv
    return dataclasses.replace(cache, conv_x=cx, conv_B=cB, conv_C=cC, ssm=h, **extra)
