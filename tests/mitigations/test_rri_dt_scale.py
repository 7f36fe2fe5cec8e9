"""RRI (decay scale c_a, insertion scale c_b) and the dt scale: every impl honours them (the
Pallas impls in interpret mode, with gradients) against the numpy oracle; c_b at model level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2LM
from mamba2_jax.mitigations import with_mitigations
from tests.mitigations import helpers
from tests.mitigations.helpers import (
  CFG,
  LOG_CA,
  S,
  fwd,
  inputs,
  naive,
  op_args,
  op_fn,
  op_weights,
  rel,
)

x64 = helpers.x64


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_rri_and_dt_scale_equal_explicit_recurrence(x64, impl):
  v = inputs(3)
  y, _ = op_fn(impl, None, False)(op_args(v), jnp.asarray(v["seg"]), *op_weights(v))[1]
  assert rel(y, naive(v, dt_scale=S, off=LOG_CA)) < 1e-12


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_impls_honour_rri_and_dt_scale(impl):
  """Interpret mode, fp32, with gradients (incl. d/d log_decay_offset) vs the f64 oracle."""
  v = inputs(7, b=1, L=37, H=4, G=2, N=16, P=16 if impl == "pallas_gpu" else 8, dtype=np.float32)
  seg, (wy, wh) = jnp.asarray(v["seg"]), op_weights(v)
  (_, (y, h)), g = op_fn(impl, None, True, 16)(op_args(v), seg, wy, wh)
  with jax.enable_x64(True):
    v64 = {k: (a if k == "seg" else a.astype(np.float64)) for k, a in v.items()}
    (_, (y0, h0)), g0 = op_fn("reference", None, True, 16)(
      op_args(v64), seg, jnp.asarray(wy, jnp.float64), jnp.asarray(wh, jnp.float64)
    )
    assert rel(y0, naive(v64, dt_scale=S, off=LOG_CA)) < 1e-12
  assert rel(y, y0) < 5e-5 and rel(h, h0) < 5e-5
  names = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0", "log_decay_offset")
  for name, a, b in zip(names, g, g0):
    assert rel(a, b) < 2e-4, name


def test_insert_scale_equals_plain_model_with_rescaled_D(x64):
  cfg = CFG.replace(dtype="float64", param_dtype="float64", norm_eps=1e-14)
  base = Mamba2LM(cfg, rngs=nnx.Rngs(3))
  toks = jax.random.randint(jax.random.key(2), (2, 21), 0, cfg.vocab_size)
  cb = 0.75
  scaled = with_mitigations(base, rri_insert_scale=cb)
  plain = with_mitigations(base)
  plain.layers.mixer.D.set_value(base.layers.mixer.D[...] / cb)
  want = np.asarray(fwd(plain, toks, None))
  # f64 inside; the LM head returns float32 logits, hence the fp32-level tolerance
  assert rel(fwd(scaled, toks, None), want) < 2e-6
  assert rel(fwd(base, toks, None), want) > 1e-3
