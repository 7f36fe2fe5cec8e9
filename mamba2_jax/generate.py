"""Jitted inference: prefill (optionally in pieces), one-token decode step, greedy/sampled generation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.compiled import unstack, unstack_layers
from mamba2_jax.model import Mamba2LM


def prefill(model: Mamba2LM, tokens: jax.Array, cache: Mamba2Cache | None = None):
  """`model.prefill`: tokens (b, L) -> (logits (b, L, V), cache); compiled when called directly
  (mamba2_jax/compiled.py)."""
  return model.prefill(tokens, cache)


def decode_step(model: Mamba2LM, token: jax.Array, cache: Mamba2Cache):
  """`model.decode_step`: token (b,) -> (logits (b, V), cache); compiled when called directly."""
  return model.decode_step(token, cache)


def prefill_chunked(
  model: Mamba2LM, tokens: jax.Array, chunk: int, cache: Mamba2Cache | None = None
) -> tuple[jax.Array, Mamba2Cache]:
  """Feeds a long prompt in pieces of `chunk` tokens (memory flat in the prompt length).

  Returns the logits of the LAST position only (b, V) and the cache.
  """
  b, L = tokens.shape
  if cache is None:
    cache = model.init_cache(b)
  last = None
  for start in range(0, L, chunk):
    logits, cache = prefill(model, tokens[:, start : start + chunk], cache)
    last = logits[:, -1]
  return last, cache


def sample_logits(
  logits: jax.Array,
  key: jax.Array,
  *,
  vocab_size: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> jax.Array:
  """Picks one token per row from logits (b, V_padded); padded ids are never chosen.

  temperature 0 = greedy; otherwise softmax(logits / temperature) restricted to the top_k ids
  and/or the smallest set whose probability mass reaches top_p.
  """
  logits = logits.astype(jnp.float32)
  ids = jnp.arange(logits.shape[-1])
  logits = jnp.where(ids < vocab_size, logits, -jnp.inf)
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None and top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep ids whose preceding mass is < top_p (the top id is always kept).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
def decode_tokens(
  model, first_logits, cache, key, *, max_new_tokens, temperature=0.0, top_k=None, top_p=None
):
  """Samples max_new_tokens tokens starting from first_logits (b, V) and cache, in one jitted
  scan over the recurrent step -> (tokens (b, max_new_tokens), cache)."""
  vocab = model.config.vocab_size
  # on a CPU each layer's weights are sliced out of the stacked parameters once, before the
  # token loop, instead of once per token (mamba2_jax/compiled.py)
  graphdef, state = nnx.split(model)
  copies = jax.tree.map(unstack, state["layers"]) if unstack_layers(state["layers"]) else None

  def body(carry, step_key):
    logits, cache = carry
    tok = sample_logits(
      logits, step_key, vocab_size=vocab, temperature=temperature, top_k=top_k, top_p=top_p
    )
    step_state = state
    if copies is not None:
      step_state = jax.tree.map(lambda a: a, state)  # a new State: `state` is not mutated
      step_state["layers"] = jax.tree.map(jnp.stack, copies, is_leaf=lambda t: isinstance(t, tuple))
    logits, cache = nnx.merge(graphdef, step_state).decode_step(tok, cache)
    return (logits, cache), tok

  keys = jax.random.split(key, max_new_tokens)
  (_, cache), toks = jax.lax.scan(body, (first_logits, cache), keys)
  return toks.T, cache


def generate(
  model: Mamba2LM,
  prompt: jax.Array,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  seed: int = 0,
  prefill_chunk: int | None = None,
  stream: bool = False,
):
  """Continues prompt (b, Lp) int32 by max_new_tokens tokens -> (b, max_new_tokens) int32.

  The prompt is prefilled (in pieces of `prefill_chunk` tokens if given); decoding runs as one
  jitted scan over the recurrent step, so there is no per-token Python overhead. With
  ``stream=True`` returns an iterator of the new tokens (b,) int32, one per step as it is
  decoded (one compiled program per token: sample + decode step), equal to the tokens the
  scan gives for the same seed.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prefill_chunk:
    last, cache = prefill_chunked(model, prompt, prefill_chunk)
  else:
    logits, cache = prefill(model, prompt)
    last = logits[:, -1]
  sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
  if stream:
    return _stream(model, last, cache, jax.random.key(seed), max_new_tokens, sampling)
  toks, _ = decode_tokens(
    model,
    last,
    cache,
    jax.random.key(seed),
    max_new_tokens=max_new_tokens,
    **sampling,
  )
  return toks


@functools.partial(jax.jit, static_argnames=("vocab_size", "temperature", "top_k", "top_p"))
def _sample_jit(logits, key, **kw):
  return sample_logits(logits, key, **kw)


def _stream(model, logits, cache, key, max_new_tokens, sampling):
  """The body of decode_tokens' scan, one compiled sample and one compiled step per token."""
  keys = jax.random.split(key, max_new_tokens)
  for i in range(max_new_tokens):
    tok = _sample_jit(logits, keys[i], vocab_size=model.config.vocab_size, **sampling)
    yield tok
    if i + 1 < max_new_tokens:
      logits, cache = model.decode_step(tok, cache)
