"""Validation of the training config (configs/base.py) before any device work.

`validate(config)` raises `ConfigError("config.<field>: <rule>, got <value>")` naming the field
and the allowed values, and returns the model config. `resume_diff(saved, current)` lists the
fields that make a saved run incompatible with a new config.
"""

from __future__ import annotations

import json
import math
from typing import Any

from mamba2_jax.config import ConfigError, Mamba2Config
from mamba2_jax.data.pipeline import PACKING_MODES

MESH_AXES = ("data", "fsdp", "context", "tensor")
CONTEXT_AXIS = 2  # index of "context" in MESH_AXES
SCHEDULES = ("wsd", "cosine", "constant")

# Fields that may change between a run and its resumption (everything else must match).
RESUME_SAFE = (
  "name",
  "total_steps",
  "checkpoint_every",
  "keep_checkpoints",
  "keep_every",
  "async_checkpointing",
  "eval_every",
  "eval_batches",
  "log_every",
  "profile_start",
  "profile_steps",
  "allow_config_change",
  "max_consecutive_nonfinite",
  "mesh_shape",
  "logical_axis_rules",
  "data.num_workers",
  "data.eval_source",
  "model.remat_policy",
  "model.remat_group",
  "model.chunk_size",  # the SSD chunk changes speed, not the function
  "model.scan_unroll",
  "model.ssd_impl",
  "model.fused_in_proj",
)


def _fail(field, rule, value):
  raise ConfigError(f"config.{field}: {rule}, got {value!r}")


def _int(c, field, lo=None, allow_none=False):
  v = _get(c, field)
  if v is None and allow_none:
    return None
  if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo):
    _fail(field, f"must be an integer >= {lo}" if lo is not None else "must be an integer", v)
  return v


def _float(c, field, lo=None, hi=None, lo_open=False):
  v = _get(c, field)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
    _fail(field, "must be a number", v)
  if lo is not None and (v <= lo if lo_open else v < lo):
    _fail(field, f"must be {'>' if lo_open else '>='} {lo}", v)
  if hi is not None and v > hi:
    _fail(field, f"must be <= {hi}", v)
  return float(v)


def _choice(c, field, allowed):
  v = _get(c, field)
  if v not in allowed:
    _fail(field, f"must be one of {allowed}", v)
  return v


def _get(c, field):
  for part in field.split("."):
    c = c[part]
  return c


def resolve_mesh_shape(mesh_shape, num_devices: int) -> tuple[int, int, int, int]:
  """mesh_shape (data, fsdp, context, tensor) with -1 replaced by the remaining devices;
  ConfigError if it does not fit. Three sizes mean (data, fsdp, tensor) with context 1 (the
  shape of configs and workdirs from before the context axis)."""
  shape = tuple(mesh_shape)
  if len(shape) not in (3, 4) or any(
    not isinstance(s, int) or isinstance(s, bool) or (s < 1 and s != -1) for s in shape
  ):
    _fail(
      "mesh_shape",
      f"must be 4 sizes for the axes {MESH_AXES} (or 3 for (data, fsdp, tensor), context 1), "
      "each >= 1 or -1",
      shape,
    )
  if shape.count(-1) > 1:
    _fail("mesh_shape", "may contain -1 at most once", shape)
  if len(shape) == 3:
    shape = (shape[0], shape[1], 1, shape[2])
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      _fail(
        "mesh_shape",
        f"the fixed sizes (product {known}) must divide the {num_devices} devices",
        tuple(mesh_shape),
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    _fail(
      "mesh_shape",
      f"the product of the sizes of {MESH_AXES} ({' x '.join(map(str, shape))} = "
      f"{math.prod(shape)}) must equal the {num_devices} devices",
      tuple(mesh_shape),
    )
  return shape


def _check_context(c, mc: Mamba2Config, context: int) -> None:
  """seq_len splits evenly over the context axis; no mitigation that reads across shards."""
  if context == 1:
    return
  if c.seq_len % context:
    _fail(
      "seq_len",
      f"must be divisible by the context-parallel size {context} (mesh_shape "
      f"{tuple(c.mesh_shape)}): each of the {context} shards holds seq_len / {context} tokens",
      c.seq_len,
    )
  if c.seq_len // context < mc.d_conv - 1:
    _fail(
      "seq_len",
      f"must give each of the {context} context shards at least d_conv - 1 = {mc.d_conv - 1} "
      "tokens (the causal conv's halo comes from the previous shard only)",
      c.seq_len,
    )
  if mc.ssd_window or mc.state_norm != "off":
    field = "model.ssd_window" if mc.ssd_window else "model.state_norm"
    _fail(
      field,
      f"is not supported with context parallelism (context size {context}): use a mesh "
      "with context 1 (tbptt_segments for long sequences)",
      _get(c, field),
    )


def model_config(config) -> Mamba2Config:
  """The Mamba2Config of `config.model`, its errors prefixed with `config.model`."""
  try:
    return Mamba2Config.from_dict(dict(config.model))
  except ConfigError as e:
    raise ConfigError(f"config.model: {e}") from None
  except TypeError as e:
    raise ConfigError(f"config.model: {e}") from None


def validate(config, *, num_devices: int | None = None, num_processes: int = 1) -> Mamba2Config:
  """Checks every field the trainer reads; returns the model config."""
  c = config
  _int(c, "seed")
  seq_len = _int(c, "seq_len", 1)
  gbs = _int(c, "global_batch_size", 1)
  accum = _int(c, "grad_accum_steps", 1)
  _int(c, "tbptt_segments", 1)
  _int(c, "total_steps", 1)
  _int(c, "checkpoint_every", 1)
  _int(c, "keep_checkpoints", 1)
  _int(c, "keep_every", 1, allow_none=True)
  _int(c, "eval_every", 0)
  _int(c, "eval_batches", 1)
  _int(c, "log_every", 1)
  _int(c, "profile_start", 0, allow_none=True)
  _int(c, "profile_steps", 1)
  _int(c, "max_consecutive_nonfinite", 0)
  if gbs % accum:
    _fail("global_batch_size", f"must be divisible by grad_accum_steps={accum}", gbs)
  shards = c.data.num_shards if c.data.num_shards is not None else num_processes
  if not isinstance(shards, int) or shards < 1 or shards % num_processes:
    _fail(
      "data.num_shards",
      f"must be a positive multiple of the {num_processes} data readers (processes "
      "holding different batch rows)",
      shards,
    )
  if (gbs // accum) % shards:
    _fail(
      "global_batch_size",
      f"each micro-batch (global_batch_size / grad_accum_steps = "
      f"{gbs // accum}) must be divisible by data.num_shards={shards}",
      gbs,
    )
  for rule in c.logical_axis_rules:
    if len(rule) != 2:
      _fail("logical_axis_rules", "must be (logical_name, mesh_axes) pairs", rule)
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for a in axes:
      if a is not None and a not in MESH_AXES:
        _fail("logical_axis_rules", f"mesh axes must be in {MESH_AXES} or None", rule)
  if num_devices is not None:
    shape = resolve_mesh_shape(c.mesh_shape, num_devices)
    dp = shape[0] * shape[1]
    if (gbs // accum) % dp:
      _fail(
        "global_batch_size",
        f"each micro-batch ({gbs // accum} sequences) must be "
        f"divisible by the data-parallel size data*fsdp = {dp}",
        gbs,
      )
  else:  # the device count unknown: a -1 resolves to 1
    shape = resolve_mesh_shape(c.mesh_shape, math.prod(abs(s) for s in c.mesh_shape))
  context = shape[CONTEXT_AXIS]

  _choice(c, "data.packing", PACKING_MODES)
  for f in ("data.source", "data.tokenizer"):
    if not isinstance(_get(c, f), str) or not _get(c, f):
      _fail(f, "must be a non-empty string", _get(c, f))
  for f in ("data.tfds_data_dir", "data.tfds_text_key"):
    if f.split(".")[1] in c.data and not isinstance(_get(c, f), str):
      _fail(f, "must be a string (empty for the default)", _get(c, f))
  _int(c, "data.min_doc_tokens", 0)
  _int(c, "data.num_workers", 0)

  _float(c, "optimizer.lr", 0.0, lo_open=True)
  _float(c, "optimizer.b1", 0.0, 1.0)
  _float(c, "optimizer.b2", 0.0, 1.0)
  _float(c, "optimizer.eps", 0.0)
  _float(c, "optimizer.weight_decay", 0.0)
  _float(c, "optimizer.clip_norm", 0.0)
  _choice(c, "optimizer.schedule", SCHEDULES)
  _int(c, "optimizer.warmup_steps", 0)
  _float(c, "optimizer.decay_fraction", 0.0, 1.0)
  _float(c, "optimizer.min_lr_ratio", 0.0, 1.0)

  del seq_len
  mc = model_config(c)
  _check_context(c, mc, context)
  if mc.state_norm != "off" and not math.isfinite(mc.state_norm_threshold):
    _fail(
      "model.state_norm_threshold",
      f"must be finite when training with model.state_norm="
      f"{mc.state_norm!r} (every head's threshold tau, held fixed; inf normalizes nothing)",
      mc.state_norm_threshold,
    )
  return mc


def check_vocab(model: Mamba2Config, tokenizer_identity: dict) -> None:
  """The model's vocabulary must cover every id the tokenizer produces."""
  need = tokenizer_identity.get("vocab_size")
  if need is not None and model.vocab_size < need:
    _fail(
      "model.vocab_size",
      f"must be >= {need}, the vocabulary of tokenizer {tokenizer_identity.get('name')!r}",
      model.vocab_size,
    )


def to_json_dict(config) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists, inf becomes "inf")."""

  def clean(v):
    if isinstance(v, dict):
      return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [clean(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
      return str(v)
    return v

  return clean(
    json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
  )


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def resume_diff(saved: dict, current: dict) -> list[str]:
  """Fields (other than RESUME_SAFE ones) whose values differ: "field: saved -> current"."""
  a, b = _flatten(saved), _flatten(current)
  return [
    f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
    for k in sorted(set(a) | set(b))
    if k not in RESUME_SAFE and a.get(k) != b.get(k)
  ]
