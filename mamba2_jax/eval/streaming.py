"""Streaming core: next-token scores and prefill over arbitrarily long inputs in constant memory.

A sequence (b, L) is fed through `model.prefill(piece, cache)` piece by piece with the cache
(conv context + SSM state) carried, which is exact (`prefill(a) ; prefill(b, cache)` ==
`prefill(a + b)`). Memory is O(b * chunk_len * padded_vocab) for the logits of one piece plus the
O(1) cache, independent of L; host memory holds only the int32 tokens and the float32 outputs.

Piece lengths: full chunks of `chunk_len`, then the remainder. Scoring pads the remainder at
the end to a power of two (the model is causal, so the real positions' scores are unchanged;
the cache after it is not needed). `prefill_stream`, whose cache must be exact, splits the
remainder into descending powers of two instead (`split_lengths`). Every piece shape is
compiled once per batch size and shared by all calls and all models with the same structure
(the jitted functions take the nnx graphdef as a static argument), so a sweep over many lengths
compiles at most log2(chunk_len) + 1 shapes per function.

Scores: position i of the output is the cross-entropy (nats) of predicting token i+1 from
tokens 0..i, and the argmax prediction for it; a sequence of L tokens has L-1 positions.
Chunk boundaries are scored too (the target of a piece's last input is the next piece's first
token; the paper's script drops it). Padded vocabulary ids (>= config.vocab_size) are excluded
from the softmax and the argmax, as in generation.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mamba2_jax.cache import Mamba2Cache


def split_lengths(total: int, chunk_len: int) -> list[int]:
  """Piece lengths covering `total` tokens: `chunk_len`, ..., then powers of two, descending."""
  if chunk_len < 1:
    raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
  n, rem = divmod(int(total), int(chunk_len))
  pieces = [int(chunk_len)] * n
  for bit in reversed(range(rem.bit_length())):
    if rem >> bit & 1:
      pieces.append(1 << bit)
  return pieces


def piece_bounds(total: int, chunk_len: int) -> list[tuple[int, int]]:
  """(start, end) of every piece of `split_lengths`."""
  bounds, start = [], 0
  for n in split_lengths(total, chunk_len):
    bounds.append((start, start + n))
    start += n
  return bounds


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
  """Sets logits of padded ids (>= vocab_size) to -inf. logits (..., V_padded)."""
  ids = jnp.arange(logits.shape[-1])
  return jnp.where(ids < vocab_size, logits.astype(jnp.float32), -jnp.inf)


def next_token_scores(logits: jax.Array, targets: jax.Array, vocab_size: int):
  """(loss (...,) float32 nats, argmax (...,) int32) of logits (..., V) against targets (...,)."""
  logits = mask_padded_vocab(logits, vocab_size)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return logz - picked, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def _score_piece(graphdef, state, inputs, targets, cache):
  model = nnx.merge(graphdef, state)
  logits, cache = model.prefill(inputs, cache)
  loss, pred = next_token_scores(logits, targets, model.config.vocab_size)
  return loss, pred, cache


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def _prefill_piece(graphdef, state, tokens, cache):
  model = nnx.merge(graphdef, state)
  logits, cache = model.prefill(tokens, cache)
  return logits[:, -1], cache


def as_batch(tokens) -> np.ndarray:
  """int32 (b, L) from (L,) or (b, L) array-likes."""
  arr = np.asarray(tokens)
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2:
    raise ValueError(f"tokens must have shape (L,) or (b, L), got {arr.shape}")
  return arr.astype(np.int32, copy=False)


def _progress(progress, total, desc):
  if isinstance(progress, tqdm):
    return progress
  return tqdm(
    total=total,
    desc=desc,
    unit="tok",
    unit_scale=True,
    disable=not progress,
    leave=False,
    mininterval=1.0,
  )


def _own_cache(model, batch, cache):
  """A cache the jitted pieces may donate: fresh, or a copy of the caller's."""
  if cache is None:
    return model.init_cache(batch)
  return jax.tree.map(jnp.copy, cache)


class ScoredPiece(NamedTuple):
  """Scores of positions [start, start + loss.shape[1]) of a `iter_token_scores` stream."""

  start: int
  loss: np.ndarray  # (b, n) float32, nats
  pred: np.ndarray  # (b, n) int32, argmax next-token ids


def iter_token_scores(
  model,
  tokens,
  chunk_len: int,
  *,
  cache: Mamba2Cache | None = None,
  progress=False,
  desc: str = "score",
) -> Iterator[ScoredPiece]:
  """Yields the next-token scores of tokens (b, L) piece by piece (L-1 positions in all).

  Position i scores token i+1 given tokens 0..i (see the module docstring). Piece k+1 is
  dispatched before piece k's results are copied to the host, so the device never waits on the
  host. `cache`: continue from this cache (default: a fresh one). `progress`: bool or a tqdm
  bar (advanced by the number of tokens consumed).
  """
  toks = as_batch(tokens)
  b, L = toks.shape
  if L < 2:
    return
  graphdef, state = nnx.split(model)
  cache = _own_cache(model, b, cache)
  bar = _progress(progress, L - 1, desc)
  n_full = (L - 1) // chunk_len * chunk_len
  bounds = [(s, s + chunk_len) for s in range(0, n_full, chunk_len)]
  if n_full < L - 1:
    bounds.append((n_full, L - 1))
  pending = None
  try:
    for start, end in bounds:
      inputs, targets = toks[:, start:end], toks[:, start + 1 : end + 1]
      n = end - start
      width = min(chunk_len, 1 << (n - 1).bit_length())
      if width > n:  # the last piece: pad to a power of two (causal: real scores unchanged)
        inputs, targets = (np.pad(a, ((0, 0), (0, width - n))) for a in (inputs, targets))
      loss, pred, cache = _score_piece(
        graphdef, state, jnp.asarray(inputs), jnp.asarray(targets), cache
      )
      if pending is not None:
        yield _fetch(*pending, bar)
      pending = (start, n, loss, pred)
    yield _fetch(*pending, bar)
  finally:
    if bar is not progress:
      bar.close()


def _fetch(start, n, loss, pred, bar):
  out = ScoredPiece(start, np.asarray(loss)[:, :n], np.asarray(pred)[:, :n])
  bar.update(out.loss.shape[1])
  return out


def token_scores(model, tokens, chunk_len: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """(loss (b, L-1) float32, pred (b, L-1) int32) of tokens (b, L); see `iter_token_scores`."""
  toks = as_batch(tokens)
  b, L = toks.shape
  loss = np.zeros((b, max(L - 1, 0)), np.float32)
  pred = np.zeros((b, max(L - 1, 0)), np.int32)
  for piece in iter_token_scores(model, toks, chunk_len, **kwargs):
    n = piece.loss.shape[1]
    loss[:, piece.start : piece.start + n] = piece.loss
    pred[:, piece.start : piece.start + n] = piece.pred
  return loss, pred


def prefill_stream(
  model,
  tokens,
  chunk_len: int,
  *,
  cache: Mamba2Cache | None = None,
  progress=False,
  desc: str = "prefill",
) -> tuple[jax.Array, Mamba2Cache]:
  """Feeds tokens (b, L) through the model in pieces -> (logits of the last position (b, V),
  cache after the last token). Exact: equals `model.prefill(tokens)`."""
  toks = as_batch(tokens)
  b, L = toks.shape
  if L < 1:
    raise ValueError("prefill_stream needs at least one token")
  graphdef, state = nnx.split(model)
  cache = _own_cache(model, b, cache)
  bar = _progress(progress, L, desc)
  last = None
  try:
    for start, end in piece_bounds(L, chunk_len):
      last, cache = _prefill_piece(graphdef, state, jnp.asarray(toks[:, start:end]), cache)
      bar.update(end - start)
  finally:
    if bar is not progress:
      bar.close()
  return last, cache
