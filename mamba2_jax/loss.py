"""Next-token cross-entropy fused with the LM head: `lm_head_nll(h, w, targets)`.

Equal to `-log_softmax(h @ W^T)[target]` per token (float32 softmax over the padded vocabulary,
as `Mamba2LM.__call__` + `jax.nn.log_softmax` computes it), with a hand-written VJP:

  forward:  logits = h W^T (float32 accumulation), lse = logsumexp(logits), nll = lse - logit[t]
  backward: dlogits = (exp(logits - lse) - onehot(t)) * g    one elementwise pass
            dh = dlogits W,  dW = dlogits^T h               two GEMMs

Differentiating log_softmax + take_along_axis instead costs a scatter into a zero (tokens, vocab)
array, a separate softmax pass and, on XLA:CPU, a transposed copy of dlogits fused into that
pass (16 ms of a 300 ms training step of the model benchmark at L=2048); this form is one pass
over the logits each way.

Long sequences: the float32 logits of every token do not fit (a 262K-token sequence with the NeoX
vocabulary holds 53 GB of them). With ``passes=k > 1`` the tokens are processed in k strided
passes (pass j takes positions j, j+k, j+2k, ... of every row, so a sequence axis sharded in
contiguous blocks stays evenly sharded and no pass needs communication), only the per-token
log-sum-exp is saved, and the backward recomputes each pass's logits: one more head GEMM in
exchange for logits memory divided by k. ``passes=None`` picks the smallest power of two that
keeps the logits of one pass within ``LOGITS_BUDGET`` bytes (1 at the sizes a CPU trains).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["lm_head_logits", "lm_head_nll", "model_nll", "loss_passes", "LOGITS_BUDGET"]

# bytes of float32 logits (over all devices) one pass of the fused loss may hold
LOGITS_BUDGET = 2 << 30


def model_nll(model, inputs: jax.Array, targets: jax.Array, *, segment_ids=None, cache=None):
  """Per-token NLL (b, L) float32 of a `Mamba2LM` on inputs (b, L) -> targets (b, L), with its
  head fused with the cross-entropy; continues from `cache` if given. Returns (nll, new cache
  or None)."""
  h, new_cache = model.features(inputs, segment_ids=segment_ids, cache=cache)
  w, vocab_major = model.head_weight()
  return lm_head_nll(h, w, targets, vocab_major=vocab_major), new_cache


def lm_head_logits(h: jax.Array, w: jax.Array, vocab_major: bool) -> jax.Array:
  """h (..., d) @ the head weight -> float32 logits (..., V); w as in `lm_head_nll`."""
  spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
  return jnp.einsum(spec, h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def loss_passes(shape, vocab: int, budget: int = LOGITS_BUDGET) -> int:
  """The ``passes=None`` choice for targets of ``shape`` (..., L): the smallest power of two k
  dividing L with the float32 logits of one pass (tokens / k x vocab x 4 B) within ``budget``
  (the largest power of two dividing L when none is)."""
  tokens = math.prod(shape)
  L = shape[-1] if shape else 1
  k = 1
  while tokens // k * vocab * 4 > budget and L % (2 * k) == 0:
    k *= 2
  return k


def lm_head_nll(
  h: jax.Array,
  w: jax.Array,
  targets: jax.Array,
  *,
  vocab_major: bool = True,
  passes: int | None = None,
) -> jax.Array:
  """Per-token negative log-likelihood (float32, shape of `targets`).

  h (..., L, d) hidden states in the compute dtype; w the head weight, (V, d) if `vocab_major`
  (a tied embedding) else (d, V); targets (..., L) int in [0, V). ``passes``: process the
  tokens in that many strided passes over L (module docstring; None: :func:`loss_passes`).

  The leading axes are kept as they are (no flattening to (tokens, d)): a (batch, length) pair
  sharded over the mesh (batch over data, length over "context") flattened into one axis has
  no tiling XLA can express, and its partitioner would gather the whole sequence onto every
  device to compute the head. The passes split L as (L / k, k) and scan over k, so the L / k
  axis keeps the sharding of L.
  """
  lead = targets.shape
  vocab = w.shape[0] if vocab_major else w.shape[1]
  k = loss_passes(lead, vocab) if passes is None else passes
  if not isinstance(k, int) or k < 1 or (lead and lead[-1] % k):
    raise ValueError(f"lm_head_nll: passes={k!r} must be an int >= 1 dividing L={lead[-1:]}")
  if k == 1:
    return _nll(h, w, targets, vocab_major)
  # (..., L, d) -> (k, ..., L / k, d): pass j holds positions j, j + k, ... of every row
  L, d = lead[-1], h.shape[-1]
  hs = jnp.moveaxis(h.reshape(*lead[:-1], L // k, k, d), -2, 0)
  ts = jnp.moveaxis(targets.reshape(*lead[:-1], L // k, k), -1, 0)
  nll = _nll_passes(hs, w, ts, vocab_major)  # (k, ..., L / k)
  return jnp.moveaxis(nll, 0, -1).reshape(lead)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nll(h, w, targets, vocab_major):
  return _nll_fwd(h, w, targets, vocab_major)[0]


def _nll_fwd(h, w, targets, vocab_major):
  logits = lm_head_logits(h, w, vocab_major)  # (..., V) float32
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - picked, (h, w, targets, logits, lse)


def _grads(h, w, targets, logits, lse, g, vocab_major):
  """dh (..., d) and dw (float32) of sum(g * nll) given the logits (..., V) and their lse."""
  onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
  d = ((jnp.exp(logits - lse[..., None]) - onehot) * g[..., None]).astype(h.dtype)  # (..., V)
  wc = w.astype(h.dtype)
  lead = "".join(chr(ord("A") + i) for i in range(h.ndim - 1))  # the leading axes, summed in dW
  if vocab_major:
    dh = jnp.einsum("...v,vd->...d", d, wc, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{lead}v,{lead}d->vd", d, h, preferred_element_type=jnp.float32)
  else:
    dh = jnp.einsum("...v,dv->...d", d, wc, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{lead}d,{lead}v->dv", h, d, preferred_element_type=jnp.float32)
  return dh, dw


def _nll_bwd(vocab_major, res, g):
  h, w, targets, logits, lse = res
  dh, dw = _grads(h, w, targets, logits, lse, g, vocab_major)
  return dh.astype(h.dtype), dw.astype(w.dtype), None


_nll.defvjp(_nll_fwd, _nll_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nll_passes(hs, w, ts, vocab_major):
  return _nll_passes_fwd(hs, w, ts, vocab_major)[0]


def _nll_passes_fwd(hs, w, ts, vocab_major):
  def one(_, ht):
    nll, (*_, lse) = _nll_fwd(ht[0], w, ht[1], vocab_major)
    return None, (nll, lse)

  _, (nll, lse) = lax.scan(one, None, (hs, ts))
  return nll, (hs, w, ts, lse)


def _nll_passes_bwd(vocab_major, res, g):
  hs, w, ts, lse = res

  def one(dw, x):
    h, t, l, gj = x
    logits = lm_head_logits(h, w, vocab_major)  # recomputed: only lse was saved
    dh, dwj = _grads(h, w, t, logits, l, gj, vocab_major)
    return dw + dwj, dh.astype(h.dtype)

  dw, dhs = lax.scan(one, jnp.zeros(w.shape, jnp.float32), (hs, ts, lse, g))
  return dhs, dw.astype(w.dtype), None


_nll_passes.defvjp(_nll_passes_fwd, _nll_passes_bwd)
