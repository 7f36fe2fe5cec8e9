"""Mamba2Mixer: in_proj -> (z, x, B, C, dt) -> causal conv -> SSD -> gated RMSNorm -> out_proj.

The official fused in_proj (columns [z | x | B | C | dt]) and conv1d (channels [x | B | C]) are
stored as separate parameters so that tensor parallelism can shard heads cleanly (z, x, dt,
A_log, D, the gated norm and out_proj rows over "heads"/"inner"; B and C over "group_state").
The checkpoint importer splits the official tensors (mamba2_jax/pretrained.py).

State-collapse mitigations (config fields, mamba2_jax/mitigations.py) are applied here, in the
forward, in prefill with a cache and in the decode step: B *= rri_insert_scale (before the op,
in the compute dtype), dt *= dt_scale and log alpha += log(rri_decay_scale) (op arguments),
the sliding window (op argument; sliding_window.py across pieces) and the state normalization
(state_norm.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.config import Mamba2Config
from mamba2_jax.layers import (
  A_log_init,
  causal_conv,
  conv_step,
  dense,
  dt_bias_init,
  gated_rms_norm,
  param,
  uniform_init,
)
from mamba2_jax.sliding_window import window_prefill, window_step
from mamba2_jax.ssd import prepare_dt, ssd
from mamba2_jax.state_norm import (
  block_normalized_ssd,
  normalize_state,
  threshold_variable,
  token_normalized_ssd,
)


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
  def _tau(self):
    """State-norm thresholds (H,): constants of the model, never trained (no gradient)."""
    return jax.lax.stop_gradient(self.state_norm_tau[...])

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
    if c.fused_in_proj:  # one GEMM (and one weight-gradient GEMM) instead of five
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

  def _log_decay_offset(self) -> float:
    """log c_a of RRI (0.0 when off)."""
    ca = self.config.rri_decay_scale
    return 0.0 if ca == 1.0 else math.log(ca)

  def _scale_B(self, B):
    cb = self.config.rri_insert_scale
    return B if cb == 1.0 else B * jnp.asarray(cb, B.dtype)

  def _processed_dt(self, dt):
    c = self.config
    dt = prepare_dt(dt, self.dt_bias[...], dt_softplus=True, dt_limit=c.dt_limit, dtype=jnp.float32)
    return dt if c.dt_scale == 1.0 else dt * jnp.float32(c.dt_scale)

  def _ssm(self, x, dt, A, B, C, segment_ids, cache):
    """SSD with the configured mitigations. x (b,L,H,P), dt raw (b,L,H), B, C (b,L,G,N).

    Returns (y (b,L,H,P), final state or None, dict of updated mitigation cache fields).
    """
    c = self.config
    off, D = self._log_decay_offset(), self._D()
    h0 = None if cache is None else cache.ssm
    extra = {}
    if cache is not None and cache.pos is not None:
      extra["pos"] = cache.pos + x.shape[1]
    if c.state_norm == "token":
      y, h = token_normalized_ssd(
        x,
        dt,
        A,
        B,
        C,
        tau=self._tau(),
        D=D,
        dt_bias=self.dt_bias[...],
        dt_limit=c.dt_limit,
        dt_scale=c.dt_scale,
        log_decay_offset=off,
        initial_state=h0,
        segment_ids=segment_ids,
      )
    elif c.state_norm == "chunk":
      op = functools.partial(
        ssd,
        impl=c.ssd_impl,
        dt_softplus=False,
        dt_limit=(-math.inf, math.inf),
        chunk_size=min(c.chunk_size, c.state_norm_chunk),
        return_final_state=True,
      )
      y, h = block_normalized_ssd(
        op,
        x,
        self._processed_dt(dt),
        A,
        B,
        C,
        tau=self._tau(),
        block=c.state_norm_chunk,
        position=0 if cache is None else cache.pos,
        D=D,
        log_decay_offset=off,
        initial_state=h0,
        segment_ids=segment_ids,
      )
    elif c.ssd_window > 0 and cache is not None:
      y, h, extra = window_prefill(
        functools.partial(functools.partial, ssd, impl=c.ssd_impl),
        x,
        self._processed_dt(dt),
        A,
        B,
        C,
        cache,
        r=c.ssd_window,
        log_decay_offset=off,
        chunk_size=c.chunk_size,
        D=D,
        segment_ids=segment_ids,
      )
    else:
      op = functools.partial(
        ssd,
        impl=c.ssd_impl,
        dt_softplus=True,
        dt_limit=c.dt_limit,
        chunk_size=c.chunk_size,
        return_final_state=cache is not None,
        dt_scale=c.dt_scale,
        log_decay_offset=off,
        window=c.ssd_window or None,
      )
      result = op(
        x, dt, A, B, C, D=D, dt_bias=self.dt_bias[...], initial_state=h0, segment_ids=segment_ids
      )
      y, h = result if cache is not None else (result, None)
    return y, (h if cache is not None else None), extra

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
    z, xr, Br, Cr, dt = self._project(u)
    ctx = (lambda n: None) if cache is None else (lambda n: getattr(cache, n))
    x, cx = causal_conv(
      xr, self.conv_x[...], self._opt("conv_x_bias"), context=ctx("conv_x"), segment_ids=segment_ids
    )
    B, cB = causal_conv(
      Br, self.conv_B[...], self._opt("conv_B_bias"), context=ctx("conv_B"), segment_ids=segment_ids
    )
    C, cC = causal_conv(
      Cr, self.conv_C[...], self._opt("conv_C_bias"), context=ctx("conv_C"), segment_ids=segment_ids
    )
    x, B, C = jax.nn.silu(x), self._scale_B(jax.nn.silu(B)), jax.nn.silu(C)
    A = -jnp.exp(self.A_log[...].astype(jnp.float32))
    y, h, extra = self._ssm(
      x.reshape(b, L, c.nheads, c.headdim),
      dt,
      A,
      B.reshape(b, L, c.ngroups, c.d_state),
      C.reshape(b, L, c.ngroups, c.d_state),
      segment_ids,
      cache,
    )
    out = self._output(y.reshape(b, L, c.d_inner).astype(c.compute_dtype), z)
    if cache is None:
      return out, None
    return out, dataclasses.replace(cache, conv_x=cx, conv_B=cB, conv_C=cC, ssm=h, **extra)

  # One-token recurrent step (decode) ---------------------------------------------------------
  def step(self, u: jax.Array, cache: Mamba2Cache) -> tuple[jax.Array, Mamba2Cache]:
    """u (b, d_model) -> (out (b, d_model), cache). O(1) in the sequence length."""
    c = self.config
    b = u.shape[0]
    z, xr, Br, Cr, dt = self._project(u)
    x, cx = conv_step(xr, self.conv_x[...], self._opt("conv_x_bias"), cache.conv_x)
    B, cB = conv_step(Br, self.conv_B[...], self._opt("conv_B_bias"), cache.conv_B)
    C, cC = conv_step(Cr, self.conv_C[...], self._opt("conv_C_bias"), cache.conv_C)
    xc = jax.nn.silu(x).reshape(b, c.nheads, c.headdim)  # compute dtype (the window ring's)
    Bc = self._scale_B(jax.nn.silu(B)).reshape(b, c.ngroups, c.d_state)
    x, B = xc.astype(jnp.float32), Bc.astype(jnp.float32)
    C = jax.nn.silu(C).reshape(b, c.ngroups, c.d_state).astype(jnp.float32)
    rep = c.nheads // c.ngroups
    B, C = jnp.repeat(B, rep, axis=1), jnp.repeat(C, rep, axis=1)  # head h -> group h // rep
    A = -jnp.exp(self.A_log[...].astype(jnp.float32))
    dt = self._processed_dt(dt)  # (b, H)
    off = self._log_decay_offset()
    decay = jnp.exp(dt * A if off == 0.0 else dt * A + jnp.float32(off))
    h = cache.ssm * decay[:, :, None, None] + (dt[:, :, None] * x)[..., None] * B[:, :, None, :]
    extra, h_out = {}, h
    if c.ssd_window > 0:
      h_out, extra = window_step(h, dt, xc, Bc, A, cache, r=c.ssd_window, log_decay_offset=off)
    elif cache.pos is not None:
      extra["pos"] = cache.pos + 1
    if c.state_norm == "token":
      h = normalize_state(h, self._tau())
    elif c.state_norm == "chunk":  # this token ends a block of absolute positions
      ends = (cache.pos + 1) % c.state_norm_chunk == 0
      h = jnp.where(ends, normalize_state(h, self._tau()), h)
    D = self._D().astype(jnp.float32)
    y = jnp.einsum("bhpn,bhn->bhp", h_out, C) + (D[..., None] if D.ndim == 1 else D) * x
    out = self._output(y.reshape(b, c.d_inner).astype(c.compute_dtype), z)
    return out, dataclasses.replace(cache, conv_x=cx, conv_B=cB, conv_C=cC, ssm=h, **extra)
