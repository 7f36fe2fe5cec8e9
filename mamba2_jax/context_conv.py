"""The model's causal convs over a sequence split over the "context" mesh axis: a halo exchange.

Under a mesh context (`jax.set_mesh`) whose "context" axis has size n > 1, the sequence of the
training step is split into n contiguous slices (mamba2_jax/train/sharding.py). The causal conv
of width K reads the K-1 positions before each token, so shard k needs the last K-1 pre-conv
rows of shard k-1: `causal_convs` runs the convs (each fused with its SiLU,
`mamba2_jax.conv.conv_silu`) per shard inside a `shard_map` that is manual
over "context" only (batch, channels and every other mesh axis stay with the partitioner) and
sends those rows with one `lax.ppermute` to the next shard. Shard 0 starts from the cache's
conv context (zeros without a cache); segment ids travel with the rows, so the halo is masked
exactly as the conv masks positions of other documents. The new conv context (the last K-1
rows, for TBPTT's next segment) comes from the last shard, replicated over "context".

XLA's SPMD partitioner alone also exchanges only halos here, not the whole sequence, but as one
collective-permute per tap (K-1, K-2, ... rows, plus one backwards for the uneven concat) per
conv and direction, and, as partitioner-made values, they cannot be named for the remat
policy: a rematerialised layer sent them all again. The halo rows here carry the names of
`SAVE_NAMES`, which the model's remat policies save (docs/training.md, "Long sequences").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from mamba2_jax.conv import conv_silu

__all__ = ["CONTEXT_AXIS", "context_mesh", "causal_convs", "SAVE_NAMES"]

CONTEXT_AXIS = "context"
HALO_NAME = "context_conv_halo"
HALO_SEG_NAME = "context_conv_halo_segments"
SAVE_NAMES = (HALO_NAME, HALO_SEG_NAME)


def context_mesh():
  """The abstract mesh of the current `jax.set_mesh` context when its "context" axis has size
  > 1 and no axis is manual (outside any shard_map), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return None
  return mesh if dict(zip(mesh.axis_names, mesh.axis_sizes)).get(CONTEXT_AXIS, 1) > 1 else None


def causal_convs(inputs, segment_ids=None):
  """`conv_silu` (silu of the causal conv) of each (u, w, bias, context) in `inputs` with the
  same segment ids.

  u (b, L, C_i), w (K, C_i), bias (C_i,) or None, context (b, K-1, C_i) or None (zeros), as for
  `mamba2_jax.conv.conv_silu`. Returns [(out, new_context)] in the order of `inputs`. Under
  a context mesh the sequence is split over "context" (L / n >= K-1 per shard) and the halos are
  exchanged (module docstring); otherwise the plain conv.
  """
  mesh = context_mesh()
  if mesh is None:
    return [conv_silu(u, w, b, context=c, segment_ids=segment_ids) for u, w, b, c in inputs]
  n = dict(zip(mesh.axis_names, mesh.axis_sizes))[CONTEXT_AXIS]
  K = inputs[0][1].shape[0]
  L = inputs[0][0].shape[1]
  if L % n or L // n < K - 1:
    raise ValueError(
      f"causal conv: the sequence length {L} must split over the {n} shards of the "
      f"{CONTEXT_AXIS!r} mesh axis into slices of at least d_conv - 1 = {K - 1} tokens"
    )
  us = [u for u, _, _, _ in inputs]
  ws = [(w, b) for _, w, b, _ in inputs]
  ctxs = [
    jnp.zeros((u.shape[0], K - 1, u.shape[2]), u.dtype) if c is None else c for u, _, _, c in inputs
  ]
  seq = P(None, CONTEXT_AXIS)

  def local(us, ws, ctxs, seg):
    k = lax.axis_index(CONTEXT_AXIS)
    to_next = [(i, i + 1) for i in range(n - 1)]  # shard 0 receives nothing (zeros)
    halos = lax.ppermute([u[:, -(K - 1) :] for u in us], CONTEXT_AXIS, to_next)
    halos = [
      jnp.where(k == 0, c.astype(h.dtype), checkpoint_name(h, HALO_NAME))
      for h, c in zip(halos, ctxs)
    ]
    halo_seg = None
    if seg is not None:  # the halo's ids; shard 0's context belongs to its first position
      prev = checkpoint_name(lax.ppermute(seg[:, -(K - 1) :], CONTEXT_AXIS, to_next), HALO_SEG_NAME)
      halo_seg = jnp.where(k == 0, jnp.broadcast_to(seg[:, :1], prev.shape), prev)
    outs, news = [], []
    for u, (w, b), h in zip(us, ws, halos):
      out, new = conv_silu(u, w, b, context=h, segment_ids=seg, context_segment_ids=halo_seg)
      outs.append(out)
      # the sequence's new context is the last shard's; replicate it over the axis
      news.append(lax.psum(jnp.where(k == n - 1, new, jnp.zeros_like(new)), CONTEXT_AXIS))
    return outs, news

  fn = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(seq, P(), P(), None if segment_ids is None else seq),
    out_specs=(seq, P()),
    axis_names={CONTEXT_AXIS},
  )
  outs, news = fn(us, ws, ctxs, segment_ids)
  return list(zip(outs, news))
