"""The sliding window by state difference (paper eq. 8) in the op: reference and xla against the
numpy oracle, its limits, gradients; the Pallas impls refuse it; and the deep-stack gap (a
window is exact per layer, not for the stack).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2LM
from mamba2_jax.ssd import ssd
from tests.mitigations import helpers
from tests.mitigations.helpers import (
  CFG,
  LOG_CA,
  S,
  close,
  fwd,
  inputs,
  naive,
  op_args,
  op_fn,
  op_weights,
  rel,
)

x64 = helpers.x64


@pytest.mark.parametrize(
  "r,G", [(1, 1), (3, 2), (8, 1), (8, 2), (16, 2), (21, 1), (21, 2), (37, 2)]
)
def test_window_equals_direct_windowed_sum(x64, r, G):
  v = inputs(r + G, G=G)  # L = 37: not a multiple of the chunk 8; segments and h0
  want = naive(v, r=r, dt_scale=S, off=LOG_CA)
  seg = jnp.asarray(v["seg"])
  for impl in ("reference", "xla"):
    y, _ = op_fn(impl, r, False)(op_args(v), seg, *op_weights(v))[1]
    assert rel(y, want) < 1e-12, impl


@pytest.mark.parametrize("r", [38, 100])
def test_window_covering_everything_is_the_plain_op(x64, r):
  v = inputs(5)
  seg = jnp.asarray(v["seg"])
  plain = op_fn("xla", None, False)(op_args(v), seg, *op_weights(v))[1]
  for impl in ("reference", "xla"):
    y, h = op_fn(impl, r, False)(op_args(v), seg, *op_weights(v))[1]
    assert rel(y, plain[0]) < 1e-13 and rel(h, plain[1]) < 1e-13


def test_window_final_state_is_the_ordinary_state(x64):
  v = inputs(6)
  seg = jnp.asarray(v["seg"])
  _, h_plain = op_fn("xla", None, False)(op_args(v), seg, *op_weights(v))[1]
  _, h = op_fn("xla", 5, False)(op_args(v), seg, *op_weights(v))[1]
  assert rel(h, h_plain) < 1e-13


@pytest.mark.parametrize("r", [3, 8, 21])
def test_window_gradients_xla_equal_reference(x64, r):
  v = inputs(10 + r)
  seg, (wy, wh) = jnp.asarray(v["seg"]), op_weights(v)
  (_, (y0, h0)), g0 = op_fn("reference", r, True)(op_args(v), seg, wy, wh)
  (_, (y1, h1)), g1 = op_fn("xla", r, True)(op_args(v), seg, wy, wh)
  assert rel(y1, y0) < 1e-12 and rel(h1, h0) < 1e-12
  names = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0", "log_decay_offset")
  for name, a, b in zip(names, g1, g0):
    assert rel(a, b) < 1e-11, name


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_window_raises(impl):
  v = inputs(0, dtype=np.float32)
  with pytest.raises(ValueError, match=r"window.*'reference', 'xla'"):
    ssd(v["x"], v["dt"], v["A"], v["B"], v["C"], window=4, impl=impl)


@pytest.mark.slow
def test_window_is_exact_per_layer_but_not_for_the_stack():
  """A layer's output depends on its inputs at t-r+1..t, which (conv: K-1 taps) depend on
  r + K - 1 tokens; n layers see n (r + K - 2) + 1 tokens, not r."""
  r, L, K = 6, 48, CFG.d_conv
  toks = jax.random.randint(jax.random.key(7), (1, L), 0, CFG.vocab_size)
  gaps = {}
  for n in (1, 3):
    m = Mamba2LM(CFG.replace(n_layer=n, ssd_window=r), rngs=nnx.Rngs(n))
    last = np.asarray(fwd(m, toks, None))[:, -1]
    span = n * (r + K - 2) + 1  # the stack's true receptive field
    close(np.asarray(fwd(m, toks[:, L - span :], None))[:, -1], last, 1e-5)
    gaps[n] = rel(np.asarray(fwd(m, toks[:, L - r :], None))[:, -1], last)  # "last r tokens"
  assert gaps[1] > 1e-4 and gaps[3] > 1e-4, gaps  # not an r-token model (see the report)
