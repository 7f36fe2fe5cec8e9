"""Context parallelism in the trainer, on the 8 simulated CPU devices (tests/conftest.py).

The train step on meshes whose "context" axis splits every sequence (2, 4 and 8 shards, alone
and with data / fsdp / tensor axes) equals the single-device step in fp32: the loss and every
gradient (captured by an optimizer that stores them as its state), for the `xla` impl and both
Pallas impls (interpret mode), on rows of packed documents whose boundaries fall inside shards,
exactly on shard edges, and span several shards; TBPTT with gradient accumulation; the compiled
step exchanges only summaries and halos and a rematerialised layer repeats none of them; config
errors; a checkpoint saved with context 1 resumes with context 2 to the same next loss. The CLI
run is in tests/e2e/test_train_context.py.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import context_parallel
from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.config import ConfigError
from mamba2_jax.train.config import resolve_mesh_shape, validate
from mamba2_jax.train.loop import build, train_and_evaluate
from mamba2_jax.train.sharding import make_mesh, token_spec
from mamba2_jax.train.step import StepConfig, make_train_step
from tests.train.test_train import _host, tiny_config

SEQ = 48  # 6 tokens per shard with context 8, 12 with 4, 24 with 2 (no model size is 6 or 48)


def _config(**kw):
  base = {"seq_len": SEQ, "model.n_layer": 1, "model.scan_unroll": 1, "model.ssd_impl": "xla"}
  return tiny_config(**{**base, **kw})


def _packed_segments(b, rows):
  """Per row: boundaries inside shards, exactly on shard edges (12 for context 4 and 8, 24 for
  all), a document spanning several shards (24..40: three shards of context 8), padding (id 0)
  at the end of some rows."""
  seg = np.ones((b, rows), np.int32)
  for r in range(b):
    for e in (2 + r, 12, 15 + r % 4, 24, 40 + r % 3):
      seg[r, e:] += 1
    if r % 2:
      seg[r, rows - 5 - r :] = 0
  return seg


def _batch(config, seed=0, segments=True):
  rng = np.random.default_rng(seed)
  rows = config.tbptt_segments * config.seq_len + 1
  out = {"tokens": rng.integers(0, 256, (config.global_batch_size, rows)).astype(np.int32)}
  if segments:
    out["segment_ids"] = _packed_segments(config.global_batch_size, rows)
  return out


def _capture_grads():
  """An optimizer that applies nothing and keeps the step's (mean) gradient as its state."""
  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
  return optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))


def _grad_step(config, mesh_shape):
  """(jitted train step with the gradient-capturing optimizer, mesh, state shardings, data
  sharding): the trainer's `make_train_step` with the loop's shardings and token spec."""
  size = math.prod(resolve_mesh_shape(mesh_shape, math.prod(abs(s) for s in mesh_shape)))
  mesh = make_mesh(mesh_shape, jax.devices()[:size])
  config = copy.deepcopy(config)
  config.mesh_shape = tuple(mesh_shape)
  mc = validate(config, num_devices=size).replace(fused_in_proj=False)
  setup = build(config, mc, mesh)
  p_shard = setup.state_shard["params"]
  shard = {"params": p_shard, "opt_state": p_shard, "step": setup.state_shard["step"]}
  cfg = StepConfig(
    config.seq_len,
    config.tbptt_segments,
    config.grad_accum_steps,
    token_spec(mesh, config.logical_axis_rules),
  )
  step = make_train_step(setup.graphdef, _capture_grads(), cfg, lambda b: Mamba2Cache.zeros(mc, b))
  return jax.jit(step, in_shardings=(shard, setup.data_shard)), mesh, shard, setup


def _params(setup, seed=0):
  """Random parameters in the ranges of the model's init (built on the host: initialising the
  model under jit costs more than the steps compared here)."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "A_log" in name:
      v = np.log(rng.uniform(1.0, 16.0, a.shape))
    elif "dt_bias" in name:
      v = rng.uniform(-6.0, -2.5, a.shape)
    elif "norm" in name or name.endswith("['D']"):
      v = 1.0 + 0.1 * rng.standard_normal(a.shape)
    else:
      v = rng.uniform(-1.0, 1.0, a.shape) / np.sqrt(max(a.shape[-2] if a.ndim > 1 else 4, 1))
    return v.astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, setup.abstract_params)


def _loss_and_grads(config, mesh_shape, params, batch):
  """(loss, gradients, compiled HLO text) of one step."""
  step, mesh, shard, setup = _grad_step(config, mesh_shape)
  state = jax.device_put(
    {"params": params, "opt_state": params, "step": np.zeros((), np.int32)}, shard
  )
  batch = {k: jax.device_put(v, setup.data_shard) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
    new, metrics = compiled(state, batch)
  return float(metrics["loss"]), _host(new["opt_state"]), compiled.as_text()


_REF = {}


def _reference(config, segments):
  """Single-device loss and gradients (cached per step shape and batch kind), the parameters
  and the batch."""
  key = (config.tbptt_segments, config.grad_accum_steps, config.model.remat_policy, segments)
  if key not in _REF:
    config = copy.deepcopy(config)
    config.model.ssd_impl = "xla"
    params = _params(_grad_step(config, (1, 1, 1, 1))[3])
    batch = _batch(config, segments=segments)
    _REF[key] = (params, batch, *_loss_and_grads(config, (1, 1, 1, 1), params, batch)[:2])
  return _REF[key]


def _assert_same(config, mesh_shape, segments=True):
  """Loss (relative 1e-5) and every gradient (max error <= 1e-5 x the largest entry of that
  gradient) equal the single-device step's; returns the compiled step's HLO text."""
  params, batch, loss1, g1 = _reference(config, segments)
  loss, g, hlo = _loss_and_grads(config, mesh_shape, params, batch)
  np.testing.assert_allclose(loss, loss1, rtol=1e-5)
  flat1 = jax.tree_util.tree_flatten_with_path(g1)[0]
  for (path, a), b in zip(flat1, jax.tree.leaves(g)):
    scale = float(np.max(np.abs(a)))
    err = float(np.max(np.abs(b - a)))
    assert err <= 1e-5 * scale, f"{jax.tree_util.keystr(path)}: {err:.3g} > 1e-5 * {scale:.3g}"
  return hlo


# mesh (data, fsdp, context, tensor), impl; the Pallas cases (interpret mode, about 20 s each
# on CPU) are left out of the quick run, where tests/ssd/test_ssd_context.py covers them per op
CASES = [
  ((1, 1, 8, 1), "xla"),
  ((1, 2, 2, 2), "xla"),
  pytest.param((2, 1, 4, 1), "pallas_tpu", marks=pytest.mark.slow),
  pytest.param((1, 1, 4, 2), "pallas_gpu", marks=pytest.mark.slow),
]
CASE_IDS = ["1x1x8x1-xla", "1x2x2x2-xla", "2x1x4x1-pallas_tpu", "1x1x4x2-pallas_gpu"]


def _collectives(hlo):
  out = {}
  for op in ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all"):
    out[op] = [ln for ln in hlo.splitlines() if re.search(rf" {op}(-start)?\(", ln)]
  return out


def _check_collectives(hlo, config):
  """One layer, context 8, packed documents, remat="full". The exchanges made in `shard_map`:
  the forward sends 3 conv halos + 1 halo of segment ids and gathers the shards' last ids,
  carry factors and states; the backward sends the 3 halo cotangents back and gathers the state
  cotangents. So the rematerialised layer repeats none of the forward's exchanges (saving
  nothing: 10 permutes, 6 gathers), and their bytes per layer are the analytic figure of
  benchmarks/context_parallel.py. The partitioner's own collectives (FSDP over context: the
  parameters' gathers and the gradients' reductions; the token ids gathered for the embedding
  lookup; in this unfused-projection path the dt projection's outputs) move at most H = 4
  values per token, never a (tokens, d_model) activation."""
  ops = _collectives(hlo)
  mine = {k: [ln for ln in v if "shard_map" in ln] for k, v in ops.items()}
  assert len(mine["collective-permute"]) == 7, mine["collective-permute"]
  assert len(mine["all-gather"]) == 4, mine["all-gather"]
  assert not mine["reduce-scatter"] and not mine["all-to-all"]
  for ln in sum(mine.values(), []):
    shapes = re.findall(r"\[([\d,]+)\]", ln.split("=")[1].split("(")[0])
    assert not any(d in ("48", "6") for s in shapes for d in s.split(",")), ln
  b, mc = config.global_batch_size, validate(config, num_devices=8)
  got = context_parallel.hlo_exchange_bytes(hlo, 8)
  assert got["per_layer"] == context_parallel.analytic_exchange_bytes(mc, b, 8), got
  assert got["per_step"] == b * (mc.d_conv - 1) * 4 + b * 4  # segment-id halo, last ids
  for ln in sum(ops.values(), []):
    for s in re.findall(r"\[([\d,]+)\]", ln.split("=")[1].split("(")[0]):
      dims = [int(d) for d in s.split(",")]
      if 48 in dims or 6 in dims:
        assert math.prod(dims) <= b * SEQ * mc.nheads, ln


@pytest.mark.parametrize("mesh_shape,impl", CASES, ids=CASE_IDS)
def test_context_step_equals_single_device(mesh_shape, impl):
  """Packed documents, remat="full" (the pod presets'); the reference is the single-device
  `xla` step: every impl on every context mesh equals it."""
  config = _config(**{"model.ssd_impl": impl, "model.remat_policy": "full"})
  hlo = _assert_same(config, mesh_shape)
  if mesh_shape == (1, 1, 8, 1):
    _check_collectives(hlo, config)


def test_context_with_tbptt_and_grad_accumulation():
  """Context 2 alone: two TBPTT segments (the state handed on is the replicated final state,
  the conv context the last shard's rows) and two accumulated micro-batches; without segment
  ids and without remat (the other paths of the SSD and the conv)."""
  config = _config(tbptt_segments=2, grad_accum_steps=2, seq_len=32)
  _assert_same(config, (1, 1, 2, 1), segments=False)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      {"mesh_shape": (1, 1, 8, 1), "seq_len": 36},
      r"config.seq_len: must be divisible by the context-parallel size 8 .* got 36",
    ),
    (
      {"mesh_shape": (1, 1, 8, 1), "seq_len": 16},
      r"config.seq_len: must give each of the 8 context shards at least d_conv - 1 = 3",
    ),
    (
      {"mesh_shape": (2, 1, 3, 1)},
      r"config.mesh_shape: the product of the sizes of \('data', 'fsdp', 'context', 'tensor'\)"
      r" \(2 x 1 x 3 x 1 = 6\) must equal the 8 devices",
    ),
    ({"mesh_shape": (2, 2)}, r"config.mesh_shape: must be 4 sizes for the axes"),
    (
      {"mesh_shape": (1, 1, 8, 1), "model.ssd_window": 4},
      r"config.model.ssd_window: is not supported with context parallelism",
    ),
    (
      {"logical_axis_rules": (("length", "sequence"),)},
      r"config.logical_axis_rules: mesh axes must be in \('data', 'fsdp', 'context', 'tensor'\)",
    ),
  ],
)
def test_context_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    validate(_config(**overrides), num_devices=8)


def test_three_sizes_mean_context_one():
  assert resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 1, 2)
  assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1, 1)
  assert resolve_mesh_shape((1, 1, -1, 1), 8) == (1, 1, 8, 1)
  mesh = make_mesh((2, 2, 2))
  assert mesh.axis_names == ("data", "fsdp", "context", "tensor") and mesh.shape["context"] == 1
  validate(_config(mesh_shape=(1, 1, -1, 1), seq_len=40), num_devices=8)  # 40 / 8 = 5 tokens


# ------------------------------------------------------------------------------------ checkpoints
def _losses(workdir):
  out = {}
  for line in open(workdir / "metrics.jsonl"):
    rec = json.loads(line)
    if "loss" in rec:
      out.setdefault(rec["step"], []).append(rec["loss"])
  return out


def test_checkpoint_from_context_1_resumes_with_context_2(tmp_path):
  """Steps 1-3 on a data-parallel mesh given by three sizes (the shape of configs from before the
  context axis); step 3's checkpoint removed; the run resumed from step 2 on (4, 1, 2, 1) logs
  the same loss for step 3 (same data iterator state, same parameters and optimizer state)."""
  kw = dict(total_steps=3, checkpoint_every=2, seq_len=32)
  train_and_evaluate(_config(mesh_shape=(8, 1, 1), **kw), str(tmp_path))
  first = _losses(tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "3")
  train_and_evaluate(_config(mesh_shape=(4, 1, 2, 1), **kw), str(tmp_path))
  losses = _losses(tmp_path)  # the resumed run replaced the rows past step 2
  assert sorted(losses) == [1, 2, 3] and all(len(v) == 1 for v in losses.values())
  np.testing.assert_allclose(losses[3][0], first[3][0], rtol=1e-5)
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["mesh_shape"] == [4, 1, 2, 1]
