"""The public methods run as cached compiled programs when called directly (mamba2_jax/compiled.py)
and as written inside a user's own transformation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM, compiled


def _model():
  return Mamba2LM(Mamba2Config.preset("tiny", n_layer=2), rngs=nnx.Rngs(0))


def test_direct_calls_equal_the_uncompiled_methods_and_compile_once(monkeypatch):
  model = _model()
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, model.config.vocab_size)
  logits, cache = model.prefill(tokens)
  want_logits, want_cache = Mamba2LM.prefill.uncompiled(model, tokens)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(cache.ssm, want_cache.ssm, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model(tokens), Mamba2LM.__call__.uncompiled(model, tokens), atol=1e-6)
  token = tokens[:, -1]
  step, _ = model.decode_step(token, cache)
  np.testing.assert_allclose(
    step, Mamba2LM.decode_step.uncompiled(model, token, cache)[0], atol=1e-6
  )
  # later calls: no graph traversal, no new compile
  splits = []
  monkeypatch.setattr(compiled.nnx, "split", lambda *a, **k: splits.append(1))
  size = compiled._run._cache_size()
  for _ in range(3):
    _, cache = model.decode_step(token, cache)
  assert splits == [] and compiled._run._cache_size() == size


def test_composes_with_user_transformations_and_sees_updates():
  model = _model()
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, model.config.vocab_size)
  direct = model(tokens)
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, tokens), direct, atol=1e-6)
  g = nnx.grad(lambda m: jnp.mean(m(tokens)))(model)  # traced: runs the method as written
  assert float(jnp.max(jnp.abs(g.embedding[...]))) > 0
  model.embedding[...] = model.embedding[...] * 2.0  # an in-place update reaches the next call
  np.testing.assert_allclose(model(tokens), Mamba2LM.__call__.uncompiled(model, tokens), atol=1e-6)
  assert float(jnp.max(jnp.abs(model(tokens) - direct))) > 1e-3
