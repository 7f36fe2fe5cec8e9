"""The causal depthwise conv + SiLU of the mixer as one op with its own VJP: `conv_silu`.

    pre[t] = bias + sum_k m_k[t] w[k] full[t + k]      full = [context; u]  (K-1 + L rows)
    y[t]   = silu(pre[t])

with m_k[t] = (segment of full[t + k] == segment of u[t]) (1 without segment ids; the last
tap, the token itself, is never masked). The official block runs exactly this (conv1d, then
SiLU) on x, B and C; `mamba2_jax.layers.causal_conv` followed by `jax.nn.silu` is the plain
composition it equals.

Why a custom VJP: differentiated by XLA, the conv and the SiLU become a chain of K shifted
multiply-adds, selects and a sigmoid that XLA:CPU fuses into (recomputes in) every consumer of
y, in the SSD forward and in both backward passes, and the autodiff backward is another K
shifted passes per cotangent term. Here the backward is one pass per output:

    g       = dy * silu'(pre),  silu'(p) = s (1 + p (1 - s)),  s = sigmoid(p)
    d full  = sum_k shift_k(m_k g) w[k]        (-> d u, and d context: its first K-1 rows)
    d w[k]  = sum_{b,t} m_k[t] g[t] full[t+k],  d bias = sum_{b,t} g[t]

The forward saves the inputs it reads (u, the context, the weights) and nothing of size
(b, L, C) besides; the backward recomputes pre (K multiply-adds, cheaper than storing and
reloading a float32 copy of it; measured in docs/benchmarks.md). Arithmetic is float32 (float64
for float64 inputs); y and the cotangents are returned in the dtypes of their inputs.

The new conv context (the last K-1 rows of `full`, rows of earlier segments than the last
token's zeroed) is a slice outside the custom VJP, differentiated by XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["conv_silu"]


def _acc(*arrays):
  return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32


def _tap_masks(seg, ctx_seg, K):
  """[m_0 .. m_{K-2}] each (b, L, 1) bool (tap k reads full[t + k]), or None without ids."""
  if seg is None:
    return None
  L = seg.shape[1]
  seg_full = jnp.concatenate([ctx_seg.astype(seg.dtype), seg], axis=1)
  return [(seg_full[:, k : k + L] == seg)[..., None] for k in range(K - 1)]


def _pre(full, w, bias, masks, L, acc):
  """pre-activation (b, L, C) in `acc` from full (b, K-1+L, C)."""
  K = w.shape[0]
  wf = w.astype(acc)
  out = full[:, K - 1 :].astype(acc) * wf[K - 1]
  for k in range(K - 1):
    tap = full[:, k : k + L].astype(acc) * wf[k]
    out = out + (tap if masks is None else jnp.where(masks[k], tap, 0.0))
  if bias is not None:
    out = out + bias.astype(acc)
  return out


@jax.custom_vjp
def _conv_silu(u, w, bias, context, seg, ctx_seg):
  L = u.shape[1]
  full = jnp.concatenate([context.astype(u.dtype), u], axis=1)
  pre = _pre(full, w, bias, _tap_masks(seg, ctx_seg, w.shape[0]), L, _acc(u, w))
  return _silu(pre).astype(u.dtype)


def _silu(pre):
  """silu(pre) = pre sigmoid(pre) written as a division: XLA counts a division as expensive and
  so never duplicates it (and the K shifted multiply-adds before it) into the consumers of y,
  which it does with the multiplication of `jax.nn.silu` (module docstring)."""
  return pre / (1.0 + jnp.exp(-pre))


def _conv_silu_fwd(u, w, bias, context, seg, ctx_seg):
  return _conv_silu(u, w, bias, context, seg, ctx_seg), (u, w, bias, context, seg, ctx_seg)


def _conv_silu_bwd(res, dy):
  u, w, bias, context, seg, ctx_seg = res
  b, L, C = u.shape
  K = w.shape[0]
  acc = _acc(u, w)
  masks = _tap_masks(seg, ctx_seg, K)
  full = jnp.concatenate([context.astype(u.dtype), u], axis=1)
  pre = _pre(full, w, bias, masks, L, acc)
  # d pre = dy silu'(pre), silu' = s (1 + pre (1 - s)), s = sigmoid(pre); as a division (see
  # _silu), so that it is computed once and read by the two passes below
  e = jnp.exp(-pre)
  g = dy.astype(acc) * (1.0 + pre * e / (1.0 + e)) / (1.0 + e)
  wf = w.astype(acc)
  gk = [g if k == K - 1 or masks is None else jnp.where(masks[k], g, 0.0) for k in range(K)]
  # d full[j] = sum_k gk[j - k] w[k]: each tap's term shifted into place by a pad, one pass
  dfull = sum(jnp.pad(gk[k] * wf[k], ((0, 0), (k, K - 1 - k), (0, 0))) for k in range(K))
  fullf = full.astype(acc)
  dw = jnp.stack([jnp.sum(gk[k] * fullf[:, k : k + L], axis=(0, 1)) for k in range(K)])
  dbias = None if bias is None else jnp.sum(g, axis=(0, 1)).astype(bias.dtype)
  du = dfull[:, K - 1 :].astype(u.dtype)
  dctx = dfull[:, : K - 1].astype(context.dtype)
  return du, dw.astype(w.dtype), dbias, dctx, None, None


_conv_silu.defvjp(_conv_silu_fwd, _conv_silu_bwd)


def _prepare(u, w, context, segment_ids, context_segment_ids):
  b, L, C = u.shape
  K = w.shape[0]
  if w.ndim != 2 or w.shape[1] != C:
    raise ValueError(f"conv_silu: w must have shape (d_conv, channels) = (K, {C}); got {w.shape}")
  if context is None:
    context = jnp.zeros((b, K - 1, C), u.dtype)
  if context.shape != (b, K - 1, C):
    raise ValueError(f"conv_silu: context must have shape {(b, K - 1, C)}; got {context.shape}")
  ctx_seg = None
  if segment_ids is not None:
    ctx_seg = (
      jnp.broadcast_to(segment_ids[:, :1], (b, K - 1))
      if context_segment_ids is None
      else context_segment_ids.astype(segment_ids.dtype)
    )
  return context, ctx_seg


def _varying(t) -> frozenset:
  aval = jax.typeof(t)
  mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.12; `vma` before
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _varying_like(t, u):
  """t cast to vary over the manual mesh axes u varies over (no-op outside a shard_map)."""
  if t is None:
    return None
  missing = tuple(sorted(_varying(u) - _varying(t)))
  return jax.lax.pcast(t, missing, to="varying") if missing else t


def _new_context(u, context, segment_ids, ctx_seg):
  """The last K-1 rows of [context; u], rows of earlier segments than the last token's zeroed."""
  L = u.shape[1]
  new = jnp.concatenate([context.astype(u.dtype), u], axis=1)[:, L:]
  if segment_ids is None:
    return new
  seg_full = jnp.concatenate([ctx_seg, segment_ids], axis=1)
  keep = seg_full[:, L:] == segment_ids[:, -1:]
  return jnp.where(keep[..., None], new, 0)


def conv_silu(
  u: jax.Array,
  w: jax.Array,
  bias: jax.Array | None = None,
  *,
  context: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  context_segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """silu(causal depthwise conv) of a sequence, as one op with a fused backward.

  Args as `mamba2_jax.layers.causal_conv`: u (b, L, C); w (K, C); bias (C,) or None; context
  (b, K-1, C), the K-1 inputs before u[0] (None = zeros); segment_ids (b, L) int, taps never
  cross a change of id; context_segment_ids (b, K-1), the ids of the context rows (None: those
  of position 0).
  Returns (y (b, L, C) in u.dtype, new_context (b, K-1, C)) =
  (silu(causal_conv(...)[0]), causal_conv(...)[1]), with float32 arithmetic throughout.
  """
  context, ctx_seg = _prepare(u, w, context, segment_ids, context_segment_ids)
  # inside a shard_map (the context-parallel conv) the weights are replicated and u varies
  # over the manual axes: mark them varying first, so that their cotangents, which vary too,
  # match the custom VJP's inputs and the transpose of the cast sums them over the shards
  w, bias, context = (_varying_like(t, u) for t in (w, bias, context))
  y = _conv_silu(u, w, bias, context, segment_ids, ctx_seg)
  return y, _new_context(u, context, segment_ids, ctx_seg)
