"""Where models come from: `load_model(spec)` for every kind of model source.

Model sources (`--checkpoint` of experiments.evaluate / experiments.demo, a sweep's
`checkpoint`):
  random:<preset>[:seed]   a randomly initialised Mamba2LM(Mamba2Config.preset(preset))
                           (benchmarks, tests); default tokenizer byte
  DIR with config.json or mamba2_jax_config.json
                           an official / HF checkpoint (mamba2_jax.checkpoints.hub) or a converted
                           one (mamba2_jax.checkpoints.params), via from_pretrained; default
                           tokenizer neox
  any other DIR            a training workdir of this project (mamba2_jax.checkpoints.workdir):
                           one complete step (default: the newest), its parameters verified
                           against the checksums saved with them (`load_workdir_model`); default
                           tokenizer: the one the run was trained with
  WORKDIR/checkpoints/<N>  that step of the training workdir (`split_step_dir`)

A damaged or missing workdir step raises `CheckpointError`; the evaluation jobs
(mamba2_jax.eval.jobs) retry it and fall back to the steps that load.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from mamba2_jax.checkpoints.checksums import verify
from mamba2_jax.checkpoints.hub import OUR_CONFIG, from_pretrained
from mamba2_jax.checkpoints.params import param_target, read_params
from mamba2_jax.checkpoints.weight_files import WEIGHT_FILES
from mamba2_jax.checkpoints.workdir import (
  CHECKPOINT_DIR,
  CheckpointError,
  checkpoint_dir,
  complete_steps,
  read_meta,
  train_len,
)
from mamba2_jax.config import Mamba2Config
from mamba2_jax.data import get_tokenizer
from mamba2_jax.errors import InvalidInput
from mamba2_jax.model import Mamba2LM

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


def split_step_dir(spec: str) -> tuple[str, int] | None:
  """(WORKDIR, N) for the directory of one step, WORKDIR/checkpoints/N; else None."""
  path = os.path.abspath(spec)
  parent, name = os.path.split(path)
  if not (name.isdigit() and os.path.basename(parent) == CHECKPOINT_DIR and os.path.isdir(path)):
    return None
  return os.path.dirname(parent), int(name)


def is_workdir(spec: str) -> bool:
  """A directory that is not a pretrained checkpoint nor a step's directory: a training workdir
  (possibly still without checkpoints, for --mode=watch started before the trainer)."""
  return (
    not spec.startswith(RANDOM_PREFIX)
    and os.path.isdir(spec)
    and not is_pretrained_dir(spec)
    and split_step_dir(spec) is None
  )


def _overrides(model_dtype: str) -> dict:
  return {"dtype": model_dtype} if model_dtype else {}


def load_model(
  spec: str, *, step: int | None = None, tokenizer: str = "", model_dtype: str = ""
) -> LoadedModel:
  """The model, tokenizer and metadata of any model source (see the module docstring).

  `step` picks a training workdir's step (default: the newest complete one); `tokenizer`
  overrides the source's default tokenizer; `model_dtype` (e.g. "bfloat16") the compute dtype.
  """
  if is_workdir(spec):
    return _load_workdir(spec, step, tokenizer=tokenizer, model_dtype=model_dtype)
  step_dir = split_step_dir(spec)
  if step_dir is not None and step in (None, step_dir[1]):
    return _load_workdir(step_dir[0], step_dir[1], tokenizer=tokenizer, model_dtype=model_dtype)
  if step is not None:
    raise InvalidInput(f"--checkpoint {spec!r}: a step applies to training workdirs only")
  if spec.startswith(RANDOM_PREFIX):
    parts = spec[len(RANDOM_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
      raise InvalidInput(f"--checkpoint {spec!r}: expected random:<preset>[:seed]")
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
    what = "is not a directory" if os.path.exists(spec) else "does not exist"
    raise FileNotFoundError(
      f"--checkpoint {spec!r} {what}; expected random:<preset>[:seed], a checkpoint directory "
      "(mamba2_jax_config.json, or config.json and weights), a training workdir or its "
      "checkpoints/<step> directory"
    )
  check_vocab(model, tok)
  return LoadedModel(model, tok, meta)


def _load_workdir(workdir: str, step, *, tokenizer: str, model_dtype: str) -> LoadedModel:
  """One step of a training workdir; raises CheckpointError for a damaged step."""
  model, meta = load_workdir_model(workdir, step)
  if model_dtype and model.config.dtype != model_dtype:
    model = _with_config(model, dtype=model_dtype)
  tok_identity = meta.get("tokenizer")
  if tokenizer:
    tok = get_tokenizer(tokenizer)
  elif isinstance(tok_identity, dict) and tok_identity.get("name") == "byte":
    tok = get_tokenizer("byte")
  elif isinstance(tok_identity, dict) and str(tok_identity.get("name")).startswith("gpt-neox-20b"):
    tok = get_tokenizer(tok_identity["name"])  # gpt-neox-20b[:vocab=N]
  elif isinstance(tok_identity, dict) and str(tok_identity.get("name")).startswith("synthetic-"):
    tok = get_tokenizer(tok_identity["name"])
  else:
    raise InvalidInput(
      f"{workdir} step {step}: cannot pick a tokenizer for identity "
      f"{tok_identity!r}; pass --tokenizer"
    )
  tok.check_compatible(
    tok_identity,
    f"the checkpoint {workdir} step {step}",
    "Leave --tokenizer out to use the checkpoint's own, or pass the one it was trained with.",
  )
  check_vocab(model, tok)
  meta = {k: v for k, v in meta.items() if k != "checksums"}
  meta.update(
    source=os.path.abspath(workdir),
    step=int(meta.get("step", step)),
    train_len=train_len(meta.get("config") or {}),
  )
  return LoadedModel(model, tok, meta)


def load_workdir_model(
  workdir: str, step: int | None = None, *, shardings=None
) -> tuple[Mamba2LM, dict[str, Any]]:
  """The model of a training workdir at `step` (default: newest), parameters verified.

  Returns (Mamba2LM, meta); meta has "step", "tokens_seen", "tokenizer" (identity dict),
  "config" (the training config as a dict; "seq_len" is the training length), "model" and
  "checksums". The parameters go onto `shardings` (a tree matching the model's parameters),
  by default the first local device. Raises CheckpointError for a missing or damaged step.
  """
  steps = complete_steps(workdir)
  if not steps:
    raise CheckpointError(f"{workdir}: no complete checkpoint under {checkpoint_dir(workdir)}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"{workdir}: no complete checkpoint step {step} (have {steps})")
  meta = read_meta(workdir, step)
  config = Mamba2Config.from_dict(meta["model"])
  graphdef, _, target = param_target(config, shardings)
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), target)
  path = os.path.join(checkpoint_dir(workdir), str(step), "params")
  try:
    params = read_params(path, target)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(
      f"checkpoint step {step}: params unreadable "
      f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
    ) from e
  verify(params, meta.get("checksums", {}).get("params", {}), "params", step)
  return nnx.merge(graphdef, params), meta


def check_vocab(model, tok) -> None:
  if tok.vocab_size > model.config.vocab_size:
    raise InvalidInput(
      f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model only "
      f"{model.config.vocab_size}; pass the right --tokenizer"
    )


def _with_config(model, **changes):
  """The same parameters under a config with `changes` (e.g. dtype); shapes must not change."""
  cfg = model.config.replace(**changes)
  abstract = nnx.eval_shape(lambda: Mamba2LM(cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(model))
