"""Saving and restoring model parameters (no optimizer state) with orbax."""

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


def restore_params(path: str, config: Mamba2Config, shardings=None) -> Mamba2LM:
  """Restores a Mamba2LM saved by `save_params` (optionally onto given shardings)."""
  abstract = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(state)
  if shardings is not None:
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
    )
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.abspath(path), target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
