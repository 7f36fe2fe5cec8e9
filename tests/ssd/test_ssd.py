"""Tests for mamba2_jax.ssd: the chunked XLA path against the per-token oracle.

float64 is enabled per test through the ``x64`` fixture (``jax.enable_x64``
context), so it never leaks into other test modules. Jitted functions are cached
by their static options so each configuration compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.ssd import prepare_dt, ssd
from mamba2_jax.ssd import api as ssd_api

Q = 8  # small chunk so that every chunk-edge case is cheap
H, P, N = 4, 3, 5


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# --------------------------------------------------------------------- helpers


def make_inputs(
  seed, b, L, G, *, dtype=np.float64, h=H, p=P, n=N, a_range=(0.0, 1.5), dt_shift=-1.0
):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, L, h, p))
  dt = rng.standard_normal((b, L, h)) + dt_shift
  A = -np.exp(rng.uniform(*a_range, size=(h,)))
  B = rng.standard_normal((b, L, G, n))
  C = rng.standard_normal((b, L, G, n))
  h0 = rng.standard_normal((b, h, p, n))
  D1 = rng.standard_normal((h,))
  D2 = rng.standard_normal((h, p))
  dt_bias = rng.uniform(-1.0, 1.0, size=(h,))
  cast = lambda a: jnp.asarray(a, dtype)
  return dict(
    x=cast(x),
    dt=cast(dt),
    A=jnp.asarray(A, np.float64 if dtype == np.float64 else np.float32),
    B=cast(B),
    C=cast(C),
    h0=cast(h0),
    D1=cast(D1),
    D2=cast(D2),
    dt_bias=cast(dt_bias),
  )


def seg_pattern(kind, b, L, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "random":
    s = np.sort(rng.integers(0, max(1, L // 4), size=(b, L)), axis=1)
  elif kind == "chunk_edge":  # boundaries exactly at chunk starts + one mid-chunk
    s = np.zeros((b, L), np.int64)
    for t in range(L):
      s[:, t] = t // Q
    s[:, min(L - 1, Q + 3) :] += 10
  elif kind == "pos1":  # boundary at position 1
    s = np.ones((b, L), np.int64)
    s[:, 0] = 0
  elif kind == "single":  # mix of single-token segments and long ones
    s = np.zeros((b, L), np.int64)
    cur = 0
    for t in range(L):
      if t % 5 in (0, 1, 2) or t == Q - 1 or t == Q:
        cur += 1
      s[:, t] = cur
  elif kind == "all_separate":
    s = np.tile(np.arange(L), (b, 1))
  elif kind == "nonmonotone":  # ids may repeat after a change: still a reset
    s = np.tile((np.arange(L) // 3) % 2, (b, 1))
  else:
    raise ValueError(kind)
  return jnp.asarray(s, jnp.int32)


@functools.lru_cache(maxsize=None)
def _fwd_fn(impl, chunk_size, dt_softplus, dt_limit, return_final_state=True):
  def f(x, dt, A, B, C, D, dt_bias, h0, seg):
    return ssd(
      x,
      dt,
      A,
      B,
      C,
      D=D,
      dt_bias=dt_bias,
      dt_softplus=dt_softplus,
      dt_limit=dt_limit,
      chunk_size=chunk_size,
      initial_state=h0,
      segment_ids=seg,
      return_final_state=return_final_state,
      impl=impl,
    )

  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _grad_fn(impl, chunk_size, dt_softplus, dt_limit):
  fwd = _fwd_fn(impl, chunk_size, dt_softplus, dt_limit)

  def loss(diff_args, seg, wy, wh):
    x, dt, A, B, C, D, dt_bias, h0 = diff_args
    y, h = fwd(x, dt, A, B, C, D, dt_bias, h0, seg)
    return jnp.sum(y * wy) + jnp.sum(h * wh)

  return jax.jit(jax.grad(loss))


def run(
  impl,
  inp,
  *,
  chunk_size=Q,
  D=None,
  dt_bias=None,
  h0=None,
  seg=None,
  dt_softplus=True,
  dt_limit=(0.0, float("inf")),
):
  return _fwd_fn(impl, chunk_size, dt_softplus, tuple(dt_limit))(
    inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D, dt_bias, h0, seg
  )


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def naive_numpy_ssd(x, dt, A, B, C, D, dt_bias, h0, seg, dt_softplus=True, dt_limit=(0.0, np.inf)):
  """Independent float64 per-token loop (no JAX)."""
  x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
  b, L, Hh, Pp = x.shape
  G, Nn = B.shape[-2:]
  rep = Hh // G
  y = np.zeros_like(x)
  hs = np.zeros((b, Hh, Pp, Nn))
  for bi in range(b):
    for hh in range(Hh):
      g = hh // rep
      state = np.zeros((Pp, Nn)) if h0 is None else np.array(h0[bi, hh], np.float64)
      for t in range(L):
        v = dt[bi, t, hh] + (0.0 if dt_bias is None else float(dt_bias[hh]))
        if dt_softplus:
          v = np.logaddexp(v, 0.0)
        v = min(max(v, dt_limit[0]), dt_limit[1])
        decay = np.exp(v * A[hh])
        if seg is not None and t > 0 and seg[bi, t] != seg[bi, t - 1]:
          decay = 0.0
        state = decay * state + v * np.outer(x[bi, t, hh], B[bi, t, g])
        y[bi, t, hh] = state @ C[bi, t, g]
        if D is not None:
          Dh = np.asarray(D, np.float64)[hh]
          y[bi, t, hh] += Dh * x[bi, t, hh]
      hs[bi, hh] = state
  return y, hs


# ------------------------------------------------------------ oracle checks


def test_reference_matches_naive_loop(x64):
  inp = make_inputs(0, 2, 11, 2)
  seg = seg_pattern("single", 2, 11)
  for kw in (
    dict(D=inp["D2"], dt_bias=inp["dt_bias"], h0=inp["h0"], seg=seg),
    dict(D=inp["D1"], dt_softplus=False, dt_limit=(0.05, 0.7)),
  ):
    y, h = run("reference", inp, **kw)
    yn, hn = naive_numpy_ssd(
      inp["x"],
      inp["dt"],
      inp["A"],
      inp["B"],
      inp["C"],
      kw.get("D"),
      kw.get("dt_bias"),
      None if kw.get("h0") is None else np.asarray(kw["h0"]),
      None if kw.get("seg") is None else np.asarray(kw["seg"]),
      dt_softplus=kw.get("dt_softplus", True),
      dt_limit=kw.get("dt_limit", (0.0, np.inf)),
    )
    assert y.dtype == jnp.float64 and h.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), yn, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(h), hn, rtol=1e-12, atol=1e-12)


def test_prepare_dt():
  raw = jnp.asarray([[-30.0, -1.0, 0.0, 2.0, 30.0]], jnp.float32)[..., None]  # (1, 5, 1)
  bias = jnp.asarray([0.5], jnp.float32)
  out = prepare_dt(raw, bias)
  np.testing.assert_allclose(
    np.asarray(out[0, :, 0]), np.logaddexp(np.asarray(raw[0, :, 0]) + 0.5, 0.0), rtol=1e-6
  )
  out = prepare_dt(raw, bias, dt_limit=(0.1, 2.0))
  assert float(out.min()) == pytest.approx(0.1) and float(out.max()) == pytest.approx(2.0)
  out = prepare_dt(raw, None, dt_softplus=False)  # default limit (0, inf) clips negatives
  np.testing.assert_allclose(np.asarray(out[0, :, 0]), [0.0, 0.0, 0.0, 2.0, 30.0])
  assert out.dtype == jnp.float32
  assert prepare_dt(raw.astype(jnp.bfloat16)).dtype == jnp.float32


# ------------------------------------------------------ forward: xla vs oracle

# (L, G, options): covers L in {1, 7, Q, 3Q+5}, G in {1, 2}, with/without h0 and
# segment ids, D of shape (H,) and (H, P), softplus on/off, finite dt_limit.
FWD_CASES = [
  (1, 1, dict()),
  (1, 2, dict(h0=True, D="D1", seg="random")),
  (7, 1, dict(h0=True, D="D2", softplus=False)),
  (7, 2, dict(seg="pos1", dt_bias=True, limit=(0.1, 0.8))),
  (Q, 1, dict(seg="all_separate", h0=True)),
  (Q, 2, dict(h0=True, D="D1", dt_bias=True)),
  (3 * Q + 5, 1, dict()),
  (3 * Q + 5, 1, dict(h0=True, seg="chunk_edge", D="D2", dt_bias=True)),
  (3 * Q + 5, 2, dict(h0=True, seg="single", softplus=False, limit=(0.0, 0.9))),
  (3 * Q + 5, 2, dict(seg="all_separate", D="D1", limit=(0.05, 0.5), dt_bias=True)),
  (3 * Q + 5, 2, dict(h0=True, seg="nonmonotone", D="D2")),
  (3 * Q, 1, dict(h0=True, seg="pos1", dt_bias=True)),
]


def _kwargs(inp, opts, b, L):
  return dict(
    D=inp[opts["D"]] if "D" in opts else None,
    dt_bias=inp["dt_bias"] if opts.get("dt_bias") else None,
    h0=inp["h0"] if opts.get("h0") else None,
    seg=seg_pattern(opts["seg"], b, L) if "seg" in opts else None,
    dt_softplus=opts.get("softplus", True),
    dt_limit=opts.get("limit", (0.0, float("inf"))),
  )


@pytest.mark.parametrize("L,G,opts", FWD_CASES)
def test_forward_f64(x64, L, G, opts):
  b = 2
  inp = make_inputs(L * 10 + G, b, L, G)
  kw = _kwargs(inp, opts, b, L)
  y_ref, h_ref = run("reference", inp, **kw)
  y, h = run("xla", inp, **kw)
  assert y.shape == (b, L, H, P) and h.shape == (b, H, P, N)
  assert y.dtype == jnp.float64 and h.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16, 256])
def test_chunk_size_invariance(x64, chunk_size):
  b, L = 1, 3 * Q + 5
  inp = make_inputs(5, b, L, 2)
  kw = dict(h0=inp["h0"], seg=seg_pattern("chunk_edge", b, L), D=inp["D1"])
  y_ref, h_ref = run("reference", inp, **kw)
  y, h = run("xla", inp, chunk_size=chunk_size, **kw)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["chunk_edge", "pos1", "single", "all_separate", "nonmonotone"])
def test_segments_equal_separate_runs(x64, kind):
  """A reset at every id change == running each segment on its own (h0 only on the first)."""
  L = 3 * Q + 5
  inp = make_inputs(7, 1, L, 2)
  seg = seg_pattern(kind, 1, L)
  y, h = run("xla", inp, h0=inp["h0"], seg=seg, D=inp["D2"])
  s = np.asarray(seg[0])
  starts = [0] + [t for t in range(1, L) if s[t] != s[t - 1]] + [L]
  ys = []
  for i, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
    part = {k: (v[:, lo:hi] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    yp, hp = run("xla", part, h0=inp["h0"] if i == 0 else None, D=inp["D2"])
    ys.append(yp)
  np.testing.assert_allclose(
    np.asarray(y), np.asarray(jnp.concatenate(ys, axis=1)), rtol=1e-10, atol=1e-10
  )
  np.testing.assert_allclose(np.asarray(h), np.asarray(hp), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_state_passing(x64, impl):
  """[a] then [b] with the final state of [a] as initial_state == [a + b]."""
  L, La = 3 * Q + 5, Q + 3
  inp = make_inputs(11, 2, L, 2)
  y, h = run(impl, inp, h0=inp["h0"], D=inp["D1"], dt_bias=inp["dt_bias"])
  kw = dict(D=inp["D1"], dt_bias=inp["dt_bias"])
  part_a = {k: (v[:, :La] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
  part_b = {k: (v[:, La:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
  ya, ha = run(impl, part_a, h0=inp["h0"], **kw)
  yb, hb = run(impl, part_b, h0=ha, **kw)
  np.testing.assert_allclose(
    np.asarray(y), np.asarray(jnp.concatenate([ya, yb], 1)), rtol=1e-10, atol=1e-10
  )
  np.testing.assert_allclose(np.asarray(h), np.asarray(hb), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ gradients

GRAD_CASES = [
  (7, 1, dict(h0=True, D="D2", dt_bias=True)),
  (Q, 2, dict(h0=True, D="D1", dt_bias=True, seg="pos1", softplus=False, limit=(0.05, 0.9))),
  (3 * Q + 5, 1, dict(h0=True, D="D1", dt_bias=True, seg="chunk_edge")),
  (3 * Q + 5, 2, dict(h0=True, D="D2", dt_bias=True, seg="single", limit=(0.0, 0.6))),
  (3 * Q + 5, 2, dict(h0=True, D="D2", dt_bias=True, seg="all_separate")),
]
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


@pytest.mark.parametrize("L,G,opts", GRAD_CASES)
def test_gradients_f64(x64, L, G, opts):
  b = 2
  inp = make_inputs(100 + L + G, b, L, G)
  kw = _kwargs(inp, opts, b, L)
  rng = np.random.default_rng(1)
  wy = jnp.asarray(rng.standard_normal((b, L, H, P)))
  wh = jnp.asarray(rng.standard_normal((b, H, P, N)))
  args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], kw["D"], kw["dt_bias"], kw["h0"])
  key = (Q, kw["dt_softplus"], tuple(kw["dt_limit"]))
  g_ref = _grad_fn("reference", *key)(args, kw["seg"], wy, wh)
  g = _grad_fn("xla", *key)(args, kw["seg"], wy, wh)
  for name, a, r in zip(GRAD_NAMES, g, g_ref):
    if r is None:
      continue
    assert np.all(np.isfinite(np.asarray(a))), name
    assert rel_err(a, r) < 1e-9, (name, rel_err(a, r))


# ------------------------------------------------------- float32 / bfloat16


def test_float32_matches_reference():
  b, L, G = 2, 3 * 16 + 5, 2
  inp = make_inputs(3, b, L, G, dtype=np.float32, h=4, p=16, n=32)
  seg = seg_pattern("random", b, L)
  kw = dict(D=inp["D1"], dt_bias=inp["dt_bias"], h0=inp["h0"], seg=seg)
  y_ref, h_ref = run("reference", inp, chunk_size=16, **kw)
  y, h = run("xla", inp, chunk_size=16, **kw)
  assert y.dtype == jnp.float32 and h.dtype == jnp.float32
  assert rel_err(y, y_ref) < 1e-5
  assert rel_err(h, h_ref) < 1e-5


def test_bfloat16_inputs():
  """bf16 x/dt/B/C (A, D, h0 in fp32): y is bf16, state fp32; tolerance 2e-2 of max|y|."""
  b, L, G = 1, 3 * 16 + 5, 1
  inp = make_inputs(4, b, L, G, dtype=np.float32, h=4, p=16, n=32)
  bf = {k: (v.astype(jnp.bfloat16) if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
  up = {k: v.astype(jnp.float32) for k, v in bf.items()}  # same rounded values in fp32
  y_ref, h_ref = run("reference", up, chunk_size=16, D=up["D1"], h0=up["h0"])
  y, h = run("xla", bf, chunk_size=16, D=inp["D1"], h0=inp["h0"])
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  assert rel_err(y, y_ref) < 2e-2
  assert rel_err(h, h_ref) < 1e-4  # state is accumulated in fp32 from the same bf16 values


def test_strong_decay_finite():
  """A = -16 with dt up to ~1 (and a few huge dt) over 3 chunks: no NaN/inf anywhere."""
  b, L, G = 1, 3 * 16, 1
  inp = make_inputs(9, b, L, G, dtype=np.float32, h=4, p=8, n=16)
  inp["A"] = jnp.full((4,), -16.0, jnp.float32)
  rng = np.random.default_rng(0)
  dt = rng.uniform(-2.0, 1.0, size=(b, L, 4))  # softplus -> (0.13, 1.3)
  dt[0, 5, :] = 60.0  # softplus ~ 60 -> dA = -960: exp underflows to exactly 0
  inp["dt"] = jnp.asarray(dt, jnp.float32)
  seg = seg_pattern("chunk_edge", b, L)
  args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D1"], inp["dt_bias"], inp["h0"])
  wy = jnp.ones((b, L, 4, 8), jnp.float32)
  wh = jnp.ones((b, 4, 8, 16), jnp.float32)
  for impl in ("xla", "reference"):
    for s in (None, seg):
      y, h = _fwd_fn(impl, 16, True, (0.0, float("inf")))(*args, s)
      assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(h)))
      grads = _grad_fn(impl, 16, True, (0.0, float("inf")))(args, s, wy, wh)
      for name, g in zip(GRAD_NAMES, grads):
        assert np.all(np.isfinite(np.asarray(g))), (impl, name)
  y_ref, _ = _fwd_fn("reference", 16, True, (0.0, float("inf")))(*args, None)
  y, _ = _fwd_fn("xla", 16, True, (0.0, float("inf")))(*args, None)
  assert rel_err(y, y_ref) < 1e-5


# --------------------------------------------------------------- API surface


def test_auto_dispatch():
  inp = make_inputs(2, 1, 20, 1, dtype=np.float32)
  args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
  assert ssd_api.resolve_impl("auto") == "xla"
  assert ssd_api.resolve_impl("reference") == "reference"
  y_auto = jax.jit(functools.partial(ssd, chunk_size=Q))(*args)
  y_xla = jax.jit(functools.partial(ssd, impl="xla", chunk_size=Q))(*args)
  np.testing.assert_array_equal(np.asarray(y_auto), np.asarray(y_xla))
  y_ref = jax.jit(functools.partial(ssd, impl="reference"))(*args)
  assert rel_err(y_xla, y_ref) < 1e-5
  assert isinstance(y_ref, jax.Array)  # no final state unless asked
  out = jax.jit(functools.partial(ssd, return_final_state=True))(*args)
  assert len(out) == 2 and out[1].shape == (1, H, P, N) and out[1].dtype == jnp.float32


@pytest.mark.parametrize(
  "backend,impl",
  [("cpu", "xla"), ("gpu", "pallas_gpu"), ("tpu", "pallas_tpu"), ("rocm", "xla"), ("metal", "xla")],
)
def test_auto_picks_pallas_on_accelerators(monkeypatch, backend, impl):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert ssd_api.resolve_impl("auto") == impl


def test_errors():
  inp = make_inputs(2, 1, 6, 2, dtype=np.float32)
  x, dt, A, B, C = inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"]
  with pytest.raises(ValueError, match=r"impl=.*pallas.*allowed values.*auto.*reference.*xla"):
    ssd(x, dt, A, B, C, impl="pallas")
  with pytest.raises(ValueError, match="divisible by ngroups"):
    ssd(x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match="dt must have shape"):
    ssd(x, dt[:, :5], A, B, C)
  with pytest.raises(ValueError, match="B batch/seqlen"):
    ssd(x, dt, A, B[:, :5], C[:, :5])
  with pytest.raises(ValueError, match="C must have the same shape"):
    ssd(x, dt, A, B, C[..., :2])
  with pytest.raises(ValueError, match="initial_state must have shape"):
    ssd(x, dt, A, B, C, initial_state=jnp.zeros((1, H, N, P)))
  with pytest.raises(ValueError, match="D must have shape"):
    ssd(x, dt, A, B, C, D=jnp.zeros((P,)))
  with pytest.raises(ValueError, match="dt_bias must have shape"):
    ssd(x, dt, A, B, C, dt_bias=jnp.zeros((H, 1)))
  with pytest.raises(ValueError, match="A must have shape"):
    ssd(x, dt, A[:2], B, C)
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    ssd(x, dt, A, B, C, segment_ids=jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must be an integer"):
    ssd(x, dt, A, B, C, segment_ids=jnp.zeros((1, 6), jnp.float32))
  with pytest.raises(ValueError, match="chunk_size"):
    ssd(x, dt, A, B, C, chunk_size=0)
  with pytest.raises(ValueError, match="x must have shape"):
    ssd(x[0], dt, A, B, C)


def test_grad_without_final_state(x64):
  """Only y is differentiated (the final-state cotangent is a symbolic zero)."""
  inp = make_inputs(21, 1, Q + 3, 1)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((1, Q + 3, H, P)))

  def loss(args, impl):
    x, dt, A, B, C = args
    return jnp.sum(ssd(x, dt, A, B, C, chunk_size=Q, impl=impl) * w)

  args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
  g_ref = jax.jit(jax.grad(functools.partial(loss, impl="reference")))(args)
  g = jax.jit(jax.grad(functools.partial(loss, impl="xla")))(args)
  for a, r in zip(g, g_ref):
    assert rel_err(a, r) < 1e-9


def test_register_impl(monkeypatch):
  """The dispatch table is extensible: a registered core is callable by name and via auto."""
  from mamba2_jax.ssd.reference import reference_core

  monkeypatch.setitem(ssd_api._IMPLS, "dummy", reference_core)
  monkeypatch.setitem(ssd_api._AUTO, jax.default_backend(), "dummy")
  assert "dummy" in ssd_api.available_impls()
  assert ssd_api.resolve_impl("auto") == "dummy"
  with pytest.raises(ValueError, match="already registered"):
    ssd_api.register_impl("dummy", reference_core)
  with pytest.raises(ValueError, match="unknown impl"):
    ssd_api.set_auto_impl("cpu", "nope")
  inp = make_inputs(2, 1, 5, 1, dtype=np.float32)
  y = ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], impl="dummy")
  y_ref = ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], impl="reference")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))


def test_register_impl_fused_skip(monkeypatch):
  """A core registered with fuses_skip=True gets D as (H, P) and returns y + D x; the op then
  adds no skip of its own. Both give the reference result."""
  from mamba2_jax.ssd.common import apply_skip
  from mamba2_jax.ssd.reference import reference_core

  monkeypatch.setattr(ssd_api, "_IMPLS", dict(ssd_api._IMPLS))
  monkeypatch.setattr(ssd_api, "SKIP_IMPLS", set(ssd_api.SKIP_IMPLS))
  seen = []

  def fused(prep, *, chunk_size, D=None):
    seen.append(None if D is None else D.shape)
    y, h = reference_core(prep, chunk_size=chunk_size)
    return apply_skip(y, prep.x, D, prep.acc), h

  ssd_api.register_impl("fused", fused, fuses_skip=True)
  inp = make_inputs(2, 1, 5, 1, dtype=np.float32)
  H, P = inp["x"].shape[2:]
  args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
  D = jnp.linspace(-1.0, 1.0, H)
  y = ssd(*args, D=D, impl="fused")
  y_ref = ssd(*args, D=D, impl="reference")
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
  assert seen == [(H, P)]
  # registered again without fuses_skip: the op adds D x itself and passes no D=
  ssd_api.register_impl(
    "fused", lambda prep, *, chunk_size: reference_core(prep, chunk_size=chunk_size), overwrite=True
  )
  assert "fused" not in ssd_api.SKIP_IMPLS
  np.testing.assert_allclose(
    np.asarray(ssd(*args, D=D, impl="fused")), np.asarray(y_ref), rtol=1e-6, atol=1e-6
  )
