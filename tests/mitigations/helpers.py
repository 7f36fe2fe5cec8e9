"""Shared by the tests of mamba2_jax.mitigations: random op inputs, an independent numpy oracle
(explicit windowed sums, float64), the jitted op, and model-level runners (forward, prefill in
pieces, token-by-token decode)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.ssd import ssd

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
def op_fn(impl, r, with_grad, chunk=Q):
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


def op_args(v, off=LOG_CA):
  return tuple(jnp.asarray(v[k]) for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")) + (
    jnp.asarray(off, v["x"].dtype),
  )


def op_weights(v):
  rng = np.random.default_rng(99)
  return (
    jnp.asarray(rng.standard_normal(v["x"].shape), v["x"].dtype),
    jnp.asarray(rng.standard_normal(v["h0"].shape), v["x"].dtype),
  )


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------------------ model level

CFG = Mamba2Config.preset("tiny", chunk_size=Q, ngroups=2, vocab_size=100)
CUTS = (7, 14, 21)  # 4 pieces of 7 tokens (one compile); window 3 < 7 < window 12


@pytest.fixture(scope="module")
def model():
  return Mamba2LM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 28), 0, CFG.vocab_size)


fwd = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
prefill = nnx.jit(lambda m, t, c, s: m.prefill(t, c, segment_ids=s))
decode_step = nnx.jit(lambda m, t, c: m.decode_step(t, c))


def run_pieces(m, toks, cuts, seg=None):
  c, outs = m.init_cache(toks.shape[0]), []
  for a, b in zip((0,) + cuts, cuts + (toks.shape[1],)):
    out, c = prefill(m, toks[:, a:b], c, None if seg is None else seg[:, a:b])
    outs.append(out)
  return np.concatenate(outs, axis=1), c


def run_decode(m, toks, c=None):
  c = m.init_cache(toks.shape[0]) if c is None else c
  outs = []
  for t in range(toks.shape[1]):
    out, c = decode_step(m, toks[:, t], c)
    outs.append(out)
  return np.stack(outs, axis=1), c


def close(a, b, tol=3e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0)
