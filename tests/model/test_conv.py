"""The fused causal conv + SiLU (mamba2_jax/conv.py) against the plain composition.

Tolerances are grounded on a float64 oracle (the plain composition, `causal_conv` then
`jax.nn.silu`, in float64): in each dtype the fused op's error must stay within 2x the plain
composition's own error in that dtype, plus a floor of a few units of the dtype's rounding (8 eps
of the largest value, for results whose plain error happens to be ~0). A wrong tap, mask or
derivative is off by O(1) (checked: dropping the pre (1 - s) term of silu' fails all four).
About 35 s on the 2-core CPU shared (load 4), 27 s of it the model test (two compiles).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mamba2_jax.context_conv as context_conv
from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.conv import conv_silu
from mamba2_jax.layers import causal_conv
from mamba2_jax.loss import model_nll

B, L, C, K = 2, 13, 6, 4


def plain(u, w, bias, *, context=None, segment_ids=None, context_segment_ids=None):
  out, new = causal_conv(
    u,
    w,
    bias,
    context=context,
    segment_ids=segment_ids,
    context_segment_ids=context_segment_ids,
  )
  return jax.nn.silu(out), new


def _inputs(with_segments):
  rng = np.random.default_rng(0)
  u, w = rng.normal(size=(B, L, C)), rng.normal(size=(K, C))
  bias, ctx = rng.normal(size=C), rng.normal(size=(B, K - 1, C))
  dy, dnew = rng.normal(size=(B, L, C)), rng.normal(size=(B, K - 1, C))
  seg = ctx_seg = None
  if with_segments:  # boundaries right after the start (taps into the context cross them) and
    # inside; the second row's context rows belong to an earlier document (a halo)
    seg = np.array([[0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3], [5] * 6 + [6] * 7])
    ctx_seg = np.array([[0, 0, 0], [4, 5, 5]])
  return (u, w, bias, ctx), (dy, dnew), seg, ctx_seg


def _vjp(fn, args, cts, seg, ctx_seg, dtype):
  """Outputs and cotangents of (u, w, bias, context), all as float64 numpy."""
  args = [jnp.asarray(a, dtype) for a in args]
  ids = {}
  if seg is not None:
    ids = dict(segment_ids=jnp.asarray(seg), context_segment_ids=jnp.asarray(ctx_seg))

  def f(u, w, bias, ctx):
    return fn(u, w, bias, context=ctx, **ids)

  outs, vjp = jax.vjp(f, *args)
  grads = vjp(tuple(jnp.asarray(c, o.dtype) for c, o in zip(cts, outs)))
  return [np.asarray(jnp.asarray(t, jnp.float64)) for t in (*outs, *grads)]


NAMES = ("y", "new_context", "du", "dw", "dbias", "dcontext")


@pytest.mark.parametrize("with_segments", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_silu_matches_plain_composition(with_segments, dtype):
  args, cts, seg, ctx_seg = _inputs(with_segments)
  with jax.enable_x64(True):
    oracle = _vjp(plain, args, cts, seg, ctx_seg, jnp.float64)
    plain_d = _vjp(plain, args, cts, seg, ctx_seg, dtype)
    fused = _vjp(conv_silu, args, cts, seg, ctx_seg, dtype)
  eps = float(jnp.finfo(dtype).eps)
  for name, o, p, f in zip(NAMES, oracle, plain_d, fused):
    err_plain = np.abs(p - o).max()
    err_fused = np.abs(f - o).max()
    tol = 2 * err_plain + 8 * eps * max(1.0, np.abs(o).max())
    assert err_fused <= tol, (name, dtype, err_fused, err_plain)
  # the masks act: a different context segment changes the gradient of the context
  if with_segments:
    assert np.abs(oracle[5][0]).max() > 0 and np.abs(oracle[5][1, 0]).max() == 0


def test_conv_silu_rejects_bad_shapes():
  u = jnp.zeros((1, 5, 3))
  with pytest.raises(ValueError, match="w must have shape"):
    conv_silu(u, jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match="context must have shape"):
    conv_silu(u, jnp.zeros((4, 3)), context=jnp.zeros((1, 2, 3)))


def test_model_gradients_unchanged(monkeypatch):
  """The model's gradients (w.r.t. the parameters and the cache it continues from, of the loss
  plus the new cache) with the fused op equal those of the plain composition within float32
  rounding, with packed segments: the two differ only in the order of the conv's float32 sums,
  a few ulps per value, so 1e-5 of each gradient's largest entry (about 80 ulps) bounds them; a
  wrong conv gradient is off by O(1) of it."""
  cfg = Mamba2Config.preset("tiny", n_layer=1, chunk_size=8, vocab_size=64)
  model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 26), 0, cfg.vocab_size)
  seg = jnp.asarray(np.repeat([[0, 1, 2], [3, 3, 4]], [8, 6, 6], axis=1))
  _, cache = model.prefill(tokens[:, :5])
  graphdef, state = nnx.split(model)

  def loss(state, cache):
    nll, new = model_nll(
      nnx.merge(graphdef, state), tokens[:, 5:-1], tokens[:, 6:], segment_ids=seg, cache=cache
    )
    return jnp.mean(nll) + sum(jnp.mean(t) for t in jax.tree.leaves(new))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  fused_tree = grads(state, cache)
  fused = jax.tree.leaves(fused_tree)
  monkeypatch.setattr(context_conv, "conv_silu", plain)
  reference = jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(state, cache))
  assert len(fused) == len(reference) > 0
  for f, r in zip(fused, reference):
    f, r = np.asarray(f), np.asarray(r)
    np.testing.assert_allclose(f, r, rtol=0, atol=1e-5 * np.abs(r).max())
  # the conv contexts of the cache receive a gradient (the continuation reads them)
  assert np.abs(np.asarray(fused_tree[1].conv_x)).max() > 0
