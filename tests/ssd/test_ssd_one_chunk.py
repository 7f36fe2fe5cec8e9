"""The chunked SSD's single-chunk path (mamba2_jax/ssd/chunked.py: L <= chunk_size without an
initial state runs only the diagonal block) against the float64 per-token reference: outputs,
final state and every gradient, with and without segment ids."""

import jax.numpy as jnp
import numpy as np
import pytest

from test_ssd import GRAD_NAMES, H, N, P, Q, _grad_fn, _kwargs, make_inputs, rel_err, run, x64  # noqa: F401

CASES = [
  (1, 1, dict()),
  (5, 2, dict(D="D2", dt_bias=True, seg="random")),
  (Q, 1, dict(D="D1", dt_bias=True, seg="pos1", softplus=False, limit=(0.05, 0.9))),
  (Q, 2, dict(seg="all_separate", limit=(0.0, 0.6))),
]


@pytest.mark.parametrize("L,G,opts", CASES)
def test_one_chunk_matches_reference(x64, L, G, opts):  # noqa: F811 (the x64 fixture)
  b = 2
  inp = make_inputs(300 + L + G, b, L, G)
  kw = _kwargs(inp, opts, b, L)
  y, h = run(
    "xla",
    inp,
    D=kw["D"],
    dt_bias=kw["dt_bias"],
    seg=kw["seg"],
    dt_softplus=kw["dt_softplus"],
    dt_limit=kw["dt_limit"],
  )
  y_ref, h_ref = run(
    "reference",
    inp,
    D=kw["D"],
    dt_bias=kw["dt_bias"],
    seg=kw["seg"],
    dt_softplus=kw["dt_softplus"],
    dt_limit=kw["dt_limit"],
  )
  assert rel_err(y, y_ref) < 1e-10 and rel_err(h, h_ref) < 1e-10

  rng = np.random.default_rng(3)
  wy = jnp.asarray(rng.standard_normal((b, L, H, P)))
  wh = jnp.asarray(rng.standard_normal((b, H, P, N)))
  args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], kw["D"], kw["dt_bias"], None)
  key = (Q, kw["dt_softplus"], tuple(kw["dt_limit"]))
  for w_h in (wh, jnp.zeros_like(wh)):  # with and without the final state in the loss
    g_ref = _grad_fn("reference", *key)(args, kw["seg"], wy, w_h)
    g = _grad_fn("xla", *key)(args, kw["seg"], wy, w_h)
    for name, a, r in zip(GRAD_NAMES, g, g_ref):
      if r is None:
        continue
      assert np.all(np.isfinite(np.asarray(a))), name
      if name == "A" and not np.any(np.asarray(r)):
        # no decay reaches any output (L = 1, every token its own segment): dA is
        # exactly 0; rows - columns leaves rounding residue, measured against d dt
        err = np.max(np.abs(np.asarray(a))) / np.max(np.abs(np.asarray(g_ref[1])))
      else:
        err = rel_err(a, r)
      assert err < 1e-9, (name, err)
