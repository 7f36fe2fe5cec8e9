"""The evaluation binary and its model sources, mitigations and --mode=latest|all|watch (against
the real mamba2_jax.checkpoints reading side, on workdirs written by the trainer's Checkpointer)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.data import get_tokenizer
from configs.evaluate import get_config
from mamba2_jax.checkpoints import workdir as workdir_lib
from mamba2_jax.checkpoints.load import check_vocab, load_model
from mamba2_jax.eval import jobs
from mamba2_jax.mitigations import spec as mitigation_spec
from tests.paths import ROOT, cpu_env

SMALL = {
  "ppl_by_position": dict(max_len=300, chunk_len=64, bucket_size=32),
  "passkey": dict(lengths=(256, 300), num_samples=3, batch_size=2, chunk_len=128),
  "state_stats": dict(max_len=256, stat_chunk=32, chunk_len=128),
  "forgetting_curve": dict(max_dep_len=60, num_lengths=2, repeats=2, chunk_len=64),
}


def _cfg(task, **over):
  cfg = get_config(task)
  with cfg.unlocked():
    cfg.update({"progress": False, **SMALL[task], **over})
  return cfg


def _pngs(d):
  return [p for p in Path(d).glob("*.png") if p.stat().st_size > 500]


def test_cli_end_to_end_random_tiny(tmp_path):
  out = tmp_path / "ev"
  cmd = [
    sys.executable,
    "-m",
    "experiments.evaluate",
    "--checkpoint=random:tiny:3",
    f"--out={out}",
    "--config=configs/evaluate.py:ppl_by_position",
    "--config.max_len=400",
    "--config.chunk_len=128",
    "--config.bucket_size=32",
    "--config.train_len=128",
    "--config.progress=False",
  ]
  env = cpu_env()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((out / "results.json").read_text())
  assert res["train_len"] == 128 and res["checkpoint"]["source"] == "random:tiny:3"
  assert {p.name for p in _pngs(out)} == {"loss.png", "ppl.png"}
  line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
  assert line["task"] == "ppl_by_position" and line["step"] is None
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.evaluate",
      "--task=passkey",
      "--checkpoint=random:tiny",
      f"--out={out}",
      "--config=configs/evaluate.py:ppl_by_position",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert bad.returncode != 0 and "but the config is for" in bad.stderr
  # the same --out with a setting that changes results: refused (never exit 0 with stale
  # results), naming the difference; --overwrite evaluates afresh
  other = [c if c != "--config.max_len=400" else "--config.max_len=300" for c in cmd]
  stale = subprocess.run(other, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert stale.returncode != 0 and "config.max_len: 400 -> 300" in stale.stderr
  fresh = subprocess.run(
    other + ["--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
  )
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  assert json.loads((out / "results.json").read_text())["config"]["max_len"] == 300
  assert (out / "superseded").is_dir()


@pytest.mark.parametrize("task", ["passkey", "state_stats", "forgetting_curve"])
def test_evaluate_source_each_task(task, tmp_path):
  lines = jobs.evaluate_source("random:tiny", task, _cfg(task, train_len=128), tmp_path)
  assert len(lines) == 1 and lines[0]["task"] == task
  assert json.loads((tmp_path / "results.json").read_text())["task"] == task
  assert _pngs(tmp_path)


def test_converted_checkpoint_dir(tmp_path):
  from mamba2_jax.checkpoints.hub import OUR_CONFIG, OUR_PARAMS
  from mamba2_jax.checkpoints.params import save_params

  model = Mamba2LM(Mamba2Config.preset("tiny"), rngs=nnx.Rngs(5))
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  save_params(str(ckpt / OUR_PARAMS), model)
  (ckpt / OUR_CONFIG).write_text(model.config.to_json())
  loaded = load_model(str(ckpt), tokenizer="byte")
  assert loaded.tokenizer.name == "byte"
  jobs.evaluate_source(
    str(ckpt), "ppl_by_position", _cfg("ppl_by_position"), tmp_path / "o", tokenizer="byte"
  )
  assert (tmp_path / "o" / "results.json").exists()
  with pytest.raises(FileNotFoundError):
    load_model(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="only 259"):  # a tokenizer larger than the model's vocab
    check_vocab(model, type("T", (), {"vocab_size": 50277, "name": "big"})())


def test_parse_mitigation():
  assert mitigation_spec.parse_mitigation("") == (None, {})
  assert mitigation_spec.parse_mitigation("rri") == ("rri", {})
  assert mitigation_spec.parse_mitigation(
    "rri_decay_scale=0.9999, ssd_window=2048,state_norm=chunk"
  ) == (
    None,
    {"rri_decay_scale": 0.9999, "ssd_window": 2048, "state_norm": "chunk"},
  )
  assert mitigation_spec.parse_mitigation("state_norm,calibrate=2") == (
    "state_norm",
    {"calibrate": 2},
  )
  with pytest.raises(ValueError, match="two presets"):
    mitigation_spec.parse_mitigation("rri,longmamba")


def test_empty_mitigation_returns_the_model():
  model = object()
  assert mitigation_spec.apply_mitigation(model, "") is model


def test_mitigations_applied_through_with_mitigations(tmp_path):
  pytest.importorskip("mamba2_jax.mitigations", reason="no mamba2_jax.mitigations in this checkout")
  base = Mamba2LM(Mamba2Config.preset("tiny"), rngs=nnx.Rngs(0))
  m = mitigation_spec.apply_mitigation(base, "rri")
  assert (m.config.rri_decay_scale, m.config.rri_insert_scale) == (0.9999, 0.75)
  m = mitigation_spec.apply_mitigation(base, "rri_decay_scale=0.999,dt_scale=0.5")
  assert (m.config.rri_decay_scale, m.config.dt_scale) == (0.999, 0.5)
  m = mitigation_spec.apply_mitigation(base, "state_norm,calibrate=2,calibrate_len=64")
  tau = np.asarray(m.layers.mixer.state_norm_tau[...])
  assert m.config.state_norm == "chunk" and np.isfinite(tau).all() and (tau > 0).all()
  with pytest.raises(ValueError, match="calibrate"):
    mitigation_spec.apply_mitigation(base, "rri,calibrate=2")
  cfg = _cfg("ppl_by_position", mitigation="rri_decay_scale=0.9999,rri_insert_scale=0.75")
  lines = jobs.evaluate_source("random:tiny", "ppl_by_position", cfg, tmp_path)
  assert lines[0]["mitigation"] == "rri_decay_scale=0.9999,rri_insert_scale=0.75"


def test_introspection_follows_mitigated_mixers():
  """With RRI and dt_scale, the recomputed internals still reproduce the model's state."""
  mit = pytest.importorskip("mamba2_jax.mitigations", reason="no mamba2_jax.mitigations yet")
  import jax
  from mamba2_jax.eval import introspect

  base = Mamba2LM(Mamba2Config.preset("tiny", chunk_size=8), rngs=nnx.Rngs(0))
  model = mit.with_mitigations(base, rri_decay_scale=0.99, rri_insert_scale=0.5, dt_scale=0.7)
  toks = jax.random.randint(jax.random.key(0), (1, 24), 0, 256)
  _, cache, it = introspect.forward_with_internals(model, toks)
  cfg = model.config
  for l in range(cfg.n_layer):
    x, B, dt = (np.asarray(a, np.float64) for a in (it.x[l], it.B[l], it.dt[l]))
    Bh = np.repeat(B, cfg.nheads // cfg.ngroups, axis=2)
    decay = np.exp(np.asarray(it.log_decay[l], np.float64))  # (b, L, H), includes log c_a
    h = np.zeros(cache.ssm.shape[1:])
    for t in range(toks.shape[1]):  # h_t = alpha_t h_{t-1} + dt_t x_t B_t^T
      insert = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
      h = decay[:, t, :, None, None] * h + insert
    np.testing.assert_allclose(h, np.asarray(cache.ssm[l]), atol=1e-4 * np.abs(h).max())


# --- training workdirs ------------------------------------------------------------------------
ckpt_lib = pytest.importorskip("mamba2_jax.train.checkpoint")
TINY = Mamba2Config.preset("tiny")


def _save_steps(workdir, steps, seq_len=128, tbptt=2):
  model = Mamba2LM(TINY, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  os.makedirs(workdir, exist_ok=True)
  (Path(workdir) / "config.json").write_text(json.dumps({"seq_len": seq_len}))  # as the trainer
  ck = ckpt_lib.Checkpointer(str(workdir), save_every=1, async_save=False)
  for step in steps:
    meta = {
      "config": {"seq_len": seq_len, "tbptt_segments": tbptt},
      "model": json.loads(TINY.to_json()),
      "tokenizer": get_tokenizer("byte").identity(),
      "tokens_seen": step * 1000,
    }
    ck.save(step, params, {"x": jnp.zeros(2)}, None, meta, force=True)
  ck.close()


def _damage(workdir, step):
  """Breaks a step's params checksum (load_model raises CheckpointError); returns undo."""
  path = Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata"
  good = path.read_text()
  meta = json.loads(good)
  key = next(iter(meta["checksums"]["params"]))
  meta["checksums"]["params"][key] = "broken"
  path.write_text(json.dumps(meta))
  return lambda: path.write_text(good)


def _metrics(out):
  return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_modes_latest_and_all(tmp_path):
  wd, out = tmp_path / "wd", tmp_path / "out"
  _save_steps(wd, [10, 20])
  cfg = _cfg("ppl_by_position")
  lines = jobs.evaluate_source(str(wd), "ppl_by_position", cfg, out, mode="latest")
  assert [l["step"] for l in lines] == [20] and lines[0]["tokens_seen"] == 20000
  res = json.loads((out / "step_20" / "results.json").read_text())
  assert res["train_len"] == 256  # seq_len 128 x 2 TBPTT segments
  assert _pngs(out / "step_20")
  assert jobs.evaluate_source(str(wd), "ppl_by_position", cfg, out, mode="latest") == []
  lines = jobs.evaluate_source(str(wd), "ppl_by_position", cfg, out, mode="all")
  assert [l["step"] for l in lines] == [10]
  assert jobs.evaluate_source(str(wd), "ppl_by_position", cfg, out, mode="all") == []
  assert [m["step"] for m in _metrics(out)] == [20, 10]
  ledger = json.loads((out / jobs.LEDGER).read_text())
  assert sorted(ledger["evaluated"]) == ["10", "20"] and ledger["failed"] == {}
  with pytest.raises(ValueError, match="one output directory per task"):
    jobs.evaluate_source(str(wd), "passkey", _cfg("passkey"), out, mode="all")


def test_changed_settings_never_reuse_stale_results(tmp_path):
  """Issue 14 item 2: a workdir evaluated into OUT, then again with another max_len into the same
  OUT: refused, not "already evaluated"; cosmetic changes reuse; overwrite evaluates afresh."""
  wd, out = tmp_path / "wd", tmp_path / "out"
  _save_steps(wd, [20])
  cfg = _cfg("ppl_by_position")
  jobs.evaluate_source(str(wd), "ppl_by_position", cfg, out)
  cosmetic = _cfg("ppl_by_position", chunk_len=32, ppl_ymax=0.0)
  assert jobs.evaluate_source(str(wd), "ppl_by_position", cosmetic, out) == []
  shorter = _cfg("ppl_by_position", max_len=200)
  with pytest.raises(jobs.SettingsMismatch, match="config.max_len: 300 -> 200"):
    jobs.evaluate_source(str(wd), "ppl_by_position", shorter, out)
  with pytest.raises(jobs.SettingsMismatch, match="tokenizer: '' -> 'byte'"):
    jobs.evaluate_source(str(wd), "ppl_by_position", cfg, out, tokenizer="byte")
  old_key = json.loads((out / "step_20" / "results.json").read_text())["settings_key"]
  lines = jobs.evaluate_source(str(wd), "ppl_by_position", shorter, out, overwrite=True)
  res = json.loads((out / "step_20" / "results.json").read_text())
  assert [l["step"] for l in lines] == [20] and res["config"]["max_len"] == 200
  assert res["settings_key"] == lines[0]["settings_key"] != old_key
  assert res["settings"]["config"]["max_len"] == 200 and "progress" not in res["settings"]["config"]
  old = json.loads((out / "superseded" / old_key / "step_20" / "results.json").read_text())
  assert old["config"]["max_len"] == 300
  assert [m["settings_key"] for m in _metrics(out)] == [res["settings_key"]]


def test_step_directory_evaluates_that_step(tmp_path):
  """--checkpoint=WORKDIR/checkpoints/10 evaluates step 10, once, into OUT (it used to say "no
  complete checkpoint step yet")."""
  wd, out = tmp_path / "wd", tmp_path / "out"
  _save_steps(wd, [10, 20])
  step_dir = str(wd / "checkpoints" / "10")
  lines = jobs.evaluate_source(step_dir, "ppl_by_position", _cfg("ppl_by_position"), out)
  assert [l["step"] for l in lines] == [10]
  assert json.loads((out / "results.json").read_text())["checkpoint"]["step"] == 10


def test_mode_watch_follows_training_and_retries_damaged_steps(tmp_path):
  wd, out = tmp_path / "wd", tmp_path / "out"
  _save_steps(wd, [10, 20])
  undo = _damage(wd, 20)
  sleeps = []

  def fake_sleep(seconds):  # the "trainer" progresses between polls
    sleeps.append(seconds)
    if len(sleeps) == 1:
      undo()
      _save_steps(wd, [30])
    elif len(sleeps) == 2:
      workdir_lib.mark_train_complete(str(wd), {"step": 30})

  lines = jobs.evaluate_source(
    str(wd),
    "ppl_by_position",
    _cfg("ppl_by_position"),
    out,
    mode="watch",
    poll_interval_s=7,
    sleep=fake_sleep,
  )
  assert [l["step"] for l in lines] == [10, 20, 30] and sleeps == [7, 7]
  ledger = json.loads((out / jobs.LEDGER).read_text())
  assert sorted(ledger["evaluated"], key=int) == ["10", "20", "30"] and ledger["failed"] == {}
  assert [m["step"] for m in _metrics(out)] == [10, 20, 30]
  # a restarted watcher finds everything done and stops at once
  assert (
    jobs.evaluate_source(
      str(wd), "ppl_by_position", _cfg("ppl_by_position"), out, mode="watch", sleep=fake_sleep
    )
    == []
  )
  assert len(sleeps) == 2


def test_mode_watch_gives_up_after_training_completes(tmp_path):
  wd, out = tmp_path / "wd", tmp_path / "out"
  _save_steps(wd, [10, 20])
  _damage(wd, 10)
  workdir_lib.mark_train_complete(str(wd), {"step": 20})
  sleeps = []
  lines = jobs.evaluate_source(
    str(wd),
    "ppl_by_position",
    _cfg("ppl_by_position"),
    out,
    mode="watch",
    max_attempts=2,
    sleep=sleeps.append,
  )
  assert [l["step"] for l in lines] == [20] and len(sleeps) == 1
  failed = json.loads((out / jobs.LEDGER).read_text())["failed"]
  assert failed["10"]["attempts"] == 2 and "CheckpointError" in failed["10"]["error"]
  with pytest.raises(RuntimeError, match="latest step"):  # latest = 20 done; damage it too
    _damage(wd, 20)
    jobs.evaluate_source(str(wd), "ppl_by_position", _cfg("ppl_by_position"), tmp_path / "o2")
