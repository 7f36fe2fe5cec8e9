"""Import of official `state-spaces/mamba2-*` and HF `Mamba2ForCausalLM` checkpoints.

Formats (see `from_pretrained`):
  official (mamba_ssm): config.json {d_model, n_layer, ssm_cfg, ...} + pytorch_model.bin
  HF transformers:      config.json {model_type: mamba2, hidden_size, ...} + model.safetensors
                        (or sharded *.safetensors with an index, or pytorch_model.bin)
  mamba2_jax (ours):    mamba2_jax_config.json + params/ (orbax), written by experiments.convert_hf
`.bin` files are read without torch by a restricted unpickler (mamba2_jax.checkpoints.torch_pickle;
every weight file goes through mamba2_jax.checkpoints.weight_files).
Evaluation, the demo and sweeps load every kind of model source through
`mamba2_jax.checkpoints.load_model`, which calls `from_pretrained` for these directories.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from flax import nnx

from mamba2_jax.config import ConfigError, Mamba2Config
from mamba2_jax.checkpoints.weight_files import WEIGHT_FILES, load_state_dict
from mamba2_jax.model import Mamba2LM

OUR_CONFIG = "mamba2_jax_config.json"
OUR_PARAMS = "params"


def _decode_float(v):
  """HF writes non-finite floats as {"__float__": "Infinity"}; also accept strings/None."""
  if isinstance(v, dict) and "__float__" in v:
    v = v["__float__"]
  if v is None:
    return math.inf
  return float(v)  # float("Infinity"), float("inf") both work


def config_from_hf(cfg: dict[str, Any]) -> Mamba2Config:
  """Mamba2Config from an HF `Mamba2Config` config.json dict."""
  d = cfg["hidden_size"]
  expand = cfg.get("expand", 2)
  headdim = cfg.get("head_dim", 64)
  nheads = cfg.get("num_heads", expand * d // headdim)
  if nheads * headdim != expand * d:
    raise ConfigError(
      f"HF config: num_heads*head_dim = {nheads}*{headdim} != expand*hidden_size "
      f"= {expand}*{d}; such models (d_ssm != d_inner) are not supported"
    )
  if not cfg.get("rms_norm", True):
    raise ConfigError("HF config: rms_norm=False (plain gate without norm) is not supported")
  limit = cfg.get("time_step_limit", (0.0, math.inf))
  return Mamba2Config(
    d_model=d,
    n_layer=cfg["num_hidden_layers"],
    d_state=cfg.get("state_size", 128),
    headdim=headdim,
    expand=expand,
    ngroups=cfg.get("n_groups", 1),
    d_conv=cfg.get("conv_kernel", 4),
    vocab_size=cfg["vocab_size"],
    pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 16),
    tie_embeddings=cfg.get("tie_word_embeddings", True),
    norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
    residual_in_fp32=cfg.get("residual_in_fp32", True),
    conv_bias=cfg.get("use_conv_bias", True),
    proj_bias=cfg.get("use_bias", False),
    dt_min=cfg.get("time_step_min", 1e-3),
    dt_max=cfg.get("time_step_max", 1e-1),
    dt_init_floor=cfg.get("time_step_floor", 1e-4),
    dt_limit=tuple(_decode_float(v) for v in limit),
  )


def config_from_official(cfg: dict[str, Any]) -> Mamba2Config:
  """Mamba2Config from a mamba_ssm `MambaConfig` config.json dict."""
  ssm = dict(cfg.get("ssm_cfg") or {})
  if ssm.get("layer", "Mamba2") != "Mamba2":
    raise ConfigError(
      f"official config: ssm_cfg.layer = {ssm['layer']!r}; only 'Mamba2' is supported"
    )
  if cfg.get("d_intermediate", 0):
    raise ConfigError("official config: d_intermediate != 0 (blocks with an MLP) is not supported")
  if cfg.get("attn_layer_idx"):
    raise ConfigError("official config: attention layers (attn_layer_idx) are not supported")
  if not cfg.get("rms_norm", True):
    raise ConfigError("official config: rms_norm=False (LayerNorm blocks) is not supported")
  if ssm.get("norm_before_gate", False) or not ssm.get("rmsnorm", True):
    raise ConfigError("official config: only rmsnorm=True, norm_before_gate=False is supported")
  d, expand = cfg["d_model"], ssm.get("expand", 2)
  if ssm.get("d_ssm") not in (None, expand * d):
    raise ConfigError("official config: d_ssm != expand*d_model is not supported")
  limit = ssm.get("dt_limit", (0.0, math.inf))
  return Mamba2Config(
    d_model=d,
    n_layer=cfg["n_layer"],
    d_state=ssm.get("d_state", 128),
    headdim=ssm.get("headdim", 64),
    expand=expand,
    ngroups=ssm.get("ngroups", 1),
    d_conv=ssm.get("d_conv", 4),
    vocab_size=cfg["vocab_size"],
    pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
    tie_embeddings=cfg.get("tie_embeddings", True),
    norm_eps=cfg.get("norm_epsilon", 1e-5),
    residual_in_fp32=cfg.get("residual_in_fp32", True),
    conv_bias=ssm.get("conv_bias", True),
    proj_bias=ssm.get("bias", False),
    D_has_hdim=ssm.get("D_has_hdim", False),
    dt_min=ssm.get("dt_min", 1e-3),
    dt_max=ssm.get("dt_max", 1e-1),
    dt_init_floor=ssm.get("dt_init_floor", 1e-4),
    A_init_range=tuple(ssm.get("A_init_range", (1.0, 16.0))),
    dt_limit=tuple(_decode_float(v) for v in limit),
  )


def _pad_rows(w: np.ndarray, rows: int, name: str) -> np.ndarray:
  if w.shape[0] > rows:
    raise ConfigError(
      f"{name} has {w.shape[0]} rows but the config's padded vocabulary is {rows}"
      " (vocab_size rounded up to pad_vocab_size_multiple); fix vocab_size"
    )
  return np.pad(w, ((0, rows - w.shape[0]), (0, 0)))


def params_from_state_dict(sd: dict[str, np.ndarray], cfg: Mamba2Config) -> dict[str, Any]:
  """Maps official/HF tensor names to the nested dict of `nnx.state(Mamba2LM)`."""
  sd = dict(sd)

  def take(key):
    if key not in sd:
      raise KeyError(f"checkpoint is missing tensor {key!r}")
    return np.asarray(sd.pop(key))

  emb_key = (
    "backbone.embedding.weight"
    if "backbone.embedding.weight" in sd
    else "backbone.embeddings.weight"
  )
  V = cfg.padded_vocab_size
  params: dict[str, Any] = {"embedding": _pad_rows(take(emb_key), V, emb_key)}
  e, gn, k = cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.d_conv
  layers = []
  for i in range(cfg.n_layer):
    p = f"backbone.layers.{i}."
    w_in = take(p + "mixer.in_proj.weight").T  # (d_model, d_in_proj)
    if w_in.shape[1] != cfg.d_in_proj:
      raise ConfigError(
        f"{p}mixer.in_proj.weight has {w_in.shape[1]} outputs, expected "
        f"{cfg.d_in_proj} = 2*d_inner + 2*ngroups*d_state + nheads (d_mlp > 0 "
        "blocks are not supported)"
      )
    cuts = np.cumsum([e, e, gn, gn])
    z, x, B, C, dt = np.split(w_in, cuts, axis=1)
    conv = take(p + "mixer.conv1d.weight")  # (conv_dim, 1, K)
    conv = conv.reshape(conv.shape[0], k).T  # (K, conv_dim), tap order preserved
    mixer = {
      "in_proj_z": z,
      "in_proj_x": x,
      "in_proj_B": B,
      "in_proj_C": C,
      "in_proj_dt": dt,
      "conv_x": conv[:, :e],
      "conv_B": conv[:, e : e + gn],
      "conv_C": conv[:, e + gn :],
      "dt_bias": take(p + "mixer.dt_bias"),
      "A_log": take(p + "mixer.A_log"),
      "D": take(p + "mixer.D").reshape(-1),
      "norm": take(p + "mixer.norm.weight"),
      "out_proj": take(p + "mixer.out_proj.weight").T,
    }
    if cfg.conv_bias:
      cb = take(p + "mixer.conv1d.bias")
      mixer.update(conv_x_bias=cb[:e], conv_B_bias=cb[e : e + gn], conv_C_bias=cb[e + gn :])
    if cfg.proj_bias:
      mixer.update(
        in_proj_bias=take(p + "mixer.in_proj.bias"), out_proj_bias=take(p + "mixer.out_proj.bias")
      )
    layers.append({"norm": take(p + "norm.weight"), "mixer": mixer})
  params["layers"] = {
    "norm": np.stack([l["norm"] for l in layers]),
    "mixer": {n: np.stack([l["mixer"][n] for l in layers]) for n in layers[0]["mixer"]},
  }
  params["norm_f"] = take("backbone.norm_f.weight")
  if cfg.tie_embeddings:
    sd.pop("lm_head.weight", None)  # stored tied in both formats
  else:
    params["lm_head"] = _pad_rows(take("lm_head.weight"), V, "lm_head.weight").T
  if sd:
    raise ConfigError(
      f"checkpoint has unexpected tensors {sorted(sd)[:8]}... "
      f"({len(sd)} in all); is the config right?"
    )
  return params


def _abstract_model(cfg: Mamba2Config) -> Mamba2LM:
  return nnx.eval_shape(lambda: Mamba2LM(cfg, rngs=nnx.Rngs(0)))


def model_from_params(cfg: Mamba2Config, params: dict[str, Any]) -> Mamba2LM:
  """Builds a Mamba2LM whose parameters are `params` (nested dict of arrays), checking shapes."""
  model = _abstract_model(cfg)
  graphdef, state = nnx.split(model)
  flat_expected = {k: v for k, v in nnx.to_flat_state(state)}
  flat_given = dict(_flatten(params))
  missing = set(flat_expected) - set(flat_given)
  extra = set(flat_given) - set(flat_expected)
  if missing or extra:
    raise ConfigError(f"parameter tree mismatch: missing {sorted(missing)}, extra {sorted(extra)}")
  for path, var in flat_expected.items():
    got = flat_given[path]
    if tuple(got.shape) != tuple(var.shape):
      raise ConfigError(
        f"parameter {'/'.join(map(str, path))}: shape {tuple(got.shape)} != "
        f"expected {tuple(var.shape)}"
      )
    var.set_value(np.asarray(got).astype(var.dtype))
  return nnx.merge(graphdef, state)


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _find_weights(path: str) -> str:
  for name in WEIGHT_FILES:
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  raise FileNotFoundError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def load_config(path: str) -> tuple[Mamba2Config, str]:
  """(config, format) of a checkpoint directory; format is 'mamba2_jax', 'hf' or 'official'."""
  ours = os.path.join(path, OUR_CONFIG)
  if os.path.exists(ours):
    with open(ours) as f:
      return Mamba2Config.from_json(f.read()), "mamba2_jax"
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path}: neither {OUR_CONFIG} nor config.json found")
  with open(cfg_path) as f:
    raw = json.load(f)
  if "hidden_size" in raw or raw.get("model_type") == "mamba2":
    return config_from_hf(raw), "hf"
  if "d_model" in raw:
    return config_from_official(raw), "official"
  raise ConfigError(
    f"{cfg_path}: not a Mamba-2 config (expected HF 'hidden_size' or official 'd_model' fields)"
  )


def from_pretrained(path: str, **config_overrides) -> Mamba2LM:
  """Loads a Mamba2LM from an official, HF or mamba2_jax checkpoint directory.

  `config_overrides` replace config fields after loading (e.g. dtype="bfloat16",
  chunk_size=128, ssd_impl="reference"); shape-defining fields cannot change. The checkpoint's
  own chunk_size (official / HF configs) is a kernel setting, not part of the model: it is
  left at "auto", the platform's fast chunk.
  """
  cfg, fmt = load_config(path)
  if config_overrides:
    cfg = cfg.replace(**config_overrides)
  if fmt == "mamba2_jax":
    from mamba2_jax.checkpoints.params import restore_params  # orbax only when needed

    return restore_params(os.path.join(path, OUR_PARAMS), cfg)
  sd = load_state_dict(_find_weights(path))
  return model_from_params(cfg, params_from_state_dict(sd, cfg))
