"""Generation: greedy == argmax loop over decode_step; sampling filters behave as specified."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.generate import decode_step, generate, prefill, sample_logits

CFG = Mamba2Config.preset("tiny", chunk_size=8, vocab_size=90)


def test_greedy_generate_matches_manual_loop():
  model = Mamba2LM(CFG, rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(0), (2, 19), 0, CFG.vocab_size)
  out = np.asarray(generate(model, prompt, 12))
  logits, cache = prefill(model, prompt)
  last, want = logits[:, -1], []
  for _ in range(12):
    tok = jnp.argmax(last[:, : CFG.vocab_size], -1)
    want.append(tok)
    last, cache = decode_step(model, tok, cache)
  np.testing.assert_array_equal(out, np.stack(want, 1))
  np.testing.assert_array_equal(np.asarray(generate(model, prompt, 12, prefill_chunk=5)), out)
  # Re-running the whole sequence through the full forward gives the same argmax tokens.
  full = model(jnp.concatenate([prompt, jnp.asarray(out)], 1))
  np.testing.assert_array_equal(np.argmax(np.asarray(full)[:, 18:-1, : CFG.vocab_size], -1), out)


def test_sampling_never_picks_padded_ids_and_respects_top_k():
  logits = jnp.zeros((4000, 16)).at[:, 12:].set(100.0).at[:, :3].set(5.0)
  toks = np.asarray(
    sample_logits(logits, jax.random.key(0), vocab_size=12, temperature=1.0, top_k=3)
  )
  assert set(np.unique(toks)) == {0, 1, 2}
  greedy = sample_logits(logits, jax.random.key(0), vocab_size=12, temperature=0.0)
  assert np.all(np.asarray(greedy) == 0)


def test_temperature_sampling_follows_softmax():
  base = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  logits = jnp.tile(base, (40000, 1))
  toks = np.asarray(sample_logits(logits, jax.random.key(1), vocab_size=4, temperature=1.0))
  freq = np.bincount(toks, minlength=4) / toks.size
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.01)
  # top_p = 0.7 keeps the smallest prefix with mass >= 0.7: ids 0 and 1, renormalised.
  toks = np.asarray(
    sample_logits(logits, jax.random.key(2), vocab_size=4, temperature=1.0, top_p=0.7)
  )
  freq = np.bincount(toks, minlength=4) / toks.size
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.01)
  # Temperature 0.5 squares the probabilities before renormalising.
  toks = np.asarray(sample_logits(logits, jax.random.key(3), vocab_size=4, temperature=0.5))
  p2 = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
  np.testing.assert_allclose(np.bincount(toks, minlength=4) / toks.size, p2 / p2.sum(), atol=0.01)


def test_streamed_tokens_equal_generate():
  """generate(..., stream=True) yields, one step at a time, the tokens of the scanned decode for
  the same seed: greedy and sampled."""
  model = Mamba2LM(Mamba2Config.preset("tiny", n_layer=2), rngs=nnx.Rngs(3))
  prompt = jax.random.randint(jax.random.key(4), (2, 12), 0, model.config.vocab_size)
  for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=5)):
    want = generate(model, prompt, 6, **kw)
    it = generate(model, prompt, 6, stream=True, **kw)
    first = next(it)
    assert first.shape == (2,) and first.dtype == jnp.int32
    got = np.stack([np.asarray(first), *map(np.asarray, it)], axis=1)
    np.testing.assert_array_equal(got, want)
