"""State normalization: the op level ("token": the reference scan with a state hook; "chunk":
block_normalized_ssd) against the plain op, its bound, pieces; the formula; decode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.mitigations import with_mitigations
from mamba2_jax.mitigations.state_norm import block_normalized_ssd, normalize_state
from mamba2_jax.ssd import ssd
from tests.mitigations import helpers
from tests.mitigations.helpers import LOG_CA, Q, S, decode_step, inputs, rel

x64, model, tokens = helpers.x64, helpers.model, helpers.tokens


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
  return block_normalized_ssd(
    v["x"][:, sl],
    dtp,
    v["A"],
    v["B"][:, sl],
    v["C"][:, sl],
    tau=tau,
    block=block,
    impl="xla",
    chunk_size=min(Q, block),
    position=position,
    D=v["D"],
    log_decay_offset=off,
    segment_ids=v["seg"][:, sl],
    initial_state=v["h0"] if h0 is None else h0,
  )


def _token(v, tau):
  """Granularity "token": the reference scan with the normalization as its state hook."""
  return ssd(
    v["x"],
    v["dt"],
    v["A"],
    v["B"],
    v["C"],
    D=v["D"],
    dt_bias=v["dt_bias"],
    dt_scale=S,
    log_decay_offset=LOG_CA,
    initial_state=v["h0"],
    segment_ids=v["seg"],
    return_final_state=True,
    impl="reference",
    state_hook=functools.partial(normalize_state, tau=tau),
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


def test_state_norm_never_exceeds_threshold_in_decode(model, tokens):
  for gran in ("token", "chunk"):
    m = with_mitigations(model, state_norm=gran, state_norm_chunk=4, state_norm_threshold=0.05)
    c = m.init_cache(2)
    for t in range(tokens.shape[1]):
      _, c = decode_step(m, tokens[:, t], c)
      if gran == "token" or (t + 1) % 4 == 0:
        assert float(jnp.max(jnp.linalg.norm(c.ssm, axis=(-2, -1)))) <= 0.05 * (1 + 1e-5)
