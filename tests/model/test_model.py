"""Mamba2LM: forward == prefill in pieces == token-by-token decode; segments; layers; init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.layers import causal_conv, gated_rms_norm

CFG = Mamba2Config.preset("tiny", chunk_size=8, ngroups=2, vocab_size=100)


@pytest.fixture(scope="module")
def model():
  return Mamba2LM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 29), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def full(model, tokens):
  logits = nnx.jit(lambda m, t: m(t))(model, tokens)
  _, cache = nnx.jit(lambda m, t: m.prefill(t))(model, tokens)
  return np.asarray(logits), cache


def _close(a, b, tol=2e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, np.abs(b).max())
  np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("cuts", [(10,), (1, 2, 3), (8, 16, 24), (13, 14, 28)])
def test_prefill_in_pieces_equals_full(model, tokens, full, cuts):
  logits, cache = full
  prefill = nnx.jit(lambda m, t, c: m.prefill(t, c))
  pieces, c = [], model.init_cache(tokens.shape[0])
  for a, b in zip((0,) + cuts, cuts + (tokens.shape[1],)):
    out, c = prefill(model, tokens[:, a:b], c)
    pieces.append(out)
  _close(np.concatenate(pieces, axis=1), logits)
  for name in ("conv_x", "conv_B", "conv_C", "ssm"):
    _close(getattr(c, name), getattr(cache, name))


def test_decode_token_by_token_equals_full(model, tokens, full):
  logits, cache = full
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  c, outs = model.init_cache(tokens.shape[0]), []
  for t in range(tokens.shape[1]):
    out, c = step(model, tokens[:, t], c)
    outs.append(out)
  assert outs[0].shape == (2, CFG.padded_vocab_size)
  _close(np.stack(outs, axis=1), logits)
  for name in ("conv_x", "conv_B", "conv_C", "ssm"):
    _close(getattr(c, name), getattr(cache, name))


def test_prefill_then_decode(model, tokens, full):
  logits, _ = full
  _, c = model.prefill(tokens[:, :20])
  out, _ = model.decode_step(tokens[:, 20], c)
  _close(out, logits[:, 20])


def test_segment_ids_equal_separate_documents(model):
  toks = jax.random.randint(jax.random.key(5), (1, 30), 0, CFG.vocab_size)
  lens = [1, 7, 8, 2, 12]  # boundaries on and off chunk edges, a one-token document
  seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lens)])[None]
  fwd = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
  packed = fwd(model, toks, jnp.asarray(seg))
  start, parts = 0, []
  for n in lens:
    parts.append(fwd(model, toks[:, start : start + n], None))
    start += n
  _close(packed, np.concatenate(parts, axis=1))
  # The cache after a packed prefill is that of the last document alone.
  _, c_packed = model.prefill(toks, segment_ids=jnp.asarray(seg))
  _, c_last = model.prefill(toks[:, -lens[-1] :])
  _close(c_packed.ssm, c_last.ssm)
  _close(c_packed.conv_x, c_last.conv_x)


def test_reference_and_xla_ssd_agree_in_the_model(model, tokens, full):
  ref = Mamba2LM(CFG.replace(ssd_impl="reference"), rngs=nnx.Rngs(0))
  nnx.update(ref, nnx.state(model))
  _close(ref(tokens), full[0])


def test_causal_conv_matches_naive_loop():
  rng = np.random.default_rng(0)
  b, L, C, K = 2, 11, 5, 4
  u, w, bias = rng.normal(size=(b, L, C)), rng.normal(size=(K, C)), rng.normal(size=C)
  ctx = rng.normal(size=(b, K - 1, C))
  seg = np.array([[0] * 4 + [1] * 1 + [2] * 6, [3] * 11])
  out, new_ctx = causal_conv(
    jnp.asarray(u),
    jnp.asarray(w),
    jnp.asarray(bias),
    context=jnp.asarray(ctx),
    segment_ids=jnp.asarray(seg),
  )
  full = np.concatenate([ctx, u], axis=1)
  seg_full = np.concatenate([np.repeat(seg[:, :1], K - 1, 1), seg], 1)
  want = np.zeros((b, L, C))
  for i in range(b):
    for t in range(L):
      for k in range(K):
        src = t + k  # index into full: u[t - (K-1) + k]
        if seg_full[i, src] == seg[i, t]:
          want[i, t] += full[i, src] * w[k]
      want[i, t] += bias
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Row 0 ends in a 6-token segment: context = its last 3 inputs. Row 1 keeps its last 3.
  np.testing.assert_allclose(new_ctx, full[:, -3:], rtol=1e-6)
  _, short_ctx = causal_conv(
    jnp.asarray(u[:, :5]), jnp.asarray(w), None, segment_ids=jnp.asarray(seg[:, :5])
  )
  assert np.all(np.asarray(short_ctx)[0, :2] == 0)  # tokens of segment 0 are not carried


def test_gated_rms_norm_groups_match_naive():
  rng = np.random.default_rng(1)
  y, z, w = rng.normal(size=(3, 12)), rng.normal(size=(3, 12)), rng.normal(size=12)
  out = gated_rms_norm(jnp.asarray(y), jnp.asarray(z), jnp.asarray(w), 3, 1e-5, jnp.float32)
  g = y * z / (1 + np.exp(-z))
  want = (
    np.concatenate(
      [gi / np.sqrt(np.mean(gi**2, -1, keepdims=True) + 1e-5) for gi in np.split(g, 3, -1)], -1
    )
    * w
  )
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_official_initialization(model):
  m = model.layers.mixer
  A = -np.exp(np.asarray(m.A_log[...]))
  assert np.all((A <= -1) & (A >= -16))
  dt = np.log1p(np.exp(np.asarray(m.dt_bias[...])))
  assert np.all((dt >= CFG.dt_min * 0.999) & (dt <= CFG.dt_max * 1.001))
  assert np.all(np.asarray(m.D[...]) == 1.0)
  assert m.A_log[...].dtype == jnp.float32
  assert m.in_proj_x.shape == (CFG.n_layer, CFG.d_model, CFG.d_inner)


def test_every_parameter_has_logical_axes(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.ndim, (path, axes, var.shape)
    if path[0] == "layers":
      assert axes[0] == "layers"


def test_layers_are_scanned_so_trace_size_is_depth_independent():
  def n_eqns(n_layer):
    m = Mamba2LM(CFG.replace(n_layer=n_layer), rngs=nnx.Rngs(0))
    g, s = nnx.split(m)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(g, s)(t))(s, jnp.zeros((1, 16), jnp.int32))
    return len(jaxpr.eqns)

  assert n_eqns(2) == n_eqns(6)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_gives_the_same_gradients(model, tokens, policy):
  def loss(m):
    return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

  g0 = nnx.jit(nnx.grad(loss))(model)
  rm = Mamba2LM(CFG.replace(remat_policy=policy), rngs=nnx.Rngs(0))
  nnx.update(rm, nnx.state(model))
  g1 = nnx.jit(nnx.grad(loss))(rm)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    _close(a, b, 1e-5)


def test_bf16_compute_is_close_to_fp32(model, tokens, full):
  m16 = Mamba2LM(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(m16, nnx.state(model))
  out = m16(tokens)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  err = np.abs(np.asarray(out) - full[0]).max() / np.abs(full[0]).max()
  assert err < 5e-2


def test_untied_head_and_d_has_hdim():
  cfg = CFG.replace(tie_embeddings=False, D_has_hdim=True, proj_bias=True)
  m = Mamba2LM(cfg, rngs=nnx.Rngs(3))
  assert m.lm_head.shape == (cfg.d_model, cfg.padded_vocab_size)
  toks = jax.random.randint(jax.random.key(2), (1, 9), 0, cfg.vocab_size)
  logits = m(toks)
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  c, outs = m.init_cache(1), []
  for t in range(9):
    o, c = step(m, toks[:, t], c)
    outs.append(o)
  _close(np.stack(outs, 1), logits)


# CFG's scan_unroll is "auto": both layers in one iteration on a CPU; 1 is the rolled scan
@pytest.mark.parametrize("change", [dict(fused_in_proj=False), dict(scan_unroll=1)])
def test_layout_options_do_not_change_the_function(model, tokens, full, change):
  other = Mamba2LM(CFG.replace(**change), rngs=nnx.Rngs(0))
  nnx.update(other, nnx.state(model))
  _close(nnx.jit(lambda m, t: m(t))(other, tokens), full[0])
