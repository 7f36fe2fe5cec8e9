"""Mamba2LM: padded embedding -> n_layer x [x += mixer(RMSNorm(x))] -> RMSNorm -> LM head.

Layers are created with `nnx.vmap` (parameters stacked on a leading "layers" axis) and run
under `jax.lax.scan`, so compile time does not grow with depth; `config.remat_policy` wraps the
scanned layer in `jax.checkpoint`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba2_jax import context_conv
from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.compiled import compiled_method
from mamba2_jax.config import Mamba2Config
from mamba2_jax.layers import param, rms_norm
from mamba2_jax.loss import lm_head_logits, model_nll
from mamba2_jax.mixer import Mamba2Mixer
from mamba2_jax.ssd import context as ssd_context
from mamba2_jax.ssd.platform import target_platform

# Every policy also saves the small values that context parallelism exchanges between sequence
# shards (the SSD's incoming states and carry factors, the conv halos; mamba2_jax/ssd/context.py,
# mamba2_jax/context_conv.py), so a rematerialised layer never repeats those collectives. They
# exist only under a mesh with a "context" axis > 1.
_CONTEXT_SAVED = jax.checkpoint_policies.save_only_these_names(
  *ssd_context.SAVE_NAMES, *context_conv.SAVE_NAMES
)
_REMAT = {
  "full": _CONTEXT_SAVED,
  "save_dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _CONTEXT_SAVED
  ),
}


class Mamba2Block(nnx.Module):
  """Pre-norm residual block without MLP (d_intermediate = 0, as every published Mamba-2)."""

  def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.norm = param(jnp.ones((config.d_model,), config.param_jnp_dtype), ("norm",))
    self.mixer = Mamba2Mixer(config, rngs=rngs)

  def __call__(self, residual, *, segment_ids=None, cache=None):
    c = self.config
    h = rms_norm(residual, self.norm[...], c.norm_eps, c.compute_dtype)
    h, cache = self.mixer(h, segment_ids=segment_ids, cache=cache)
    return residual + h.astype(residual.dtype), cache

  def step(self, residual, cache):
    c = self.config
    h = rms_norm(residual, self.norm[...], c.norm_eps, c.compute_dtype)
    h, cache = self.mixer.step(h, cache)
    return residual + h.astype(residual.dtype), cache


class Mamba2LM(nnx.Module):
  """Mamba-2 language model.

  `model(tokens (b, L) int32, segment_ids=None) -> logits (b, L, padded_vocab) float32`.
  Training: `loss(tokens, targets) -> mean next-token NLL` (the LM head fused with the
  cross-entropy). Inference: `init_cache(b)`, `prefill(tokens, cache=None) -> (logits, cache)`,
  `decode_step(token (b,), cache) -> (logits (b, padded_vocab), cache)`.
  """

  def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    c = config
    pdt = c.param_jnp_dtype
    emb = jax.random.normal(rngs.params(), (c.padded_vocab_size, c.d_model), jnp.float32)
    self.embedding = param((emb * c.initializer_range).astype(pdt), ("vocab", "embed"))

    @nnx.split_rngs(splits=c.n_layer)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return Mamba2Block(c, rngs=rngs)

    self.layers = make_layers(rngs)
    self.norm_f = param(jnp.ones((c.d_model,), pdt), ("norm",))
    if not c.tie_embeddings:
      head = jax.random.normal(rngs.params(), (c.d_model, c.padded_vocab_size), jnp.float32)
      self.lm_head = param((head * c.initializer_range).astype(pdt), ("embed", "vocab"))

  # -------------------------------------------------------------------------------------------
  def _embed(self, tokens):
    c = self.config
    h = jnp.take(self.embedding[...], tokens, axis=0)
    return h.astype(jnp.float32 if c.residual_in_fp32 else c.compute_dtype)

  def _final_norm(self, residual):
    c = self.config
    return rms_norm(residual, self.norm_f[...], c.norm_eps, c.compute_dtype)

  def head_weight(self) -> tuple[jax.Array, bool]:
    """(w, vocab_major): the LM head, (padded_vocab, d_model) if vocab_major (tied) else
    (d_model, padded_vocab)."""
    if self.config.tie_embeddings:
      return self.embedding[...], True
    return self.lm_head[...], False

  def _logits(self, h):
    """Final-normed hidden states (compute dtype) -> float32 logits (..., padded_vocab)."""
    return lm_head_logits(h, *self.head_weight())

  def _scan_layers(self, fn, residual, cache, unroll=None):
    """Runs fn(block, residual, layer_cache) -> (residual, layer_cache) over stacked layers.

    With a remat policy each layer is checkpointed, so the backward keeps one input (the
    residual stream) per layer; with ``remat_group = g > 1`` the scan runs over groups of g
    layers, each group checkpointed too: the backward keeps the n_layer / g group inputs,
    recomputes one group's layer inputs at a time (g more) and then each layer's internals.
    The same arithmetic runs in the same order, so values and gradients do not change.
    ``unroll``: layers per scan iteration (default: the config's resolved `scan_unroll`)."""
    c = self.config
    graphdef, state = nnx.split(self.layers)

    def body(carry, xs):
      layer_state, layer_cache = xs
      return fn(nnx.merge(graphdef, layer_state), carry, layer_cache)

    unroll = unroll or c.resolved_scan_unroll()
    if c.remat_policy == "none":
      return jax.lax.scan(body, residual, (state, cache), unroll=unroll)
    body = jax.checkpoint(
      body, policy=_REMAT.get(c.remat_policy, _CONTEXT_SAVED), prevent_cse=False
    )
    g = c.remat_group
    if g == 1:
      return jax.lax.scan(body, residual, (state, cache), unroll=unroll)

    def group(carry, xs):
      return jax.lax.scan(body, carry, xs, unroll=min(unroll, g))

    # the group's own policy keeps only the context exchanges' small named values, so
    # recomputing a group repeats no collective either
    group = jax.checkpoint(group, policy=_CONTEXT_SAVED, prevent_cse=False)
    n = c.n_layer
    xs = jax.tree.map(lambda a: a.reshape(n // g, g, *a.shape[1:]), (state, cache))
    residual, ys = jax.lax.scan(group, residual, xs, unroll=max(1, unroll // g))
    return residual, jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), ys)

  @compiled_method
  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    return self._logits(self.features(tokens, segment_ids=segment_ids)[0])

  @compiled_method
  def loss(
    self,
    tokens: jax.Array,
    targets: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """The training loss: mean negative log-likelihood (float32 scalar) of `targets` (b, L)
    after `tokens` (b, L); with `mask` (b, L) (bool or weights) sum(nll * mask) /
    max(sum(mask), 1), i.e. the mean over the masked-in tokens and 0 when there are none. The
    LM head is fused with the cross-entropy (`mamba2_jax.loss.model_nll`): no log-softmax over
    the vocabulary is materialised, and long sequences go in strided passes. Differentiate it
    inside a transformation, e.g. `nnx.value_and_grad(lambda m: m.loss(x, y))(model)`."""
    nll, _ = model_nll(self, tokens, targets, segment_ids=segment_ids)
    if mask is None:
      return jnp.mean(nll)
    m = mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

  def features(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    cache: Mamba2Cache | None = None,
  ) -> tuple[jax.Array, Mamba2Cache | None]:
    """The LM head's input: final-normed hidden states (b, L, d_model) in the compute dtype,
    and with `cache` (continued from, as in `prefill`) the new cache, else None.

    `logits = h @ head_weight()`; the training loss applies the head fused with the
    cross-entropy (mamba2_jax.loss.lm_head_nll) instead of materialising log-probabilities.
    """
    residual = self._embed(tokens)
    if cache is None:
      residual, _ = self._scan_layers(
        lambda blk, r, _: blk(r, segment_ids=segment_ids), residual, None
      )
    else:
      residual, cache = self._scan_layers(
        lambda blk, r, lc: blk(r, segment_ids=segment_ids, cache=lc), residual, cache
      )
    return self._final_norm(residual), cache

  def init_cache(self, batch: int) -> Mamba2Cache:
    return Mamba2Cache.zeros(self.config, batch)

  @compiled_method
  def prefill(
    self,
    tokens: jax.Array,
    cache: Mamba2Cache | None = None,
    *,
    segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, Mamba2Cache]:
    """Processes tokens (b, L), continuing from `cache` if given; returns (logits, cache).

    prefill(a) then prefill(b, cache) equals prefill(a + b): long prompts can be fed in pieces.
    """
    if cache is None:
      cache = self.init_cache(tokens.shape[0])
    h, cache = self.features(tokens, segment_ids=segment_ids, cache=cache)
    return self._logits(h), cache

  @compiled_method(unstack="layers")
  def decode_step(self, token: jax.Array, cache: Mamba2Cache) -> tuple[jax.Array, Mamba2Cache]:
    """One token per sequence: token (b,) int -> (logits (b, padded_vocab) float32, cache).

    On a CPU the layers are always fully unrolled, so that each reads its own weight copy
    (mamba2_jax/compiled.py) instead of copying its slice of the stacked weights per token."""
    residual = self._embed(token)
    unroll = self.config.n_layer if target_platform() == "cpu" else None
    residual, cache = self._scan_layers(
      lambda blk, r, lc: blk.step(r, lc), residual, cache, unroll=unroll
    )
    return self._logits(self._final_norm(residual)), cache
