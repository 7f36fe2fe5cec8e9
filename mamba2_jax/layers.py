"""Building blocks of the Mamba-2 block: parameters with logical axes, norms, causal conv.

Logical axis names used on parameters (mapped to mesh axes by the training config's rules):
  "layers"      stacked layer axis (n_layer)
  "vocab"       padded vocabulary
  "embed"       d_model
  "inner"       d_inner = nheads * headdim, head-major (shardable over heads)
  "heads"       nheads
  "group_state" ngroups * d_state (B and C projections; replicated unless ngroups is sharded)
  "conv_width"  d_conv taps
  "norm"        d_model-sized norm scales
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
  """An `nnx.Param` carrying logical axis names (sharded eagerly only under a mesh)."""
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {axes} do not match parameter shape {value.shape}")
  eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
  return nnx.Param(value, out_sharding=axes, eager_sharding=eager)


def uniform_init(key, shape, bound: float, dtype) -> jax.Array:
  """U(-bound, bound): torch's default Linear/Conv1d init has bound = 1/sqrt(fan_in)."""
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def dt_bias_init(key, nheads: int, dt_min: float, dt_max: float, floor: float) -> jax.Array:
  """Official dt_bias: dt log-uniform in [dt_min, dt_max], floored, stored as softplus^-1(dt)."""
  u = jax.random.uniform(key, (nheads,), jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, floor)
  return dt + jnp.log(-jnp.expm1(-dt))  # inverse of softplus


def A_log_init(key, nheads: int, A_init_range: tuple[float, float]) -> jax.Array:
  """Official A_log: A ~ U[lo, hi], A_log = log(A); A = -exp(A_log) < 0. Always float32."""
  lo, hi = A_init_range
  return jnp.log(jax.random.uniform(key, (nheads,), jnp.float32, lo, hi))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, out_dtype) -> jax.Array:
  """RMSNorm over the last axis, computed in float32. x (..., D), scale (D,)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(out_dtype)


def gated_rms_norm(
  y: jax.Array, z: jax.Array, scale: jax.Array, ngroups: int, eps: float, out_dtype
) -> jax.Array:
  """Official RMSNormGated with norm_before_gate=False: groupwise_rmsnorm(y * silu(z)) * scale.

  y, z: (..., d_inner); the RMS is taken over groups of d_inner / ngroups channels
  (group g covers the heads that share B/C group g).
  """
  g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  shape = g.shape
  g = g.reshape(*shape[:-1], ngroups, shape[-1] // ngroups)
  g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
  return (g.reshape(shape) * scale.astype(jnp.float32)).astype(out_dtype)


def causal_conv(
  u: jax.Array,
  w: jax.Array,
  bias: jax.Array | None,
  *,
  context: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  context_segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal conv1d that never mixes tokens of different segments.

  Args:
    u: (b, L, C) inputs (pre-activation).
    w: (K, C) taps; tap k multiplies u[t - (K-1) + k].
    bias: (C,) or None.
    context: (b, K-1, C) the K-1 inputs before u[0] (a decode/prefill cache), or None = zeros.
      The context belongs to the segment of position 0 unless `context_segment_ids` says
      otherwise.
    segment_ids: (b, L) int; tap t-s contributes to t only if both lie in the same segment.
    context_segment_ids: (b, K-1) int, the segments of the context rows (a halo of the previous
      sequence shard, mamba2_jax/context_conv.py), or None; used only with `segment_ids`.
  Returns:
    (out (b, L, C) in u.dtype, new_context (b, K-1, C)): the last K-1 inputs, with inputs of
    earlier segments than the last token's zeroed so a continuation cannot see across a boundary.
  """
  b, L, C = u.shape
  K = w.shape[0]
  if context is None:
    context = jnp.zeros((b, K - 1, C), u.dtype)
  full = jnp.concatenate([context.astype(u.dtype), u], axis=1)  # (b, L+K-1, C)
  if segment_ids is not None:
    if context_segment_ids is None:
      context_segment_ids = jnp.broadcast_to(segment_ids[:, :1], (b, K - 1))
    seg_full = jnp.concatenate([context_segment_ids.astype(segment_ids.dtype), segment_ids], 1)
  wf = w.astype(jnp.float32)
  out = full[:, K - 1 :].astype(jnp.float32) * wf[K - 1]
  for k in range(K - 1):
    tap = full[:, k : k + L].astype(jnp.float32) * wf[k]
    if segment_ids is not None:
      same = seg_full[:, k : k + L] == segment_ids
      tap = jnp.where(same[..., None], tap, 0.0)
    out = out + tap
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  new_context = full[:, L:]
  if segment_ids is not None:
    keep = seg_full[:, L:] == segment_ids[:, -1:]
    new_context = jnp.where(keep[..., None], new_context, 0)
  return out.astype(u.dtype), new_context


def conv_step(
  u: jax.Array, w: jax.Array, bias: jax.Array | None, context: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One decode step of `causal_conv`: u (b, C), context (b, K-1, C) -> (out (b, C), context)."""
  window = jnp.concatenate([context.astype(u.dtype), u[:, None]], axis=1)  # (b, K, C)
  out = jnp.einsum("bkc,kc->bc", window.astype(jnp.float32), w.astype(jnp.float32))
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  return out.astype(u.dtype), window[:, 1:]


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
  """x (..., din) @ kernel (din, dout) in `dtype` with float32 accumulation."""
  y = jnp.einsum(
    "...i,io->...o", x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32
  )
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype)
