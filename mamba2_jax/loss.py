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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["lm_head_logits", "lm_head_nll", "model_nll"]


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


def lm_head_nll(
  h: jax.Array, w: jax.Array, targets: jax.Array, *, vocab_major: bool = True
) -> jax.Array:
  """Per-token negative log-likelihood (float32, shape of `targets`).

  h (..., d) hidden states in the compute dtype; w the head weight, (V, d) if `vocab_major`
  (a tied embedding) else (d, V); targets (...) int in [0, V).

  The leading axes are kept as they are (no flattening to (tokens, d)): a (batch, length) pair
  sharded over the mesh (batch over data, length over "context") flattened into one axis has
  no tiling XLA can express, and its partitioner would gather the whole sequence onto every
  device to compute the head.
  """
  return _nll(h, w, targets, vocab_major)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nll(h, w, targets, vocab_major):
  return _nll_fwd(h, w, targets, vocab_major)[0]


def _nll_fwd(h, w, targets, vocab_major):
  logits = lm_head_logits(h, w, vocab_major)  # (..., V) float32
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - picked, (h, w, targets, logits, lse)


def _nll_bwd(vocab_major, res, g):
  h, w, targets, logits, lse = res
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
  return dh.astype(h.dtype), dw.astype(w.dtype), None


_nll.defvjp(_nll_fwd, _nll_bwd)
