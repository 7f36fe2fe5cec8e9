"""The trainer in-process, on the 8 simulated CPU devices (tests/conftest.py).

Sharded steps equal the single-device step; gradient accumulation and truncated BPTT; config
validation; checkpoints: restore onto another mesh / device count, corrupted bytes and a
deleted newest step fall back to the previous step, a NaN stops the run with the last good
checkpoint kept; the evaluation-side loader. Subprocess tests (SIGKILL / SIGTERM, two
jax.distributed processes) are in test_train_process.py.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import train as train_configs
from mamba2_jax.config import ConfigError
from mamba2_jax import checkpoints
from mamba2_jax.checkpoints import workdir as workdir_lib
from mamba2_jax.train import checkpoint as ckpt_lib
from mamba2_jax.train.config import validate
from mamba2_jax.train.loop import TrainingDiverged, build, train_and_evaluate
from mamba2_jax.train.sharding import make_mesh
from tests.paths import FIXTURES


def tiny_config(**overrides):
  c = train_configs.get_config("tiny")
  c.seq_len, c.global_batch_size, c.total_steps = 32, 8, 6
  c.checkpoint_every, c.log_every = 2, 1
  c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 2
  c.model.d_model, c.model.chunk_size = 32, 16
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  rows = config.tbptt_segments * config.seq_len + 1
  return {"tokens": rng.integers(0, 256, (config.global_batch_size, rows)).astype(np.int32)}


def _setup(config, mesh_shape, devices=None):
  mesh = make_mesh(mesh_shape, devices)
  mc = validate(config, num_devices=mesh.size).replace(fused_in_proj=False)
  return build(config, mc, mesh)


def _run_steps(setup, state, batches, key="loss"):
  out = []
  for b in batches:
    batch = {k: jax.device_put(v, setup.data_shard) for k, v in b.items()}
    with jax.set_mesh(setup.mesh):
      state, m = setup.train_step(state, batch)
    out.append(float(m[key]))
  return state, out


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ------------------------------------------------------------------------------------ sharding
# every axis at once, and fsdp x tensor (tests/train/test_context_parallel.py adds context)
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_sharded_step_matches_single_device(mesh_shape):
  config = tiny_config()
  batches = [_batch(config, s) for s in range(3)]
  one = _setup(config, (1, 1, 1), jax.devices()[:1])
  many = _setup(config, mesh_shape)
  s1 = one.init_state(0)
  s8 = jax.device_put(_host(s1), many.state_shard)
  if mesh_shape[1] > 1:  # FSDP really shards the embedding and the projections
    assert s8["params"]["embedding"].sharding.spec[1] == ("fsdp", "context")  # context 1 here
  if mesh_shape[2] > 1:
    assert s8["params"]["layers"]["mixer"]["in_proj_x"].sharding.spec[2] == "tensor"
  s1, l1 = _run_steps(one, s1, batches)
  s8, l8 = _run_steps(many, s8, batches)
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(_host(s8["params"])), jax.tree.leaves(_host(s1["params"]))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_sharded_step_with_pallas_kernel_matches():
  """ssd_impl="pallas_tpu" (interpret mode) runs per shard through shard_map in the step."""
  config = tiny_config(**{"model.ssd_impl": "pallas_tpu", "model.n_layer": 1})
  batches = [_batch(config, s) for s in range(2)]
  ref = _setup(
    tiny_config(**{"model.ssd_impl": "xla", "model.n_layer": 1}), (1, 1, 1), jax.devices()[:1]
  )
  pal = _setup(config, (2, 2, 2))
  s_ref = ref.init_state(0)
  s_pal = jax.device_put(_host(s_ref), pal.state_shard)
  _, l_ref = _run_steps(ref, s_ref, batches)
  _, l_pal = _run_steps(pal, s_pal, batches)
  np.testing.assert_allclose(l_pal, l_ref, rtol=1e-4)


@pytest.mark.parametrize("granularity", ["chunk", "token"])
def test_training_with_state_normalization_keeps_tau_fixed(granularity):
  """The mitigation trains: finite losses, thresholds that never change (no gradient, no weight
  decay), and trained states under them where the same weights without it exceed them."""
  tau = 0.05
  kw = {
    "model.state_norm": granularity,
    "model.state_norm_threshold": tau,
    "model.state_norm_chunk": 8,
    "optimizer.weight_decay": 0.1,
  }
  config = tiny_config(**kw)
  batches = [_batch(config, s) for s in range(3)]
  setup = _setup(config, (2, 1, 1), jax.devices()[:2])
  state = setup.init_state(0)
  tau0 = _host(state["params"]["layers"]["mixer"]["state_norm_tau"])
  state, losses = _run_steps(setup, state, batches)
  assert all(np.isfinite(losses))
  params = _host(state["params"])
  np.testing.assert_array_equal(params["layers"]["mixer"]["state_norm_tau"], tau0)

  def state_norms(graphdef, p):
    _, cache = nnx.merge(graphdef, p).prefill(jnp.asarray(batches[0]["tokens"][:2, :32]))
    return np.sqrt(np.sum(np.square(np.asarray(cache.ssm)), axis=(-2, -1)))  # 32 = 4 blocks

  plain = _setup(tiny_config(), (1, 1, 1), jax.devices()[:1])
  del params["layers"]["mixer"]["state_norm_tau"]
  assert state_norms(plain.graphdef, params).max() > 2 * tau  # the norm is active
  params["layers"]["mixer"]["state_norm_tau"] = tau0
  assert state_norms(setup.graphdef, params).max() <= tau * (1 + 1e-5)


def test_grad_accumulation_equals_one_big_batch():
  base = tiny_config()
  acc = tiny_config(grad_accum_steps=4)
  batches = [_batch(base, s) for s in range(2)]
  a, b = _setup(base, (2, 1, 1), jax.devices()[:2]), _setup(acc, (2, 1, 1), jax.devices()[:2])
  s0 = a.init_state(0)
  sa, la = _run_steps(a, s0, batches)
  sb, lb = _run_steps(b, jax.device_put(b.init_state(0), b.state_shard), batches)
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(_host(sb["params"])), jax.tree.leaves(_host(sa["params"]))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_tbptt_same_loss_truncated_gradient():
  """P=2 segments of T with the state carried: the same forward (loss) as one sequence of 2T,
  but a truncated gradient."""
  full = tiny_config(seq_len=32)
  tb = tiny_config(seq_len=16, tbptt_segments=2)
  batch = _batch(full, 3)  # rows of 33 = 2 * 16 + 1 tokens
  f, t = _setup(full, (1, 1, 1), jax.devices()[:1]), _setup(tb, (1, 1, 1), jax.devices()[:1])
  s0 = _host(f.init_state(0))
  _, lf = _run_steps(f, jax.device_put(s0, f.state_shard), [batch])
  _, lt = _run_steps(t, jax.device_put(s0, t.state_shard), [batch])
  np.testing.assert_allclose(lt, lf, rtol=1e-5)
  _, gf = _run_steps(f, jax.device_put(s0, f.state_shard), [batch], key="grad_norm")
  _, gt = _run_steps(t, jax.device_put(s0, t.state_shard), [batch], key="grad_norm")
  # the second segment's loss does not send gradient back into the first segment
  assert abs(gt[0] - gf[0]) > 1e-4 * gf[0]


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
  "field,value,match",
  [
    (
      "optimizer.schedule",
      "linear",
      r"config.optimizer.schedule: must be one of \('wsd', 'cosine', 'constant'\), got 'linear'",
    ),
    (
      "mesh_shape",
      (3, 1, 1),
      r"config.mesh_shape: the product of the sizes of .* must equal the 8 devices",
    ),
    ("mesh_shape", (-1, -1, 1), "may contain -1 at most once"),
    ("global_batch_size", 6, "divisible by the data-parallel size data\\*fsdp = 8"),
    ("grad_accum_steps", 3, "config.global_batch_size: must be divisible by grad_accum_steps=3"),
    ("data.packing", "pack", r"config.data.packing: must be one of \('concat', 'segments'\)"),
    ("model.headdim", 48, "config.model: Mamba2Config.headdim"),
    ("optimizer.lr", -1.0, "config.optimizer.lr: must be > 0.0"),
    ("seq_len", 0, "config.seq_len: must be an integer >= 1"),
    (
      "model.state_norm",
      "chunk",
      "config.model.state_norm_threshold: must be finite when "
      "training with model.state_norm='chunk'",
    ),
    (
      "model.rri_decay_scale",
      1.5,
      r"config.model: Mamba2Config.rri_decay_scale: must be in \(0, 1\]",
    ),
  ],
)
def test_config_errors_name_the_field(field, value, match):
  with pytest.raises(ConfigError, match=match):
    validate(tiny_config(**{field: value}), num_devices=8)


def test_incompatible_workdir_refuses_to_resume(tmp_path, caplog):
  # a first start that fails before any checkpoint (vocab below the byte tokenizer's) leaves
  # config.json, which binds nothing: the corrected command starts, replacing it
  with pytest.raises(ConfigError, match="model.vocab_size"):
    train_and_evaluate(tiny_config(**{"model.vocab_size": 100}), str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["model"]["vocab_size"] == 100
  train_and_evaluate(tiny_config(total_steps=2), str(tmp_path))
  assert "holds no checkpoint: its config.json is replaced" in caplog.text
  assert json.load(open(tmp_path / "config.json"))["model"]["vocab_size"] == 259
  # with a checkpoint the workdir is bound to its config
  with pytest.raises(
    ConfigError, match=r"different config: seq_len: 32 -> 64.*allow_config_change"
  ):
    train_and_evaluate(tiny_config(total_steps=2, seq_len=64), str(tmp_path))
  # resume-safe fields may change (more steps); the marker of the shorter run is dropped
  train_and_evaluate(tiny_config(total_steps=4), str(tmp_path))
  assert json.load(open(tmp_path / "train_complete"))["step"] == 4


# ------------------------------------------------------------------------------------ checkpoints
def _train(tmp_path, **kw):
  config = tiny_config(**kw)
  last = train_and_evaluate(config, str(tmp_path))
  return config, last


def test_run_writes_workdir_and_eval_loader(tmp_path):
  config, last = _train(tmp_path, eval_every=3, eval_batches=1)
  assert checkpoints.complete_steps(tmp_path) == [2, 4, 6]
  assert checkpoints.is_train_complete(tmp_path)
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  steps = [x["step"] for x in lines if "loss" in x]
  assert steps == list(range(1, 7)) and all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
  assert [x["step"] for x in lines if "eval/loss" in x] == [3, 6]
  train = [x for x in lines if "loss" in x]
  assert train[-1]["loss"] < train[0]["loss"]
  assert os.listdir(tmp_path / "tensorboard")
  model, meta = checkpoints.load_workdir_model(str(tmp_path))
  assert meta["step"] == 6 and meta["config"]["seq_len"] == 32
  assert meta["tokenizer"]["name"] == "byte" and meta["tokens_seen"] == 6 * 8 * 32
  logits = model(jnp.zeros((1, 5), jnp.int32))
  assert logits.shape == (1, 5, model.config.padded_vocab_size)
  assert last["step"] == 6


def _restore(workdir, config, mesh_shape, devices=None, step=None):
  setup = _setup(config, mesh_shape, devices)
  ck = ckpt_lib.Checkpointer(str(workdir), save_every=config.checkpoint_every)
  try:
    if step is None:
      out = ck.restore_latest(setup.abstract_params, setup.abstract_opt)
      return setup, out
    return setup, (step, *ck.restore(step, setup.abstract_params, setup.abstract_opt))
  finally:
    ck.close()


def test_restore_onto_another_mesh_and_device_count(tmp_path):
  config, _ = _train(tmp_path)  # saved from an 8-way data-parallel mesh
  ref_setup, (step, p_ref, o_ref, _, _) = _restore(tmp_path, config, (8, 1, 1))
  for shape, devs in [((2, 2, 2), None), ((1, 2, 2), jax.devices()[:4])]:
    setup, (s, p, o, _, _) = _restore(tmp_path, config, shape, devs)
    assert s == step == 6
    emb = p["embedding"]
    assert emb.sharding.mesh.devices.size == (8 if devs is None else 4)
    assert emb.sharding.spec == setup.state_shard["params"]["embedding"].spec
    for a, b in zip(jax.tree.leaves(_host((p, o))), jax.tree.leaves(_host((p_ref, o_ref)))):
      np.testing.assert_array_equal(a, b)


def _largest_file(d):
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
  return max(files, key=os.path.getsize)


def test_corrupted_byte_is_detected_and_falls_back(tmp_path, caplog):
  config, _ = _train(tmp_path)
  path = _largest_file(tmp_path / "checkpoints" / "6" / "params")
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(checkpoints.CheckpointError, match="checkpoint step 6"):
    _restore(tmp_path, config, (8, 1, 1), step=6)
  _, out = _restore(tmp_path, config, (8, 1, 1))
  assert out[0] == 4
  assert "checkpoint step 6" in caplog.text


def test_silently_wrong_bytes_fail_the_checksum(tmp_path):
  """Orbax returns whatever is stored: a step whose arrays differ from the recorded
  fingerprints is rejected by the checksum, naming the array."""
  config, _ = _train(tmp_path)
  setup = _setup(config, (8, 1, 1))
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=1)
  p, o, _ = ck.restore(6, setup.abstract_params, setup.abstract_opt)
  meta = workdir_lib.read_meta(str(tmp_path), 6)
  tampered = jax.tree.map(lambda x: x, p)
  tampered["norm_f"] = p["norm_f"].at[3].add(1e-3)
  ck.mngr.save(
    8,
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(tampered),
      opt_state=ocp.args.StandardSave({"opt_state": o}),
      meta=ocp.args.JsonSave({**meta, "step": 8}),
    ),
    force=True,
  )
  ck.wait()
  with pytest.raises(
    checkpoints.CheckpointError, match=r"step 8: params checksum mismatch in 1 array\(s\) \(norm_f"
  ):
    ck.restore(8, setup.abstract_params, setup.abstract_opt)
  ck.close()
  assert checkpoints.fingerprint({"a": jnp.arange(8.0)}) != checkpoints.fingerprint(
    {"a": jnp.arange(8.0)[::-1]}
  )  # position-dependent


def test_deleted_newest_step_falls_back(tmp_path):
  import shutil

  config, _ = _train(tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "6" / "opt_state")
  _, out = _restore(tmp_path, config, (8, 1, 1))
  assert out[0] == 4
  # the trainer resumes from step 4, moves the damaged step aside and trains again up to 6
  train_and_evaluate(tiny_config(), str(tmp_path))
  assert checkpoints.complete_steps(tmp_path)[-1] == 6
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_damaged").iterdir()] == ["6"]
  assert "opt_state" in os.listdir(tmp_path / "checkpoints" / "6")


def test_nan_stops_with_last_good_checkpoint(tmp_path):
  config = tiny_config(
    checkpoint_every=1,
    total_steps=10,
    **{"optimizer.lr": 1e30, "optimizer.clip_norm": 0.0, "optimizer.warmup_steps": 0},
  )
  with pytest.raises(
    TrainingDiverged,
    match=r"non-finite .* at step (\d+); stopping without "
    r"saving. Last good checkpoint: step \d+",
  ) as e:
    train_and_evaluate(config, str(tmp_path))
  bad = int(str(e.value).split(" at step ")[1].split(";")[0])
  steps = checkpoints.complete_steps(tmp_path)
  assert steps and max(steps) == bad - 1
  assert not checkpoints.is_train_complete(tmp_path)
  _, meta = checkpoints.load_workdir_model(str(tmp_path))
  assert meta["step"] == bad - 1


def test_init_from_pretrained_checkpoint(tmp_path):
  """config.init_checkpoint starts from an HF checkpoint's weights (continued pretraining)."""
  from flax import nnx

  from configs import base
  from mamba2_jax.checkpoints.hub import from_pretrained, load_config

  path = str(FIXTURES / "hf_tiny_g2")
  ref = nnx.to_pure_dict(nnx.state(from_pretrained(path)))
  mc, _ = load_config(path)
  config = tiny_config(
    init_checkpoint=path,
    total_steps=2,
    **{
      "data.source": "synthetic:copy:vocab=64,span=8,pairs=1,docs=64",
      "data.tokenizer": "synthetic",
      "data.add_eos": False,
    },
  )
  config.model = base.model_config("tiny", **{k: v for k, v in mc.to_dict().items()})
  setup = _setup(config, (2, 2, 2))
  state = setup.state_from_pretrained(path)
  for a, b in zip(jax.tree.leaves(_host(state["params"])), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, np.asarray(b))
  train_and_evaluate(config, str(tmp_path))
  assert checkpoints.complete_steps(tmp_path)[-1] == 2
  bad = tiny_config(init_checkpoint=path)
  with pytest.raises(ConfigError, match="init_checkpoint .* the model shapes differ .*d_model"):
    _setup(bad, (1, 1, 1), jax.devices()[:1]).state_from_pretrained(path)
