"""The fused LM-head cross-entropy (mamba2_jax/loss.py) against log_softmax + take_along_axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.loss import lm_head_nll, loss_passes, model_nll


def _reference(h, w, targets, vocab_major, weights):
  spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
  logits = jnp.einsum(spec, h, w.astype(h.dtype), preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights)


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("passes", [1, 4])
def test_matches_log_softmax(vocab_major, dtype, tol, passes):
  k = jax.random.split(jax.random.key(0), 4)
  b, L, d, V = 2, 36, 24, 80
  h = jax.random.normal(k[0], (b, L, d)).astype(dtype)
  w = jax.random.normal(k[1], (V, d) if vocab_major else (d, V)) * 0.5
  targets = jax.random.randint(k[2], (b, L), 0, V)
  weights = (jax.random.uniform(k[3], (b, L)) > 0.3).astype(jnp.float32)  # a loss mask

  def fused(h, w):
    return jnp.sum(lm_head_nll(h, w, targets, vocab_major=vocab_major, passes=passes) * weights)

  want, (gh_want, gw_want) = jax.value_and_grad(
    lambda h, w: _reference(h, w, targets, vocab_major, weights), argnums=(0, 1)
  )(h, w)
  got, (gh, gw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
  assert got.dtype == jnp.float32 and gh.dtype == h.dtype and gw.dtype == w.dtype
  rel = lambda a, b: float(
    jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
    / jnp.max(jnp.abs(b.astype(jnp.float32)))
  )  # noqa: E731
  assert abs(float(got - want)) <= tol * abs(float(want))
  assert rel(gh, gh_want) <= tol
  assert rel(gw, gw_want) <= tol


def test_passes_divide_the_logits_memory():
  """Strided passes save only the log-sum-exp: the compiled gradient's temporaries shrink with
  the pass count (64 MiB of float32 logits at 1 pass), and the value is unchanged."""
  T, d, V = 4096, 32, 4096
  k = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k[0], (1, T, d))
  w = jax.random.normal(k[1], (V, d)) * 0.1
  targets = jax.random.randint(k[2], (1, T), 0, V)
  temps, values = {}, {}
  for passes in (1, 8):
    f = jax.jit(jax.value_and_grad(lambda h, w: jnp.sum(lm_head_nll(h, w, targets, passes=passes))))
    temps[passes] = f.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    values[passes] = float(f(h, w)[0])
  assert temps[8] < temps[1] / 3, temps
  assert abs(values[8] - values[1]) <= 1e-5 * abs(values[1])


def test_loss_passes_choice_and_errors():
  assert loss_passes((4, 2048), 1024) == 1  # 32 MiB of logits: one pass
  assert loss_passes((1, 262144), 50288) == 32  # 53 GB -> 1.6 GB per pass
  assert loss_passes((1, 12), 10**9) == 4  # L = 12 allows no more than 4
  h, w, t = jnp.zeros((1, 10, 4)), jnp.zeros((8, 4)), jnp.zeros((1, 10), jnp.int32)
  with pytest.raises(ValueError, match="passes=4 must be an int >= 1 dividing L"):
    lm_head_nll(h, w, t, passes=4)


@pytest.mark.parametrize("tie", [True, False])
def test_model_features_give_the_logits(tie):
  cfg = Mamba2Config.preset("tiny", n_layer=2, tie_embeddings=tie)
  model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 50), 0, cfg.vocab_size)
  logits = model(tokens)
  h, cache = model.features(tokens)
  assert cache is None
  w, vocab_major = model.head_weight()
  assert vocab_major == tie
  targets = jnp.roll(tokens, -1, axis=1)
  want = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(
    lm_head_nll(h, w, targets, vocab_major=vocab_major), want, rtol=1e-5, atol=1e-5
  )
  nll, no_cache = model_nll(model, tokens, targets)  # the trainer's loss
  assert no_cache is None
  np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)
  # with a cache: the same hidden states as prefill's logits, and the same cache
  logits_p, cache_p = model.prefill(tokens[:, :30])
  h2, cache2 = model.features(tokens[:, 30:], cache=cache_p)
  logits_full, cache_full = model.prefill(tokens)
  spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
  np.testing.assert_allclose(jnp.einsum(spec, h2, w), logits_full[:, 30:], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cache2.ssm, cache_full.ssm, rtol=1e-4, atol=1e-5)
  nll2, cache3 = model_nll(model, tokens[:, 30:], targets[:, 30:], cache=cache_p)
  np.testing.assert_allclose(nll2, want[:, 30:], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cache3.ssm, cache_full.ssm, rtol=1e-4, atol=1e-5)


def test_model_loss_is_the_mean_nll_compiled_and_differentiable():
  """`Mamba2LM.loss`: the mean (or masked mean) of -log_softmax(model(x))[y], called directly
  (compiled) or inside a transformation; gradients through it; the model is left unchanged."""
  model = Mamba2LM(Mamba2Config.preset("tiny", vocab_size=50), rngs=nnx.Rngs(0))
  k = jax.random.split(jax.random.key(3), 3)
  x, y = jax.random.randint(k[0], (2, 2, 16), 0, 50)
  mask = jax.random.uniform(k[2], (2, 16)) > 0.4

  def nll(logits):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]

  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  loss = model.loss(x, y)
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, jnp.mean(nll(model(x))), rtol=1e-5)
  want = jnp.sum(nll(model(x)) * mask) / jnp.sum(mask)
  np.testing.assert_allclose(model.loss(x, y, mask=mask), want, rtol=1e-5)
  assert float(model.loss(x, y, mask=jnp.zeros_like(mask))) == 0.0  # no token: 0, not NaN

  value, grads = nnx.jit(nnx.value_and_grad(lambda m: m.loss(x, y)))(model)
  np.testing.assert_allclose(value, loss, rtol=1e-5)
  assert float(jnp.max(jnp.abs(grads.embedding[...]))) > 0
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  jax.tree.map(np.testing.assert_array_equal, before, after)
