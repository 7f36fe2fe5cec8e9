"""Streaming core: chunked next-token scores == one-shot forward; exact prefill; piece lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.eval import streaming

CFG = Mamba2Config.preset("tiny", chunk_size=8, vocab_size=100)  # padded vocab 112


@pytest.fixture(scope="module")
def model():
  return Mamba2LM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return np.asarray(jax.random.randint(jax.random.key(1), (3, 61), 0, CFG.vocab_size), np.int32)


@pytest.fixture(scope="module")
def one_shot(model, tokens):
  logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)), np.float64)
  logits = logits[:, :-1, : CFG.vocab_size]  # padded ids excluded, last position has no target
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  loss = logz - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
  return loss, logits.argmax(-1)


def test_split_lengths():
  assert streaming.split_lengths(0, 8) == []
  assert streaming.split_lengths(16, 8) == [8, 8]
  assert streaming.split_lengths(29, 8) == [8, 8, 8, 4, 1]
  assert streaming.split_lengths(7, 64) == [4, 2, 1]
  assert sum(streaming.split_lengths(12345, 1000)) == 12345
  assert streaming.piece_bounds(13, 8) == [(0, 8), (8, 12), (12, 13)]


@pytest.mark.parametrize("chunk_len", [1, 7, 16, 60, 64, 500])
def test_streamed_scores_equal_one_shot_forward(model, tokens, one_shot, chunk_len):
  loss, pred = streaming.token_scores(model, tokens, chunk_len)
  want_loss, want_pred = one_shot
  assert loss.shape == pred.shape == (3, 60)
  np.testing.assert_allclose(loss, want_loss, atol=2e-4, rtol=0)
  # argmax may flip only between near-ties
  assert (pred == want_pred).mean() > 0.99


def test_chunk_boundaries_are_scored(model, tokens, one_shot):
  # with chunk_len 10, positions 9, 19, ... are the last input of a piece: their target is the
  # next piece's first token (the paper's script drops these positions).
  loss, _ = streaming.token_scores(model, tokens, 10)
  np.testing.assert_allclose(loss[:, 9::10], one_shot[0][:, 9::10], atol=2e-4, rtol=0)
  assert np.all(np.isfinite(loss)) and np.all(loss > 0)


def test_single_prompt_and_iterator_pieces(model, tokens, one_shot):
  pieces = list(streaming.iter_token_scores(model, tokens[0], 16))
  assert [(p.start, p.loss.shape[1]) for p in pieces] == [(0, 16), (16, 16), (32, 16), (48, 12)]
  loss = np.concatenate([p.loss for p in pieces], axis=1)
  np.testing.assert_allclose(loss[0], one_shot[0][0], atol=2e-4, rtol=0)


def test_prefill_stream_is_exact_and_keeps_callers_cache(model, tokens):
  logits, cache = nnx.jit(lambda m, t: m.prefill(t))(model, jnp.asarray(tokens))
  last, c = streaming.prefill_stream(model, tokens, 13)
  np.testing.assert_allclose(np.asarray(last), np.asarray(logits[:, -1]), atol=2e-4, rtol=0)
  for name in ("conv_x", "conv_B", "conv_C", "ssm"):
    np.testing.assert_allclose(
      np.asarray(getattr(c, name)), np.asarray(getattr(cache, name)), atol=2e-4, rtol=0
    )
  # continuing from a cache: the caller's cache stays usable (it is copied, not donated)
  _, c1 = streaming.prefill_stream(model, tokens[:, :30], 8)
  last2, _ = streaming.prefill_stream(model, tokens[:, 30:], 8, cache=c1)
  np.testing.assert_allclose(np.asarray(last2), np.asarray(logits[:, -1]), atol=2e-4, rtol=0)
  assert np.isfinite(np.asarray(c1.ssm)).all()
