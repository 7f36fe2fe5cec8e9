"""state_stats: layer introspection == the model's own computation, retention, statistics."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from configs.evaluate import get_config as get_task_config
from mamba2_jax.eval import introspect, run_state_stats, state_stats
from mamba2_jax.ssd import ssd

CFG = Mamba2Config.preset("tiny", chunk_size=8, ngroups=2, n_layer=3, vocab_size=100)


@pytest.fixture(scope="module")
def model():
  return Mamba2LM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def setup(model):
  toks = jax.random.randint(jax.random.key(2), (2, 45), 0, CFG.vocab_size)
  _, cache0 = model.prefill(toks[:, :20])  # start from a non-trivial cache
  return toks[:, 20:], cache0


def _close(a, b, tol=2e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0)


def test_internals_forward_equals_prefill(model, setup):
  toks, cache0 = setup
  logits, cache = model.prefill(toks, cache0)
  got_logits, got_cache, it = jax.jit(lambda t, c: introspect.forward_with_internals(model, t, c))(
    toks, cache0
  )
  _close(got_logits, logits)
  for name in ("conv_x", "conv_B", "conv_C", "ssm"):
    _close(getattr(got_cache, name), getattr(cache, name))
  L, b, c = CFG.n_layer, 2, toks.shape[1]
  assert it.x.shape == (L, b, c, CFG.nheads, CFG.headdim)
  assert it.B.shape == it.C.shape == (L, b, c, CFG.ngroups, CFG.d_state)
  assert it.dt.shape == it.log_decay.shape == (L, b, c, CFG.nheads)


def test_internals_reproduce_the_mixer_state_and_output(model, setup):
  """The SSD of the recomputed x, dt, B, C from the cached state gives the block's new SSM
  state (every layer) and, through the gated norm and out_proj, the block's output (layer 0)."""
  toks, cache0 = setup
  _, cache, it = introspect.forward_with_internals(model, toks, cache0)
  graphdef, state = nnx.split(model.layers)
  for l in range(CFG.n_layer):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[l], state))
    A = -jnp.exp(block.mixer.A_log[...])
    y, h = ssd(
      it.x[l],
      it.dt[l],
      A,
      it.B[l],
      it.C[l],
      D=block.mixer._D(),
      dt_softplus=False,
      initial_state=cache0.ssm[l],
      return_final_state=True,
      impl="reference",
    )
    _close(h, cache.ssm[l])
    np.testing.assert_allclose(np.asarray(it.log_decay[l]), np.asarray(it.dt[l] * A), rtol=1e-6)
    if l == 0:
      resid = model._embed(toks)
      layer_cache = jax.tree.map(lambda a: a[0], cache0)
      out, _ = block(resid, cache=layer_cache)
      mixed = block.mixer._output(y.reshape(*y.shape[:2], -1), it.z[0])
      _close(out - resid, mixed)


def test_retention_is_the_linear_response_of_each_layers_state(model, setup):
  """alpha_{1:t} = exp(sum dt*A): perturbing only layer l's initial SSM state by S0 changes its
  final state by exactly alpha_{1:t} * S0 (layer l's inputs do not depend on its own state)."""
  toks, cache0 = setup
  _, _, it = introspect.forward_with_internals(model, toks, cache0)
  retention = np.exp(np.asarray(it.log_decay, np.float64).sum(axis=2))  # (L, b, H)
  direct = np.prod(np.exp(np.asarray(it.log_decay, np.float64)), axis=2)
  np.testing.assert_allclose(retention, direct, rtol=1e-9)
  S0 = jax.random.normal(jax.random.key(3), cache0.ssm.shape[1:])
  run = jax.jit(lambda t, c: model.prefill(t, c)[1])
  base = run(toks, cache0)
  for l in range(CFG.n_layer):
    perturbed = cache0.ssm.at[l].add(S0)
    moved = run(toks, dataclasses.replace(cache0, ssm=perturbed))
    delta = np.asarray(moved.ssm[l] - base.ssm[l], np.float64)
    want = retention[l][:, :, None, None] * np.asarray(S0, np.float64)
    np.testing.assert_allclose(delta, want, atol=1e-5 * np.abs(S0).max())


def test_collect_statistics_match_direct_computation(model):
  toks = np.asarray(jax.random.randint(jax.random.key(4), (2, 45), 0, CFG.vocab_size), np.int32)
  stats, snaps = state_stats.collect(
    model, toks, 8, 16, snapshot_at=(32,), snapshot=(1, 2), progress=False
  )
  assert stats["norm"].shape == (5, CFG.n_layer, CFG.nheads)  # 45 -> 40 tokens, 5 points
  _, _, it = introspect.forward_with_internals(model, jnp.asarray(toks[:, :40]))
  log_decay = np.asarray(it.log_decay, np.float64)  # (L, b, 40, H)
  step = jax.jit(lambda t, c: model.prefill(t, c)[1])
  cache = model.init_cache(2)
  for k in range(5):
    t = 8 * (k + 1)
    cache = step(jnp.asarray(toks[:, t - 8 : t]), cache)
    h = np.asarray(cache.ssm, np.float64)  # (L, b, H, P, N)
    flat = h.reshape(*h.shape[:3], -1)
    _close(stats["norm"][k], np.linalg.norm(flat, axis=-1).mean(1))
    _close(stats["rms"][k], np.sqrt((flat**2).mean(-1)).mean(1))
    _close(stats["mean"][k], flat.mean(-1).mean(1))
    _close(stats["var"][k], flat.var(-1, ddof=1).mean(1))
    _close(stats["log_decay_sum"][k], log_decay[:, :, t - 8 : t].sum(2).mean(1), 1e-5)
    dt = np.asarray(it.dt[:, :, t - 8 : t], np.float64)
    _close(stats["dt_mean"][k], dt.mean((1, 2)))
    x = np.asarray(it.x[:, :, t - 8 : t], np.float64)
    _close(stats["x_var"][k], x.var(-1, ddof=1).mean((1, 2)))
    if t == 32:
      _close(snaps[32], h[1, :, 2])
  assert list(snaps) == [32]


def test_exploding_heads():
  pos = np.arange(1, 11) * 100
  norm = np.ones((10, 2, 3))
  norm[6:, 1, 2] = 5.0  # layer 1 head 2 explodes after t = 600
  norm[6:, 0, 0] = 1.5
  ratio, flagged = state_stats.exploding_heads(norm, pos, 500, 2.0)
  assert ratio.shape == (2, 3) and ratio[1, 2] == 5.0 and ratio[0, 0] == 1.5
  assert flagged == [{"layer": 1, "head": 2, "ratio": 5.0}]
  r2, f2 = state_stats.exploding_heads(norm, pos, 2000, 2.0)  # nothing beyond T_train
  assert np.isnan(r2).all() and f2 == []


def test_run_state_stats_files(model, tmp_path):
  cfg = get_task_config("state_stats")
  with cfg.unlocked():
    cfg.update(max_len=200, stat_chunk=16, chunk_len=64, plot_layers=(0, 2), progress=False)
  res = run_state_stats(model, "byte", cfg, tmp_path, train_len=64)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["positions"] == list(range(16, 193, 16))
  assert np.asarray(saved["explosion_ratio"]).shape == (CFG.n_layer, CFG.nheads)
  assert res["histogram"]["positions"] == [64, 192]
  with np.load(tmp_path / "stats.npz") as z:
    assert z["log_retention"].shape == (12, CFG.n_layer, CFG.nheads)
    assert np.all(np.diff(z["log_retention"], axis=0) <= 0)  # alpha_{1:t} never increases
  for name in (
    "state_norm.png",
    "retention.png",
    "explosion_ratio.png",
    "inputs.png",
    "state_hist.png",
  ):
    assert (tmp_path / name).stat().st_size > 1000
