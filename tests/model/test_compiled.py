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


def _decode_bytes(model, token, cache, mask, leaves):
  c = compiled._MODELS[model]
  lowered = compiled._run.lower(
    c.graphdef, c.treedef, "decode_step", mask, leaves, (token, cache), {}
  )
  return lowered.compile().cost_analysis()["bytes accessed"]


def test_decode_reads_per_layer_weight_copies_on_cpu(monkeypatch):
  """On a CPU decode_step passes each stacked layer parameter as per-layer copies: XLA folds
  the layer slices into them, so a step stops copying every weight (bytes moved per step fall
  by at least one read and one write of the layer weights); the copies are remade when a
  parameter's array is replaced and are skipped above UNSTACK_MAX_BYTES."""
  model = Mamba2LM(Mamba2Config.preset("small", n_layer=3), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (1, 8), 0, model.config.vocab_size)
  _, cache = model.prefill(tokens)
  token = tokens[:, -1]
  c = compiled._MODELS[model]
  mask, leaves = c.unstacked("layers")
  assert mask is not None and all(
    isinstance(a, tuple) and len(a) == 3 for a, m in zip(leaves, mask) if m
  )
  layer_bytes = sum(a.nbytes for a, m in zip(c.leaves(), mask) if m)
  stacked = _decode_bytes(model, token, cache, None, c.leaves())
  per_layer = _decode_bytes(model, token, cache, mask, leaves)
  assert stacked - per_layer >= 2 * layer_bytes * 0.95, (stacked, per_layer, layer_bytes)

  step = lambda: model.decode_step(token, cache)[0]  # noqa: E731
  np.testing.assert_allclose(
    step(), Mamba2LM.decode_step.uncompiled(model, token, cache)[0], atol=1e-6
  )
  out_proj = model.layers.mixer.out_proj
  out_proj[...] = out_proj[...] * 3.0  # a new array: the copies are remade
  np.testing.assert_allclose(
    step(), Mamba2LM.decode_step.uncompiled(model, token, cache)[0], atol=1e-6
  )
  monkeypatch.setattr(compiled, "UNSTACK_MAX_BYTES", layer_bytes - 1)
  compiled.forget(model)
  step()
  assert compiled._MODELS[model].unstacked("layers")[0] is None
  np.testing.assert_allclose(
    step(), Mamba2LM.decode_step.uncompiled(model, token, cache)[0], atol=1e-6
  )
