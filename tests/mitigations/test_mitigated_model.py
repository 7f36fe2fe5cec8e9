"""Model level with each mitigation on: forward == prefill in pieces == token-by-token decode
(also across segments), and the gradients of the xla path equal the reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax.mitigations import with_mitigations
from tests.mitigations import helpers
from tests.mitigations.helpers import CFG, CUTS, close, fwd, rel, run_decode, run_pieces

model, tokens = helpers.model, helpers.tokens

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
  full = np.asarray(fwd(m, tokens, None))
  assert np.abs(full - np.asarray(fwd(model, tokens, None))).max() > 1e-3  # it acts
  pieces, c1 = run_pieces(m, tokens, CUTS)
  close(pieces, full)
  steps, c2 = run_decode(m, tokens)
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
  full = np.asarray(fwd(m, toks, seg))
  pieces, c = run_pieces(m, toks[:, :30], (10, 20), seg[:, :30])
  close(pieces, full[:, :30])
  steps, _ = run_decode(m, toks[:, 30:], c)
  close(steps, full[:, 30:])
  if case == "window5":  # the window (and conv) reset at segment starts: == separate documents
    start = 0
    for n in lens:
      close(full[:, start : start + n], fwd(m, toks[:, start : start + n], None))
      start += n


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
