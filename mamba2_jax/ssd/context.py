"""Context parallelism: one sequence split over a mesh axis, with exact state passing.

Inside a ``shard_map`` whose ``context`` axis splits the sequence into contiguous slices (shard
k holds positions [k·Lc, (k+1)·Lc)), :func:`context_ssd` computes exactly what the SSD of the
whole sequence gives on this shard's positions:

1. the shard runs its local SSD (any impl) from a zero state and returns its local final state
   ``h_k`` (fp32) and its carry factor ``a_k = exp(sum of dA over the shard)`` per head (0 when a
   document boundary lies inside the shard: nothing from before it survives the shard);
2. one ``all_gather`` of these small summaries (b·H·P·N + b·H floats per shard) and an
   inclusive scan over the shards in fp32, ``H_k = m_k H_{k-1} + h_k`` with ``H_{-1}`` the
   sequence's ``initial_state`` and ``m_k = a_k`` unless shard k starts a new document (then 0),
   gives every shard its incoming state ``h_in = H_{k-1}`` (0 when it starts on a boundary) and
   the final state of the whole sequence ``H_{n-1}`` (the same on every shard);
3. the incoming state enters the outputs as an additive correction on the shard's first
   document: ``y_t += C_t · exp(cumsum dA up to t) · h_in``.

The correction costs one (b, Lc, H, P) fp32 einsum against the state; the alternative, a second
pass of the SSD with ``initial_state=h_in``, costs a whole second scan (forward and backward).
Compiled by XLA:CPU for a 130m-layer shard (Lc 4096, H 24, P 64, N 128, bf16, chunk 256), forward
plus backward: the correction 4.9 GFLOP / 0.59 GB moved, the local SSD 20.6 GFLOP / 2.4 GB, so
the correction adds 24% to the SSD where a second pass would add 100%.

Step 2 has a custom VJP (``_pass_states``) so that its backward needs only this shard's incoming
state and the gathered carry factors, not the gathered states: it all_gathers the incoming-state
cotangents (the same traffic as the reduce-scatter autodiff would use), runs the reverse
recurrence ``G_{k-1} = g_{k-1} + m_k G_k`` over the shards and keeps its own ``dh_k = G_k``,
``dm_k = <G_k, H_{k-1}>``. Its residuals, and the shard's "starts a document" flags, carry the
names in ``SAVE_NAMES`` (``jax.ad_checkpoint.checkpoint_name``): the model's remat policies save
them (mamba2_jax/model.py), so rematerialising a layer recomputes the local SSD but never
repeats the all_gathers.

Not supported under context sharding (ValueError): ``window`` (the sliding window reads single
positions across the shard edge, not a summary) and ``state_hook``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from . import common

__all__ = ["context_ssd", "SAVE_NAMES"]

# checkpoint_name of the small per-shard values the backward needs (saved by the remat policies):
# the incoming state H_{k-1} (b, H, P, N) fp32, the gathered carry factors (n, b, H) fp32 and
# whether the shard starts a new document (b,)
STATE_NAME = "context_ssd_state"
CARRY_NAME = "context_ssd_carry"
STARTS_NAME = "context_ssd_starts"
SAVE_NAMES = (STATE_NAME, CARRY_NAME, STARTS_NAME)


def _combine(left, right):
  """Associative combine of (carry factor, state) pairs: apply ``left`` then ``right``."""
  a1, h1 = left
  a2, h2 = right
  return a1 * a2, a2[..., None, None] * h1 + h2


def _linear_scan(m, h):
  """H_j = m_j H_{j-1} + h_j over the leading axis (m_0 unused): all H_j, fp32."""
  return lax.associative_scan(_combine, (m, h), axis=0)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pass_states(mult, h_loc, h0, axis_name):
  """(this shard's incoming state H_{k-1}, the final state H_{n-1}) of the recurrence
  H_k = m_k H_{k-1} + h_k over the shards k of ``axis_name``, H_{-1} = h0 (replicated)."""
  return _pass_states_fwd(mult, h_loc, h0, axis_name)[0]


def _pass_states_fwd(mult, h_loc, h0, axis_name):
  a_all = lax.all_gather(mult, axis_name)  # (n, b, H)
  h_all = lax.all_gather(h_loc, axis_name)  # (n, b, H, P, N)
  a_all = checkpoint_name(a_all, CARRY_NAME)
  a_ext = jnp.concatenate([jnp.ones_like(a_all[:1]), a_all], axis=0)
  h_out = _linear_scan(a_ext, jnp.concatenate([h0[None], h_all], axis=0))  # h_out[k] = H_{k-1}
  h_prev = checkpoint_name(h_out[lax.axis_index(axis_name)], STATE_NAME)
  return (h_prev, h_out[-1]), (a_all, h_prev)


def _pass_states_bwd(axis_name, res, cts):
  a_all, h_prev = res
  g_prev, g_fin = cts
  k = lax.axis_index(axis_name)
  # every shard's cotangent of its incoming state; the final state is replicated, so shard_map
  # hands each shard a part of its cotangent: their sum is the whole
  g = lax.all_gather(jnp.stack([g_prev, g_fin]), axis_name)  # (n, 2, b, H, P, N)
  direct = jnp.concatenate([g[:, 0], jnp.sum(g[:, 1], axis=0)[None]], axis=0)  # on H_{-1..n-1}
  # G_{j-1} = direct_{j-1} + m_j G_j, run from the end: a forward scan of the reversed arrays
  f = jnp.concatenate([a_all, jnp.ones_like(a_all[:1])], axis=0)  # m_0..m_{n-1}, then unused
  G = _linear_scan(f[::-1], direct[::-1])[::-1]  # G[j] = total cotangent of H_{j-1}
  G_own = G[k + 1]  # of H_k = m_k H_{k-1} + h_k
  d_mult = jnp.sum(G_own * h_prev, axis=(-2, -1))
  d_h0 = jnp.where(k == 0, G[0], 0.0)  # replicated input: shard_map sums the shards' parts
  return d_mult, G_own, d_h0


_pass_states.defvjp(_pass_states_fwd, _pass_states_bwd)


def context_ssd(
  ssd,
  x,
  dt,
  A,
  B,
  C,
  *,
  axis_name: str,
  D=None,
  dt_bias=None,
  dt_softplus=True,
  dt_limit=(0.0, float("inf")),
  initial_state=None,
  segment_ids=None,
  return_final_state=False,
  dt_scale=1.0,
  log_decay_offset=0.0,
  window=None,
  state_hook=None,
  **kwargs,
):
  """``ssd`` (the public op, passed in) of this shard's slice of a context-sharded sequence.

  Call inside ``shard_map`` with the sequence axis of x, dt, B, C and segment_ids split over
  ``axis_name`` in order; ``initial_state`` (the state before the whole sequence) and the
  returned final state are replicated over it. Other arguments as for ``ssd``.
  """
  if window is not None or state_hook is not None:
    raise ValueError(
      "ssd: window= and state_hook= are not supported with the sequence split over the "
      f"{axis_name!r} mesh axis (context parallelism); use a mesh with context size 1"
    )
  y, h_loc = ssd(
    x,
    dt,
    A,
    B,
    C,
    D=D,
    dt_bias=dt_bias,
    dt_softplus=dt_softplus,
    dt_limit=dt_limit,
    segment_ids=segment_ids,
    return_final_state=True,
    dt_scale=dt_scale,
    log_decay_offset=log_decay_offset,
    **kwargs,
  )
  acc = h_loc.dtype
  b, H = x.shape[0], x.shape[2]
  # the per-token log-decay exactly as the op's prologue computes it
  dtp = common.prepare_dt(dt, dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, dtype=acc)
  dA = dtp * jnp.asarray(dt_scale, acc) * jnp.asarray(A).astype(acc)
  dA = dA + jnp.asarray(log_decay_offset, acc)
  cs = jnp.cumsum(dA, axis=1)  # (b, Lc, H): log-decay from the shard start through t
  if segment_ids is None:
    first = None
    carry = jnp.exp(cs[:, -1])  # (b, H)
    starts = jnp.zeros((b,), bool)
  else:
    seg = jnp.asarray(segment_ids)
    first = common.segment_runs(seg) == 0  # (b, Lc): the shard's first document
    inner_reset = ~jnp.all(first, axis=1)
    carry = jnp.where(inner_reset[:, None], 0.0, jnp.exp(cs[:, -1])).astype(acc)
    # does this shard start a new document? compare with the previous shard's last id
    last = lax.all_gather(seg[:, -1], axis_name)  # (n, b)
    k = lax.axis_index(axis_name)
    prev_last = last[jnp.maximum(k - 1, 0)]
    starts = jnp.where(k > 0, seg[:, 0] != prev_last, False)
    starts = checkpoint_name(starts, STARTS_NAME)
  # 2. pass the summaries between the shards, in fp32, the sequence's initial state in front
  mult = jnp.where(starts[:, None], 0.0, carry).astype(acc)
  h0 = jnp.zeros_like(h_loc) if initial_state is None else jnp.asarray(initial_state).astype(acc)
  h_prev, h_final = _pass_states(mult, h_loc, h0, axis_name)
  h_in = jnp.where(starts[:, None, None, None], 0.0, h_prev)  # (b, H, P, N)
  # 3. the incoming state's part of y on the shard's first document
  Ch = common.expand_groups(jnp.asarray(C).astype(acc), H)  # (b, Lc, H, N)
  decay = jnp.exp(cs)
  if first is not None:
    decay = jnp.where(first[:, :, None], decay, 0.0)
  corr = jnp.einsum("blhn,bhpn->blhp", Ch, h_in) * decay[..., None]
  y = (y.astype(acc) + corr).astype(y.dtype)
  if return_final_state:
    return y, h_final
  return y
