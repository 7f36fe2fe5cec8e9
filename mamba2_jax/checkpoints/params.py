"""Model parameters (no optimizer state) as an orbax checkpoint: a converted checkpoint's params/
(experiments.convert_hf) and a training step's params item are both read through here."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mamba2_jax.config import Mamba2Config
from mamba2_jax.model import Mamba2LM


def save_params(path: str, model: Mamba2LM) -> None:
  """Writes the model's parameters to an orbax checkpoint at `path` (must not exist)."""
  state = nnx.state(model, nnx.Param)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), nnx.to_pure_dict(state))


def param_target(config: Mamba2Config, shardings=None):
  """(graphdef, state, target) of an abstract Mamba2LM(config): `target` is its parameters as a
  pure dict of jax.ShapeDtypeStruct, placed on `shardings` (a matching tree) when given."""
  abstract = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(state)
  if shardings is not None:
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
    )
  return graphdef, state, target


def read_params(path: str, target):
  """The parameter pure dict stored at `path`, restored onto `target` (see `param_target`)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path), target)


def restore_params(path: str, config: Mamba2Config, shardings=None) -> Mamba2LM:
  """Restores a Mamba2LM saved by `save_params` (optionally onto given shardings)."""
  graphdef, state, target = param_target(config, shardings)
  nnx.replace_by_pure_dict(state, read_params(path, target))
  return nnx.merge(graphdef, state)
