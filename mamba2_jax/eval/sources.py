"""Where evaluated models come from, and the training-free mitigations applied to them.

Model sources (`--checkpoint`):
  random:<preset>[:seed]   a randomly initialised Mamba2LM(Mamba2Config.preset(preset))
                           (benchmarks, tests); default tokenizer byte
  DIR with config.json or mamba2_jax_config.json
                           an official / HF / converted checkpoint (mamba2_jax.from_pretrained);
                           default tokenizer neox
  any other DIR            a training workdir of this project (mamba2_jax.train.checkpoint:
                           complete_steps / load_eval_model); see mamba2_jax.eval.runner

Mitigation specs (`--config.mitigation`): "" (none), or comma-separated items: at most one
preset name of `mamba2_jax.mitigations.PRESETS` (rri, rri_decay, longmamba, window_2k,
state_norm, ...) and `field=value` items with `Mamba2Config` mitigation fields (rri_decay_scale,
rri_insert_scale, dt_scale, ssd_window, state_norm, state_norm_chunk, state_norm_threshold),
e.g. "rri", "rri_decay_scale=0.9999,rri_insert_scale=0.75", "state_norm,calibrate=2". They go
to `mamba2_jax.mitigations.with_mitigations(model, preset=..., **fields)`. With state
normalization on and no explicit state_norm_threshold, the thresholds are calibrated by
`calibrate_state_norm(model, newline prompt, multiplier=calibrate (default 1))`; the newline
prompt has `calibrate_len` tokens (default T_train, else 8192).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM, from_pretrained
from mamba2_jax.data import get_tokenizer
from mamba2_jax.mitigations import apply_mitigation, parse_mitigation  # noqa: F401 (re-exported)
from mamba2_jax.pretrained import OUR_CONFIG, WEIGHT_FILES

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


@dataclasses.dataclass
class LoadedModel:
  model: Any  # Mamba2LM
  tokenizer: Any
  meta: dict  # at least {"source", "step", "train_len"}


def is_pretrained_dir(path: str) -> bool:
  """A converted (mamba2_jax_config.json) or official/HF (config.json + weights) checkpoint."""
  if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "checkpoints")):
    return False  # a training workdir has config.json too, and checkpoints/
  if os.path.exists(os.path.join(path, OUR_CONFIG)):
    return True
  return os.path.exists(os.path.join(path, "config.json")) and any(
    os.path.exists(os.path.join(path, w)) for w in WEIGHT_FILES
  )


def is_workdir(spec: str) -> bool:
  """A directory that is not a pretrained checkpoint: a training workdir (possibly still
  without checkpoints, for --mode=watch started before the trainer)."""
  return not spec.startswith(RANDOM_PREFIX) and os.path.isdir(spec) and not is_pretrained_dir(spec)


def _overrides(model_dtype: str) -> dict:
  return {"dtype": model_dtype} if model_dtype else {}


def load_model(spec: str, *, tokenizer: str = "", model_dtype: str = "") -> LoadedModel:
  """A model from `random:<preset>[:seed]` or a pretrained directory (workdirs: `load_step`)."""
  if spec.startswith(RANDOM_PREFIX):
    parts = spec[len(RANDOM_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 2:
      raise ValueError(f"--checkpoint {spec!r}: expected random:<preset>[:seed]")
    seed = int(parts[1]) if len(parts) == 2 else 0
    cfg = Mamba2Config.preset(parts[0], **_overrides(model_dtype))
    model = Mamba2LM(cfg, rngs=nnx.Rngs(seed))
    tok = get_tokenizer(tokenizer or "byte")
    meta = {"source": spec, "step": None, "train_len": None}
  elif is_pretrained_dir(spec):
    model = from_pretrained(spec, **_overrides(model_dtype))
    tok = get_tokenizer(tokenizer or "neox")
    meta = {"source": os.path.abspath(spec), "step": None, "train_len": None}
  else:
    raise FileNotFoundError(
      f"--checkpoint {spec!r}: not random:<preset>[:seed], nor a "
      "checkpoint directory (mamba2_jax_config.json, or config.json and "
      "weights), nor a training workdir"
    )
  check_vocab(model, tok)
  return LoadedModel(model, tok, meta)


def load_step(
  workdir: str, step: int, *, tokenizer: str = "", model_dtype: str = ""
) -> LoadedModel:
  """One step of a training workdir via mamba2_jax.train.checkpoint.load_eval_model. Raises
  its CheckpointError for a damaged step."""
  from mamba2_jax.train import checkpoint as ckpt  # pylint: disable=g-import-not-at-top

  model, meta = ckpt.load_eval_model(workdir, step)
  if model_dtype and model.config.dtype != model_dtype:
    model = _with_config(model, dtype=model_dtype)
  tok_identity = meta.get("tokenizer")
  if tokenizer:
    tok = get_tokenizer(tokenizer)
  elif isinstance(tok_identity, dict) and tok_identity.get("name") == "byte":
    tok = get_tokenizer("byte")
  elif isinstance(tok_identity, dict) and tok_identity.get("name") == "gpt-neox-20b":
    tok = get_tokenizer("neox")
  elif isinstance(tok_identity, dict) and str(tok_identity.get("name")).startswith("synthetic-"):
    tok = get_tokenizer(tok_identity["name"])
  else:
    raise ValueError(
      f"{workdir} step {step}: cannot pick a tokenizer for identity "
      f"{tok_identity!r}; pass --tokenizer"
    )
  tok.check_compatible(tok_identity, f"{workdir} step {step}")
  check_vocab(model, tok)
  meta = {k: v for k, v in meta.items() if k != "checksums"}
  meta.update(
    source=os.path.abspath(workdir),
    step=int(meta.get("step", step)),
    train_len=train_len_of(meta.get("config") or {}),
  )
  return LoadedModel(model, tok, meta)


def train_len_of(train_config: dict) -> int | None:
  """T_train of a training config: seq_len x tbptt_segments (the state is passed across the
  TBPTT segments, so the model is trained on contexts of that many tokens; docs/sweeps.md §5)."""
  seq_len = train_config.get("seq_len")
  if not seq_len:
    return None
  return int(seq_len) * int(train_config.get("tbptt_segments") or 1)


def check_vocab(model, tok) -> None:
  if tok.vocab_size > model.config.vocab_size:
    raise ValueError(
      f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model only "
      f"{model.config.vocab_size}; pass the right --tokenizer"
    )


def _with_config(model, **changes):
  """The same parameters under a config with `changes` (e.g. dtype); shapes must not change."""
  cfg = model.config.replace(**changes)
  abstract = nnx.eval_shape(lambda: Mamba2LM(cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(model))
