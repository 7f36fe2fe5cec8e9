"""Grouped remat (`Mamba2Config.remat_group`): the layer scan checkpointed per group of layers
keeps fewer layer inputs for the backward (n_layer / g + g instead of n_layer; measured with
libtpu's memory analysis in docs/training.md, "Long sequences") and gives the same loss and
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.config import ConfigError

_SHAPE = dict(
  d_model=32, n_layer=4, d_state=16, headdim=16, vocab_size=64, chunk_size=8, scan_unroll=1
)


def _loss_grads(model, tokens, targets, segment_ids):
  def f(m):
    return m.loss(tokens, targets, segment_ids=segment_ids)

  loss, g = jax.jit(nnx.value_and_grad(f))(model)
  return float(loss), jax.tree.leaves(nnx.to_pure_dict(g))


def test_grouped_remat_equals_ungrouped():
  """Same parameters, packed documents, remat "full": groups of 2 layers against per-layer remat
  only. Recomputation repeats the same fp32 arithmetic, so the tolerance is
  float32 rounding of a few-hundred-term sum (1e-6 relative to each gradient's largest entry)."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 40)), jnp.int32)
  targets = jnp.asarray(rng.integers(0, 64, (2, 40)), jnp.int32)
  seg = jnp.asarray(np.repeat([[1] * 13 + [2] * 20 + [3] * 7], 2, axis=0), jnp.int32)
  policy, group = "full", 2
  ref_model = Mamba2LM(Mamba2Config(**_SHAPE, remat_policy=policy), rngs=nnx.Rngs(0))
  state = nnx.state(ref_model)
  results = []
  for cfg in (
    Mamba2Config(**_SHAPE, remat_policy=policy),
    Mamba2Config(**_SHAPE, remat_policy=policy, remat_group=group),
  ):
    model = Mamba2LM(cfg, rngs=nnx.Rngs(1))
    nnx.update(model, state)
    results.append(_loss_grads(model, tokens, targets, seg))
  (l1, g1), (l2, g2) = results
  assert np.isfinite(l1) and abs(l2 - l1) <= 1e-6 * abs(l1)
  assert len(g1) == len(g2) > 10
  for b, c in zip(g1, g2):
    assert float(np.max(np.abs(c - b))) <= 1e-6 * float(np.max(np.abs(b)))


@pytest.mark.parametrize(
  "kw,match",
  [
    (
      dict(remat_policy="full", remat_group=3),
      r"remat_group: must be a positive divisor of n_layer=4",
    ),
    (dict(remat_policy="full", remat_group=0), r"remat_group: must be a positive divisor"),
    (dict(remat_group=2), r"remat_group: 2 needs a remat_policy other than 'none'"),
  ],
)
def test_remat_group_errors(kw, match):
  with pytest.raises(ConfigError, match=match):
    Mamba2Config(**_SHAPE, **kw)
