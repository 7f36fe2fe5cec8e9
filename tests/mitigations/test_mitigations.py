"""State-collapse mitigations (paper §3): RRI / dt scale, sliding window, state normalization.

Op level against an independent numpy oracle (explicit windowed sums, float64); every impl
honours dt_scale / log_decay_offset (Pallas impls in interpret mode, with gradients); model
level: forward == prefill in pieces == token-by-token decode with each mitigation on,
calibration, `with_mitigations`, config validation, and the deep-stack gap of the window.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import ConfigError, Mamba2Config, Mamba2LM
from mamba2_jax.mitigations import (
  PRESETS,
  calibrate_state_norm,
  measure_state_norms,
  preset_fields,
  state_norm_thresholds,
  with_mitigations,
)
from mamba2_jax.ssd import ssd
from mamba2_jax.state_norm import (
  StateNormThreshold,
  block_normalized_ssd,
  normalize_state,
  token_normalized_ssd,
)

Q = 8
LOG_CA = math.log(0.9)  # stronger than the paper's 0.9999 so the effect is far above rounding
S = 0.7


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def inputs(seed, b=2, L=37, H=4, P=3, G=2, N=5, dtype=np.float64):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s)  # noqa: E731
  v = dict(
    x=f(b, L, H, P),
    dt=f(b, L, H) - 1.0,
    A=-np.exp(rng.uniform(0, 1.5, H)),
    B=f(b, L, G, N),
    C=f(b, L, G, N),
    D=f(H),
    dt_bias=rng.uniform(-1, 1, H),
    h0=f(b, H, P, N),
    seg=np.sort(rng.integers(0, 5, (b, L)), axis=1).astype(np.int32),
  )
  return {k: (a if k == "seg" else np.asarray(a, dtype)) for k, a in v.items()}


def naive(v, *, r=None, dt_scale=1.0, off=0.0, seg=True, h0=True):
  """Explicit sums: y_t = sum_{s in (t-r, t], same run} C_t.B_s prod_{s<j<=t} alpha_j dt_s x_s
  + [t - r < -1] alpha_{0:t} C_t.h0 + D x_t, alpha_j = c_a exp(dt_j A)."""
  x, B, C = v["x"], v["B"], v["C"]
  b, L, H, P = x.shape
  R = H // B.shape[2]
  dt = np.logaddexp(v["dt"] + v["dt_bias"], 0.0) * dt_scale
  cum = np.cumsum(dt * v["A"] + off, axis=1)  # (b,L,H)
  sg = v["seg"] if seg else np.zeros((b, L), np.int32)
  runs = np.concatenate([np.zeros((b, 1), int), np.cumsum(sg[:, 1:] != sg[:, :-1], 1)], 1)
  t, s = np.arange(L)[:, None], np.arange(L)[None, :]
  y = np.zeros_like(x)
  for i in range(b):
    mask = (s <= t) & (runs[i][:, None] == runs[i][None, :])
    if r is not None:
      mask &= s > t - r
    dec = np.exp(np.minimum(cum[i][:, None] - cum[i][None, :], 0.0)) * mask[..., None]  # (t,s,H)
    CB = np.repeat(np.einsum("tgn,sgn->tsg", C[i], B[i]), R, axis=-1)
    y[i] = np.einsum("tsh,sh,shp->thp", dec * CB, dt[i], x[i])
    if h0:
      keep = (runs[i] == 0) & ((np.arange(L) - r < -1) if r is not None else True)
      Ch = np.repeat(C[i], R, axis=1)
      h0_out = np.einsum("hpn,thn->thp", v["h0"][i], Ch)
      y[i] += (keep[:, None] * np.exp(cum[i]))[..., None] * h0_out
  return y + v["D"][None, None, :, None] * x


@functools.lru_cache(maxsize=None)
def _op(impl, r, with_grad, chunk=Q):
  def f(args, seg, wy, wh):
    x, dt, A, B, C, D, dt_bias, h0, off = args
    y, h = ssd(
      x,
      dt,
      A,
      B,
      C,
      D=D,
      dt_bias=dt_bias,
      initial_state=h0,
      segment_ids=seg,
      chunk_size=chunk,
      window=r,
      dt_scale=S,
      log_decay_offset=off,
      impl=impl,
      return_final_state=True,
    )
    return jnp.sum(y * wy) + jnp.sum(h * wh), (y, h)

  return jax.jit(jax.value_and_grad(f, has_aux=True) if with_grad else f)


def _args(v, off=LOG_CA):
  return tuple(jnp.asarray(v[k]) for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")) + (
    jnp.asarray(off, v["x"].dtype),
  )


def _weights(v):
  rng = np.random.default_rng(99)
  return (
    jnp.asarray(rng.standard_normal(v["x"].shape), v["x"].dtype),
    jnp.asarray(rng.standard_normal(v["h0"].shape), v["x"].dtype),
  )


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------------------ op level


@pytest.mark.parametrize(
  "r,G", [(1, 1), (3, 2), (8, 1), (8, 2), (16, 2), (21, 1), (21, 2), (37, 2)]
)
def test_window_equals_direct_windowed_sum(x64, r, G):
  v = inputs(r + G, G=G)  # L = 37: not a multiple of the chunk 8; segments and h0
  want = naive(v, r=r, dt_scale=S, off=LOG_CA)
  seg = jnp.asarray(v["seg"])
  for impl in ("reference", "xla"):
    y, _ = _op(impl, r, False)(_args(v), seg, *_weights(v))[1]
    assert rel(y, want) < 1e-12, impl


@pytest.mark.parametrize("r", [38, 100])
def test_window_covering_everything_is_the_plain_op(x64, r):
  v = inputs(5)
  seg = jnp.asarray(v["seg"])
  plain = _op("xla", None, False)(_args(v), seg, *_weights(v))[1]
  for impl in ("reference", "xla"):
    y, h = _op(impl, r, False)(_args(v), seg, *_weights(v))[1]
    assert rel(y, plain[0]) < 1e-13 and rel(h, plain[1]) < 1e-13


def test_window_final_state_is_the_ordinary_state(x64):
  v = inputs(6)
  seg = jnp.asarray(v["seg"])
  _, h_plain = _op("xla", None, False)(_args(v), seg, *_weights(v))[1]
  _, h = _op("xla", 5, False)(_args(v), seg, *_weights(v))[1]
  assert rel(h, h_plain) < 1e-13


@pytest.mark.parametrize("r", [3, 8, 21])
def test_window_gradients_xla_equal_reference(x64, r):
  v = inputs(10 + r)
  seg, (wy, wh) = jnp.asarray(v["seg"]), _weights(v)
  (_, (y0, h0)), g0 = _op("reference", r, True)(_args(v), seg, wy, wh)
  (_, (y1, h1)), g1 = _op("xla", r, True)(_args(v), seg, wy, wh)
  assert rel(y1, y0) < 1e-12 and rel(h1, h0) < 1e-12
  names = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0", "log_decay_offset")
  for name, a, b in zip(names, g1, g0):
    assert rel(a, b) < 1e-11, name


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_rri_and_dt_scale_equal_explicit_recurrence(x64, impl):
  v = inputs(3)
  y, _ = _op(impl, None, False)(_args(v), jnp.asarray(v["seg"]), *_weights(v))[1]
  assert rel(y, naive(v, dt_scale=S, off=LOG_CA)) < 1e-12


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_impls_honour_rri_and_dt_scale(impl):
  """Interpret mode, fp32, with gradients (incl. d/d log_decay_offset) vs the f64 oracle."""
  v = inputs(7, b=1, L=37, H=4, G=2, N=16, P=16 if impl == "pallas_gpu" else 8, dtype=np.float32)
  seg, (wy, wh) = jnp.asarray(v["seg"]), _weights(v)
  (_, (y, h)), g = _op(impl, None, True, 16)(_args(v), seg, wy, wh)
  with jax.enable_x64(True):
    v64 = {k: (a if k == "seg" else a.astype(np.float64)) for k, a in v.items()}
    (_, (y0, h0)), g0 = _op("reference", None, True, 16)(
      _args(v64), seg, jnp.asarray(wy, jnp.float64), jnp.asarray(wh, jnp.float64)
    )
    assert rel(y0, naive(v64, dt_scale=S, off=LOG_CA)) < 1e-12
  assert rel(y, y0) < 5e-5 and rel(h, h0) < 5e-5
  names = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0", "log_decay_offset")
  for name, a, b in zip(names, g, g0):
    assert rel(a, b) < 2e-4, name


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_window_raises(impl):
  v = inputs(0, dtype=np.float32)
  with pytest.raises(ValueError, match=r"window.*'reference', 'xla'"):
    ssd(v["x"], v["dt"], v["A"], v["B"], v["C"], window=4, impl=impl)


def test_op_argument_errors():
  v = inputs(0, dtype=np.float32)
  args = (v["x"], v["dt"], v["A"], v["B"], v["C"])
  for kw, msg in [
    (dict(dt_scale=0.0), "dt_scale"),
    (dict(log_decay_offset=0.1), "log_decay_offset"),
    (dict(window=0), "window"),
    (dict(window=True), "window"),
  ]:
    with pytest.raises(ValueError, match=msg):
      ssd(*args, impl="xla", **kw)


# ---------------------------------------------------------------- state normalization (op)


def _plain(v, **kw):
  return ssd(
    v["x"],
    v["dt"],
    v["A"],
    v["B"],
    v["C"],
    D=v["D"],
    dt_bias=v["dt_bias"],
    initial_state=v["h0"],
    segment_ids=v["seg"],
    return_final_state=True,
    impl="xla",
    chunk_size=Q,
    **kw,
  )


def _block(v, tau, block, *, position=0, sl=slice(None), h0=None, off=LOG_CA):
  dtp = jnp.logaddexp(v["dt"][:, sl] + v["dt_bias"], 0.0) * S
  op = functools.partial(
    ssd,
    dt_softplus=False,
    dt_limit=(-math.inf, math.inf),
    chunk_size=min(Q, block),
    return_final_state=True,
    impl="xla",
  )
  return block_normalized_ssd(
    op,
    v["x"][:, sl],
    dtp,
    v["A"],
    v["B"][:, sl],
    v["C"][:, sl],
    tau=tau,
    block=block,
    position=position,
    D=v["D"],
    log_decay_offset=off,
    segment_ids=v["seg"][:, sl],
    initial_state=v["h0"] if h0 is None else h0,
  )


def _token(v, tau):
  return token_normalized_ssd(
    v["x"],
    v["dt"],
    v["A"],
    v["B"],
    v["C"],
    tau=tau,
    D=v["D"],
    dt_bias=v["dt_bias"],
    dt_scale=S,
    log_decay_offset=LOG_CA,
    initial_state=v["h0"],
    segment_ids=v["seg"],
  )


def test_state_norm_with_infinite_threshold_is_the_plain_op(x64):
  v = inputs(11)
  y0, h0 = _plain(v, dt_scale=S, log_decay_offset=LOG_CA)
  for y, h in (_token(v, jnp.inf), _block(v, jnp.inf, 8), _block(v, jnp.inf, 5)):
    assert rel(y, y0) < 1e-12 and rel(h, h0) < 1e-12


def test_state_norm_bounds_the_state_and_token_is_block_of_one(x64):
  v = inputs(12)
  tau = jnp.asarray([0.5, 1.0, 2.0, 1e9])
  y_t, h_t = _token(v, tau)
  y_b, h_b = _block(v, tau, 1)
  assert rel(y_b, y_t) < 1e-12 and rel(h_b, h_t) < 1e-12
  _, h_plain = _plain(v, dt_scale=S, log_decay_offset=LOG_CA)
  # blocks of 4 over 36 tokens / one block of 37: the sequence ends on a block end (an open
  # last block leaves the state un-normalized until it completes)
  for h in (h_t, _block(v, tau, 4, sl=slice(0, 36))[1], _block(v, tau, 37)[1]):
    norm = np.linalg.norm(np.asarray(h), axis=(-2, -1))
    assert np.all(norm <= np.asarray(tau) * (1 + 1e-12))
    assert np.any(np.abs(np.asarray(h) - np.asarray(h_plain)) > 1e-3)  # it did act


@pytest.mark.parametrize("cut", [3, 8, 13])
def test_block_norm_continues_across_pieces(x64, cut):
  v = inputs(13)
  tau = jnp.asarray([0.5, 1.0, 2.0, 0.3])
  y, h = _block(v, tau, 4)
  y1, h1 = _block(v, tau, 4, sl=slice(0, cut))
  traced = jax.jit(lambda p, h_: _block(v, tau, 4, position=p, sl=slice(cut, None), h0=h_))
  y2, h2 = traced(jnp.int32(cut), h1)
  assert rel(jnp.concatenate([y1, y2], axis=1), y) < 1e-12 and rel(h2, h) < 1e-12


def test_normalize_state_formula():
  h = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 5)), jnp.float32)
  tau = jnp.asarray([0.1, 1e9, 2.0])
  out = normalize_state(h, tau)
  norm = np.linalg.norm(np.asarray(h), axis=(-2, -1))
  want = np.asarray(h) * np.minimum(1.0, np.asarray(tau) / norm)[..., None, None]
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert np.all(np.asarray(normalize_state(jnp.zeros((1, 3, 4, 5)), tau)) == 0)
  g = jax.grad(lambda a: jnp.sum(normalize_state(a, tau)))(jnp.zeros((1, 3, 4, 5)))
  assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------------ model level

CFG = Mamba2Config.preset("tiny", chunk_size=Q, ngroups=2, vocab_size=100)
CUTS = (7, 14, 21)  # 4 pieces of 7 tokens (one compile); window 3 < 7 < window 12


@pytest.fixture(scope="module")
def model():
  return Mamba2LM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 28), 0, CFG.vocab_size)


_fwd = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
_pre = nnx.jit(lambda m, t, c, s: m.prefill(t, c, segment_ids=s))
_step = nnx.jit(lambda m, t, c: m.decode_step(t, c))


def _pieces(m, toks, cuts, seg=None):
  c, outs = m.init_cache(toks.shape[0]), []
  for a, b in zip((0,) + cuts, cuts + (toks.shape[1],)):
    out, c = _pre(m, toks[:, a:b], c, None if seg is None else seg[:, a:b])
    outs.append(out)
  return np.concatenate(outs, axis=1), c


def _decode(m, toks, c=None):
  c = m.init_cache(toks.shape[0]) if c is None else c
  outs = []
  for t in range(toks.shape[1]):
    out, c = _step(m, toks[:, t], c)
    outs.append(out)
  return np.stack(outs, axis=1), c


def close(a, b, tol=3e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0)


MODEL_CASES = {
  "rri": dict(rri_decay_scale=0.9, rri_insert_scale=0.75),
  "dt_scale": dict(dt_scale=0.5),
  "window3": dict(ssd_window=3),
  "window8": dict(ssd_window=8),
  "window12_rri_dt": dict(ssd_window=12, rri_decay_scale=0.95, dt_scale=0.7),
  "norm_token": dict(state_norm="token", state_norm_threshold=0.05),
  "norm_chunk4": dict(
    state_norm="chunk", state_norm_chunk=4, state_norm_threshold=0.05, rri_decay_scale=0.95
  ),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_forward_equals_pieces_equals_decode(model, tokens, case):
  m = with_mitigations(model, **MODEL_CASES[case])
  full = np.asarray(_fwd(m, tokens, None))
  assert np.abs(full - np.asarray(_fwd(model, tokens, None))).max() > 1e-3  # it acts
  pieces, c1 = _pieces(m, tokens, CUTS)
  close(pieces, full)
  steps, c2 = _decode(m, tokens)
  close(steps, full)
  for name in ("ssm", "pos", "win_h", "win_dt", "win_sum"):
    if getattr(c1, name) is not None:
      close(getattr(c1, name), getattr(c2, name))


@pytest.mark.parametrize("case", ["window5", "norm_chunk4"])
def test_segments_with_pieces_and_decode(model, case):
  kw = (
    dict(ssd_window=5)
    if case == "window5"
    else dict(state_norm="chunk", state_norm_chunk=4, state_norm_threshold=0.05)
  )
  m = with_mitigations(model, **kw)
  toks = jax.random.randint(jax.random.key(5), (1, 33), 0, CFG.vocab_size)
  lens = [4, 4, 9, 4, 9]  # boundaries on and off chunk edges; decode continues the last one
  seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lens)])
  seg = jnp.asarray(np.concatenate([seg, np.full(3, len(lens) - 1, np.int32)])[None])
  full = np.asarray(_fwd(m, toks, seg))
  pieces, c = _pieces(m, toks[:, :30], (10, 20), seg[:, :30])
  close(pieces, full[:, :30])
  steps, _ = _decode(m, toks[:, 30:], c)
  close(steps, full[:, 30:])
  if case == "window5":  # the window (and conv) reset at segment starts: == separate documents
    start = 0
    for n in lens:
      close(full[:, start : start + n], _fwd(m, toks[:, start : start + n], None))
      start += n


def test_insert_scale_equals_plain_model_with_rescaled_D(x64):
  cfg = CFG.replace(dtype="float64", param_dtype="float64", norm_eps=1e-14)
  base = Mamba2LM(cfg, rngs=nnx.Rngs(3))
  toks = jax.random.randint(jax.random.key(2), (2, 21), 0, cfg.vocab_size)
  cb = 0.75
  scaled = with_mitigations(base, rri_insert_scale=cb)
  plain = with_mitigations(base)
  plain.layers.mixer.D.set_value(base.layers.mixer.D[...] / cb)
  want = np.asarray(_fwd(plain, toks, None))
  # f64 inside; the LM head returns float32 logits, hence the fp32-level tolerance
  assert rel(_fwd(scaled, toks, None), want) < 2e-6
  assert rel(_fwd(base, toks, None), want) > 1e-3


@pytest.mark.slow
def test_model_window_gradient_xla_equals_reference(model, tokens):
  def grads(impl, **kw):
    m = with_mitigations(model, ssd_impl=impl, **kw)
    loss = lambda m_: jnp.mean(m_(tokens[:1, :16]) ** 2)  # noqa: E731
    return jax.tree.leaves(nnx.grad(loss)(m))

  for kw in (
    dict(ssd_window=5),
    dict(state_norm="chunk", state_norm_chunk=4, state_norm_threshold=0.05),
  ):
    for a, b in zip(grads("xla", **kw), grads("reference", **kw)):
      assert np.all(np.isfinite(a)) and rel(a, b) < 1e-4


def test_state_norm_never_exceeds_threshold_in_decode(model, tokens):
  for gran in ("token", "chunk"):
    m = with_mitigations(model, state_norm=gran, state_norm_chunk=4, state_norm_threshold=0.05)
    c = m.init_cache(2)
    for t in range(tokens.shape[1]):
      _, c = _step(m, tokens[:, t], c)
      if gran == "token" or (t + 1) % 4 == 0:
        assert float(jnp.max(jnp.linalg.norm(c.ssm, axis=(-2, -1)))) <= 0.05 * (1 + 1e-5)


def test_calibrate_state_norm_sets_measured_values(model, tokens):
  _, c = _decode(model, tokens[:, :1])
  norms = []
  for t in range(1, tokens.shape[1]):
    norms.append(np.linalg.norm(np.asarray(c.ssm), axis=(-2, -1)).max(axis=1))  # (n_layer, H)
    _, c = _step(model, tokens[:, t], c)
  norms.append(np.linalg.norm(np.asarray(c.ssm), axis=(-2, -1)).max(axis=1))
  want_max, want_final = np.max(norms, axis=0), norms[-1]
  close(measure_state_norms(model, tokens, stride=1), want_max, 1e-5)
  close(measure_state_norms(model, tokens, reduce="final"), want_final, 1e-5)
  m = with_mitigations(model, state_norm="chunk")
  assert calibrate_state_norm(m, tokens, multiplier=2.0, stride=1) is m
  close(state_norm_thresholds(m), 2.0 * want_max, 1e-5)
  calibrate_state_norm(m, tokens, reduce="final", per_head=False)
  close(state_norm_thresholds(m), np.full_like(want_final, want_final.max()), 1e-5)
  with pytest.raises(ValueError, match="state normalization is off"):
    calibrate_state_norm(model, tokens)


def test_with_mitigations_shares_parameters_and_keeps_default_state(model):
  assert not any(isinstance(v, StateNormThreshold) for _, v in nnx.to_flat_state(nnx.state(model)))
  assert model.init_cache(1).pos is None and model.init_cache(1).win_h is None
  m = with_mitigations(model, rri_decay_scale=0.9999, rri_insert_scale=0.75)
  assert m.config.rri_decay_scale == 0.9999 and model.config.rri_decay_scale == 1.0
  assert m.layers.mixer.in_proj_x.get_value() is model.layers.mixer.in_proj_x.get_value()
  n = with_mitigations(model, state_norm="chunk", state_norm_threshold=3.0)
  assert np.all(np.asarray(state_norm_thresholds(n)) == 3.0)
  assert state_norm_thresholds(n).shape == (CFG.n_layer, CFG.nheads)
  params = nnx.to_flat_state(nnx.state(n, nnx.Param))
  assert not any(isinstance(v, StateNormThreshold) for _, v in params)
  n.layers.mixer.state_norm_tau.set_value(jnp.full((CFG.n_layer, CFG.nheads), 7.0))
  kept = with_mitigations(n, rri_decay_scale=0.99)  # thresholds survive other changes
  assert np.all(np.asarray(state_norm_thresholds(kept)) == 7.0)
  refilled = with_mitigations(n, state_norm_threshold=2.0)
  assert np.all(np.asarray(state_norm_thresholds(refilled)) == 2.0)
  off = with_mitigations(n, preset="off")
  assert off.config == model.config and not hasattr(off.layers.mixer, "state_norm_tau")
  assert with_mitigations(model, preset="rri").config.rri_insert_scale == 0.75
  with pytest.raises(ConfigError, match="unknown field"):
    with_mitigations(model, no_such_field=1)
  with pytest.raises(ValueError, match="shape"):
    with_mitigations(model, d_state=8)
  for name in PRESETS:
    CFG.replace(**preset_fields(name))


@pytest.mark.parametrize(
  "field,value",
  [
    ("rri_decay_scale", 0.0),
    ("rri_decay_scale", 1.01),
    ("rri_insert_scale", -1.0),
    ("dt_scale", 0.0),
    ("dt_scale", math.inf),
    ("ssd_window", -1),
    ("ssd_window", 1.5),
    ("state_norm", "layer"),
    ("state_norm_chunk", 0),
    ("state_norm_threshold", 0.0),
  ],
)
def test_config_validation_names_the_field(field, value):
  with pytest.raises(ConfigError, match=rf"Mamba2Config\.{field}:"):
    CFG.replace(**{field: value})


def test_config_rejects_unsupported_combinations():
  with pytest.raises(ConfigError, match=r"ssd_window.*ssd_impl"):
    CFG.replace(ssd_window=4, ssd_impl="pallas_tpu")
  with pytest.raises(ConfigError, match=r"ssd_window.*state_norm"):
    CFG.replace(ssd_window=4, state_norm="chunk")
  c = CFG.replace(state_norm="chunk")
  assert Mamba2Config.from_json(c.to_json()) == c  # inf threshold survives JSON


# --------------------------------------------------------------- deep-stack window behaviour


@pytest.mark.slow
def test_window_is_exact_per_layer_but_not_for_the_stack():
  """A layer's output depends on its inputs at t-r+1..t, which (conv: K-1 taps) depend on
  r + K - 1 tokens; n layers see n (r + K - 2) + 1 tokens, not r."""
  r, L, K = 6, 48, CFG.d_conv
  toks = jax.random.randint(jax.random.key(7), (1, L), 0, CFG.vocab_size)
  gaps = {}
  for n in (1, 3):
    m = Mamba2LM(CFG.replace(n_layer=n, ssd_window=r), rngs=nnx.Rngs(n))
    last = np.asarray(_fwd(m, toks, None))[:, -1]
    span = n * (r + K - 2) + 1  # the stack's true receptive field
    close(np.asarray(_fwd(m, toks[:, L - span :], None))[:, -1], last, 1e-5)
    gaps[n] = rel(np.asarray(_fwd(m, toks[:, L - r :], None))[:, -1], last)  # "last r tokens"
  assert gaps[1] > 1e-4 and gaps[3] > 1e-4, gaps  # not an r-token model (see the report)
