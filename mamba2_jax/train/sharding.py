"""Device mesh and shardings: mesh axes ("data", "fsdp", "context", "tensor"), logical rules.

The model names the axes of every parameter (mamba2_jax/layers.py: "layers", "vocab", "embed",
"inner", "heads", "group_state", ...); `config.logical_axis_rules` maps them to mesh axes:
data parallelism replicates parameters and splits the batch over "data"; FSDP additionally
shards parameters on "embed" over "fsdp" (the batch is split over data x fsdp); tensor
parallelism shards heads / d_inner / vocab over "tensor"; context parallelism splits the
sequence ("length") of the step's inputs, targets and segment ids over "context" in contiguous
slices (the SSD passes states between them, mamba2_jax/ssd/context.py); the default rules
(configs/base.py) also shard parameters and optimizer state on "embed" over "context", as FSDP
(gathered per layer, gradients reduce-scattered), so a long-sequence run does not hold a full
copy of them on every device.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mamba2_jax.train.config import MESH_AXES, resolve_mesh_shape

__all__ = [
  "make_mesh",
  "param_specs",
  "shardings_of",
  "batch_spec",
  "token_spec",
  "rules_tuple",
  "data_readers",
]


def make_mesh(mesh_shape, devices=None) -> jax.sharding.Mesh:
  """Mesh over `devices` (default: all) with Auto axes ("data", "fsdp", "context", "tensor");
  `mesh_shape` as in the config (3 sizes: context 1)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def rules_tuple(rules) -> tuple:
  """Config rules (possibly lists from JSON) as the hashable tuples flax expects."""
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in rules)


def _fit(spec: P, shape, mesh) -> P:
  """Drops mesh axes that do not divide the array dimension (e.g. 3 heads over tensor=2),
  replicating that dimension instead of failing."""
  out = []
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = ax if isinstance(ax, tuple) else (ax,)
    size = int(np.prod([mesh.shape[a] for a in axes if a is not None]))
    out.append(ax if ax is None or dim % size == 0 else None)
  return P(*out)


def param_specs(abstract_state, rules, mesh) -> dict:
  """PartitionSpecs (a pure dict like nnx.to_pure_dict(state)) of the model parameters."""
  with nnx.logical_axis_rules(rules_tuple(rules)):
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  shapes = nnx.to_pure_dict(abstract_state)
  return jax.tree.map(
    lambda s, a: _fit(s, a.shape, mesh), specs, shapes, is_leaf=lambda x: isinstance(x, P)
  )


def shardings_of(specs, mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _rule_axes(mesh, rules, name, default):
  """The mesh axes (a tuple, those of `mesh` only) that the rule for `name` maps to."""
  axes = dict(rules_tuple(rules)).get(name, default)
  return tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a in mesh.axis_names)


def _entry(axes):
  return axes if len(axes) > 1 else (axes[0] if axes else None)


def batch_spec(mesh, rules) -> P:
  """Spec of the delivered (batch, P*seq_len + 1) rows: batch over the mesh axes of the
  "batch" rule, the length replicated (one more token than seq_len does not split evenly; the
  step slices its inputs and targets onto the "length" axes, `token_spec`, without
  communication)."""
  return P(_entry(_rule_axes(mesh, rules, "batch", ("data", "fsdp"))), None)


def data_readers(mesh, rules, batch_size: int) -> tuple[int, int]:
  """(this process's reader index, number of readers) for rows delivered as `batch_spec`.

  Processes whose devices hold the same batch rows are one reader: they read the same data
  (every host of a context group holds the whole of its sequences, `batch_spec`; each device
  keeps its slice of the length). Without context parallelism across hosts every process is
  its own reader, in the order of the rows it holds."""
  sharding = NamedSharding(mesh, batch_spec(mesh, rules))
  rows: dict[int, set] = {}
  for device, index in sharding.devices_indices_map((batch_size, 1)).items():
    r = index[0]
    rows.setdefault(device.process_index, set()).add((r.start or 0, r.stop or batch_size))
  groups = sorted({tuple(sorted(v)) for v in rows.values()})
  return groups.index(tuple(sorted(rows[jax.process_index()]))), len(groups)


def token_spec(mesh, rules) -> P:
  """Spec of the step's (batch, seq_len) inputs, targets and segment ids: batch over the
  "batch" rule's mesh axes, the length over the "length" rule's (default "context")."""
  batch = _rule_axes(mesh, rules, "batch", ("data", "fsdp"))
  length = _rule_axes(mesh, rules, "length", "context")
  return P(_entry(batch), _entry(length))
