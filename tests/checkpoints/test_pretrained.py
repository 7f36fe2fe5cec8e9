"""Checkpoint import: golden logits of HF transformers' own Mamba2ForCausalLM, both formats.

The fixtures (tests/fixtures/, made by tests/fixtures/make_golden.py with torch + transformers in
a separate venv) hold tiny random models and the logits/states HF computed for them.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import ConfigError, from_pretrained
from mamba2_jax.generate import decode_step
from mamba2_jax.checkpoints.hub import config_from_official, load_config
from tests.paths import FIXTURES

FIX = str(FIXTURES)
CASES = [
  ("hf_tiny_g2", "golden_hf_tiny_g2"),
  ("official_tiny_g2", "golden_hf_tiny_g2"),
  ("hf_tiny_g1_untied", "golden_hf_tiny_g1_untied"),
]


def _rel(a, b):
  return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


@pytest.mark.parametrize("ckpt,golden", CASES)
def test_golden_logits_and_states(ckpt, golden):
  g = np.load(os.path.join(FIX, golden + ".npz"))
  model = from_pretrained(os.path.join(FIX, ckpt))
  V = g["logits"].shape[-1]
  assert model.config.vocab_size == V and model.config.padded_vocab_size % 16 == 0
  logits, cache = nnx.jit(lambda m, t: m.prefill(t))(model, jnp.asarray(g["input_ids"], jnp.int32))
  assert _rel(logits[..., :V], g["logits"]) < 1e-4
  assert _rel(cache.ssm, g["ssm_states"]) < 1e-4
  # Our conv cache keeps the last K-1 inputs; HF keeps K (the oldest is never used again).
  assert _rel(cache.conv_state(), g["conv_states"][..., 1:]) < 1e-4
  # Decode continues from the prefill cache. HF's decode skips the dt clamp that its chunked
  # forward applies; ours clamps in both, so we match HF's full forward at those positions.
  outs = []
  for t in range(g["decode_ids"].shape[1]):
    out, cache = decode_step(model, jnp.asarray(g["decode_ids"][:, t], jnp.int32), cache)
    outs.append(out[:, :V])
  assert _rel(np.stack(outs, 1), g["full_logits"][:, 37:]) < 1e-4
  if model.config.dt_limit[1] == float("inf"):
    assert _rel(np.stack(outs, 1), g["decode_logits"]) < 1e-4
    assert _rel(cache.ssm, g["decode_ssm_states"]) < 1e-4


def test_infinity_and_formats_are_parsed():
  cfg, fmt = load_config(os.path.join(FIX, "hf_tiny_g2"))
  assert fmt == "hf" and cfg.dt_limit == (0.0, float("inf")) and cfg.ngroups == 2
  cfg, fmt = load_config(os.path.join(FIX, "hf_tiny_g1_untied"))
  assert fmt == "hf" and cfg.dt_limit == (0.01, 0.5) and not cfg.tie_embeddings
  cfg, fmt = load_config(os.path.join(FIX, "official_tiny_g2"))
  assert fmt == "official" and cfg.padded_vocab_size == 112
  # the checkpoint's chunk_size (16) is a kernel setting, not the model's: the platform's is used
  assert cfg.chunk_size == "auto" and cfg.scan_unroll == "auto"


def test_convert_cli_round_trip(tmp_path):
  from experiments.convert_hf import convert

  dst = str(tmp_path / "converted")
  convert(os.path.join(FIX, "official_tiny_g2"), dst)
  assert sorted(os.listdir(dst)) == ["mamba2_jax_config.json", "params", "source.json"]
  with open(os.path.join(dst, "source.json")) as f:
    assert json.load(f)["format"] == "official"
  a = from_pretrained(os.path.join(FIX, "official_tiny_g2"))
  b = from_pretrained(dst)
  toks = jnp.arange(23, dtype=jnp.int32)[None] % 100
  np.testing.assert_array_equal(np.asarray(a(toks)), np.asarray(b(toks)))
  with pytest.raises(FileExistsError, match="overwrite"):
    convert(os.path.join(FIX, "official_tiny_g2"), dst)


def test_overrides_apply_after_loading():
  m = from_pretrained(os.path.join(FIX, "hf_tiny_g2"), chunk_size=8, ssd_impl="reference")
  assert m.config.chunk_size == 8 and m.config.ssd_impl == "reference"


def _copy(tmp_path, name):
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIX, name), dst)
  return dst


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  d = _copy(tmp_path, "hf_tiny_g2")
  sd = load_file(str(d / "model.safetensors"))
  del sd["backbone.layers.1.mixer.A_log"]
  save_file(sd, str(d / "model.safetensors"))
  with pytest.raises(KeyError, match="backbone.layers.1.mixer.A_log"):
    from_pretrained(str(d))


def test_vocab_larger_than_config_is_an_error(tmp_path):
  d = _copy(tmp_path, "official_tiny_g2")
  cfg = json.loads((d / "config.json").read_text())
  cfg["vocab_size"], cfg["pad_vocab_size_multiple"] = 90, 8  # padded 96 < 112 stored rows
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="112 rows"):
    from_pretrained(str(d))


@pytest.mark.parametrize(
  "change,fragment",
  [
    (dict(d_intermediate=256), "d_intermediate"),
    (dict(ssm_cfg={"layer": "Mamba1"}), "only 'Mamba2'"),
    (dict(ssm_cfg={"norm_before_gate": True}), "norm_before_gate"),
  ],
)
def test_unsupported_official_configs(change, fragment):
  with open(os.path.join(FIX, "official_tiny_g2", "config.json")) as f:
    cfg = json.load(f)
  cfg.update(change)
  with pytest.raises(ConfigError, match=fragment):
    config_from_official(cfg)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_pretrained(str(tmp_path))
