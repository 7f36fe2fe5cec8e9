"""mamba2_jax.checkpoints: load_model on every kind of model source, and the workdir layout."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.checkpoints import CheckpointError, from_pretrained, load_model
from mamba2_jax.checkpoints import workdir as workdir_lib
from mamba2_jax.checkpoints.hub import OUR_CONFIG, OUR_PARAMS
from mamba2_jax.checkpoints.load import (
  is_pretrained_dir,
  is_workdir,
  load_workdir_model,
  split_step_dir,
)
from mamba2_jax.checkpoints.params import save_params
from mamba2_jax.data import TokenizerMismatchError, get_tokenizer
from mamba2_jax.errors import InvalidInput, UserError
from tests.paths import FIXTURES

TINY = Mamba2Config.preset("tiny")
SYNTH = "synthetic-copy-v64"  # fits the fixtures' 100-id vocabulary (byte has 259 ids)


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(_params(a)), jax.tree.leaves(_params(b))):
    np.testing.assert_array_equal(x, y)


def test_random_source():
  loaded = load_model("random:tiny:3")
  assert loaded.tokenizer.name == "byte" and loaded.model.config == TINY
  assert loaded.meta == {"source": "random:tiny:3", "step": None, "train_len": None}
  _assert_same_params(loaded.model, Mamba2LM(TINY, rngs=nnx.Rngs(3)))
  assert load_model("random:tiny", model_dtype="bfloat16").model.config.dtype == "bfloat16"
  for bad in ("random:", "random:tiny:1:2"):
    with pytest.raises(ValueError, match="random:<preset>"):
      load_model(bad)
  with pytest.raises(ValueError, match="training workdirs only"):
    load_model("random:tiny", step=3)


@pytest.mark.parametrize("name", ["hf_tiny_g2", "official_tiny_g2"])
def test_hub_directories(name):
  path = str(FIXTURES / name)
  assert is_pretrained_dir(path) and not is_workdir(path)
  loaded = load_model(path, tokenizer=SYNTH)
  assert loaded.tokenizer.name == SYNTH and loaded.meta["source"] == os.path.abspath(path)
  assert loaded.meta["step"] is None and loaded.meta["train_len"] is None
  _assert_same_params(loaded.model, from_pretrained(path))
  with pytest.raises(ValueError, match="only 100"):  # byte's 259 ids do not fit
    load_model(path, tokenizer="byte")


def test_converted_params_checkpoint(tmp_path):
  model = Mamba2LM(TINY, rngs=nnx.Rngs(5))
  save_params(str(tmp_path / OUR_PARAMS), model)
  (tmp_path / OUR_CONFIG).write_text(model.config.to_json())
  assert is_pretrained_dir(str(tmp_path))
  loaded = load_model(str(tmp_path), tokenizer="byte")
  _assert_same_params(loaded.model, model)
  assert loaded.model.config == TINY


def _write_workdir(workdir, steps, seq_len=128, tbptt=2):
  from mamba2_jax.train.checkpoint import Checkpointer  # the writer: tests may use training

  model = Mamba2LM(TINY, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  os.makedirs(workdir, exist_ok=True)
  (Path(workdir) / workdir_lib.CONFIG_FILE).write_text(json.dumps({"seq_len": seq_len}))
  ck = Checkpointer(str(workdir), save_every=1, async_save=False)
  for step in steps:
    meta = {
      "config": {"seq_len": seq_len, "tbptt_segments": tbptt},
      "model": json.loads(TINY.to_json()),
      "tokenizer": get_tokenizer("byte").identity(),
      "tokens_seen": step * 1000,
    }
    ck.save(step, params, {"x": jnp.zeros(2)}, None, meta, force=True)
  ck.close()
  return model


def test_training_workdir(tmp_path):
  wd = tmp_path / "wd"
  model = _write_workdir(wd, [10, 20])
  (wd / workdir_lib.CHECKPOINT_DIR / "30.orbax-checkpoint-tmp-1").mkdir()  # still being written
  assert is_workdir(str(wd)) and not is_pretrained_dir(str(wd))
  assert workdir_lib.complete_steps(str(wd)) == [10, 20]
  loaded = load_model(str(wd))
  assert loaded.tokenizer.name == "byte" and "checksums" not in loaded.meta
  assert loaded.meta["step"] == 20 and loaded.meta["tokens_seen"] == 20000
  assert loaded.meta["train_len"] == 256 and loaded.meta["source"] == os.path.abspath(wd)
  _assert_same_params(loaded.model, model)
  assert load_model(str(wd), step=10).meta["step"] == 10
  bf16 = load_model(str(wd), model_dtype="bfloat16")
  assert bf16.model.config.dtype == "bfloat16"
  with pytest.raises(CheckpointError, match="no complete checkpoint step 15"):
    load_model(str(wd), step=15)
  m, meta = load_workdir_model(str(wd))
  assert meta["step"] == 20 and "params" in meta["checksums"]
  # a damaged step is refused by its checksum
  path = wd / workdir_lib.CHECKPOINT_DIR / "20" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  meta["checksums"]["params"][next(iter(meta["checksums"]["params"]))] = "broken"
  path.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="step 20: params checksum mismatch"):
    load_model(str(wd))
  (tmp_path / "empty_wd").mkdir()  # a workdir before the trainer's first checkpoint
  with pytest.raises(CheckpointError, match="no complete checkpoint under"):
    load_model(str(tmp_path / "empty_wd"))


def test_step_directory_is_that_step(tmp_path):
  """--checkpoint=WORKDIR/checkpoints/10 loads step 10 (not the newest, not "no step yet")."""
  wd = tmp_path / "wd"
  _write_workdir(wd, [10, 20])
  step_dir = wd / workdir_lib.CHECKPOINT_DIR / "10"
  assert split_step_dir(str(step_dir)) == (str(wd), 10) and not is_workdir(str(step_dir))
  assert split_step_dir(str(wd)) is None and split_step_dir(str(wd / "checkpoints")) is None
  loaded = load_model(str(step_dir))
  assert loaded.meta["step"] == 10 and loaded.meta["source"] == str(wd)
  assert load_model(str(step_dir), step=10).meta["step"] == 10
  with pytest.raises(InvalidInput, match="a step applies to training workdirs only"):
    load_model(str(step_dir), step=20)
  # a wrong --tokenizer for a checkpoint: the fix is about the checkpoint, not "re-prepare data"
  with pytest.raises(TokenizerMismatchError, match="checkpoint .* Leave --tokenizer out") as e:
    load_model(str(step_dir), tokenizer="synthetic:copy:vocab=64")
  assert "re-prepare" not in str(e.value) and isinstance(e.value, UserError)


def test_missing_source(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist; expected random:"):
    load_model(str(tmp_path / "nothing"))
  with pytest.raises(InvalidInput, match="expected random:<preset>"):
    load_model("random:tiny:x")


def test_workdir_layout_helpers(tmp_path):
  assert workdir_lib.train_len({"seq_len": 64}) == 64
  assert workdir_lib.train_len({"seq_len": 64, "tbptt_segments": 4}) == 256
  assert workdir_lib.train_len({"seq_len": 64, "tbptt_segments": None}) == 64
  assert workdir_lib.train_len({}) is None and workdir_lib.train_len({"seq_len": 0}) is None
  assert workdir_lib.complete_steps(str(tmp_path)) == []
  assert workdir_lib.read_run_config(tmp_path, {}) == {}
  (tmp_path / workdir_lib.CONFIG_FILE).write_text('{"seq_len": 8}')
  assert workdir_lib.read_run_config(tmp_path) == {"seq_len": 8}
  assert not workdir_lib.is_train_complete(str(tmp_path))
  workdir_lib.mark_train_complete(str(tmp_path), {"step": 3})
  assert workdir_lib.is_train_complete(str(tmp_path))
  marker = json.loads((tmp_path / workdir_lib.TRAIN_COMPLETE).read_text())
  assert marker["step"] == 3 and "time" in marker
  with pytest.raises(CheckpointError, match="step 7: meta item unreadable"):
    workdir_lib.read_meta(str(tmp_path), 7)


def test_package_names_are_not_shadowed_by_submodules():
  """Every lazy export of mamba2_jax.checkpoints stays the function/class once all submodules
  are imported (a submodule named like an export would replace it)."""
  import importlib
  import inspect

  from mamba2_jax import checkpoints

  for sub in ("workdir", "checksums", "params", "hub", "weight_files", "torch_pickle", "load"):
    importlib.import_module(f"mamba2_jax.checkpoints.{sub}")
  for name in checkpoints.__all__:
    assert not inspect.ismodule(getattr(checkpoints, name)), name
