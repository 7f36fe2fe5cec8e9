"""``shard_map`` wrapper: run any SSD impl under a mesh, batch on data axes, heads on tensor.

Mosaic (and Triton) kernels cannot be auto-partitioned by XLA's SPMD partitioner, so the
SSD runs per shard inside ``jax.shard_map``:

  x (b,L,H,P), dt (b,L,H)          -> batch over ``batch_axes``, sequence over ``context_axis``
                                      (contiguous slices in order; context.py passes the
                                      state between them), heads over ``head_axis``
  A, dt_bias (H,), D (H,) / (H,P)  -> heads over ``head_axis``
  initial_state (b,H,P,N), y, final_state -> batch and heads
  segment_ids (b,L)                -> batch and sequence
  B, C (b,L,G,N)                   -> groups over ``head_axis`` when G is divisible by its size
                                      (head h uses group h // (H/G), which stays local); otherwise
                                      replicated over ``head_axis`` and every shard gathers the
                                      groups of its own heads (one group per shard when the
                                      shard's heads all share one group, else one per head).

``check_vma=False`` because the kernels' ``pallas_call`` has no replication rule; cotangents of
inputs replicated over an axis are summed over it by shard_map's transpose (tested against
the unsharded gradients in tests/ssd/test_ssd_sharded.py).

:func:`mamba2_jax.ssd.ssd` routes here by itself for a Pallas impl under a multi-device mesh
context (``jax.set_mesh``) without manual axes; inside the shard_map the axes are manual, so the
per-shard call runs the kernel directly. Direct use::

    f = sharded_ssd(mesh, ssd, impl="pallas_tpu", chunk_size=256, return_final_state=True)
    y, h = f(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=h0, segment_ids=seg)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as PS

from .context import context_ssd


__all__ = ["sharded_ssd"]


def _axis_size(mesh, axes):
  return math.prod(mesh.shape[a] for a in axes)


def sharded_ssd(
  mesh,
  ssd,
  *,
  batch_axes=("data", "fsdp"),
  head_axis="tensor",
  context_axis="context",
  **ssd_kwargs,
):
  """Returns ``f(x, dt, A, B, C, *, D=None, dt_bias=None, initial_state=None,
  segment_ids=None)`` computing ``ssd`` (:func:`mamba2_jax.ssd.ssd`, passed in: the op calls
  this wrapper, so the wrapper does not import the op) with ``ssd_kwargs`` per shard.

  Axes of ``batch_axes`` / ``head_axis`` / ``context_axis`` missing from the mesh are ignored
  (treated as size 1). With a ``context_axis`` of size > 1 the sequence is split over it in
  order and the shards pass their states (:func:`mamba2_jax.ssd.context.context_ssd`).
  Raises ValueError when the batch, the heads or the length do not divide the axis sizes.
  """
  names = tuple(mesh.axis_names)
  if isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  baxes = tuple(a for a in batch_axes if a in names)
  hax = head_axis if (head_axis is not None and head_axis in names) else None
  bspec = (baxes if len(baxes) > 1 else baxes[0]) if baxes else None
  nb = _axis_size(mesh, baxes)
  tp = mesh.shape[hax] if hax else 1
  cax = context_axis if (context_axis in names and mesh.shape[context_axis] > 1) else None
  cp = mesh.shape[cax] if cax else 1
  return_final = bool(ssd_kwargs.get("return_final_state", False))

  def f(x, dt, A, B, C, *, D=None, dt_bias=None, initial_state=None, segment_ids=None):
    b, L, H, P = x.shape
    G = B.shape[2]
    if b % nb:
      raise ValueError(
        f"sharded_ssd: batch {b} is not divisible by the batch axes {baxes} (size {nb})"
      )
    if H % tp:
      raise ValueError(
        f"sharded_ssd: nheads {H} is not divisible by the size {tp} of head axis {hax!r}"
      )
    if G < 1 or H % G:
      raise ValueError(f"sharded_ssd: nheads ({H}) must be divisible by ngroups ({G})")
    if L % cp:
      raise ValueError(
        f"sharded_ssd: sequence length {L} is not divisible by the size {cp} of context axis "
        f"{cax!r}"
      )
    Hl = H // tp
    R = H // G
    split_groups = G % tp == 0
    one_group = (not split_groups) and R % Hl == 0  # all of a shard's heads share a group

    spec = {
      "x": PS(bspec, cax, hax, None),
      "dt": PS(bspec, cax, hax),
      "A": PS(hax),
      "BC": PS(bspec, cax, hax if split_groups else None, None),
      "D": None if D is None else (PS(hax) if jnp.ndim(D) == 1 else PS(hax, None)),
      "dt_bias": PS(hax),
      "h0": PS(bspec, hax, None, None),
      "seg": PS(bspec, cax),
    }
    args = {"x": x, "dt": dt, "A": A, "B": B, "C": C}
    specs = {"x": spec["x"], "dt": spec["dt"], "A": spec["A"], "B": spec["BC"], "C": spec["BC"]}
    for k, v, s in (
      ("D", D, "D"),
      ("dt_bias", dt_bias, "dt_bias"),
      ("initial_state", initial_state, "h0"),
      ("segment_ids", segment_ids, "seg"),
    ):
      if v is not None:
        args[k] = v
        specs[k] = spec[s]
    keys = tuple(args)

    def local(*vals):
      kw = dict(zip(keys, vals))
      Bl, Cl = kw.pop("B"), kw.pop("C")
      if not split_groups and tp > 1:
        i = lax.axis_index(hax)
        if one_group:
          g0 = (i * Hl) // R
          Bl = lax.dynamic_slice_in_dim(Bl, g0, 1, axis=2)
          Cl = lax.dynamic_slice_in_dim(Cl, g0, 1, axis=2)
        else:  # one group per local head
          idx = (i * Hl + jnp.arange(Hl)) // R
          Bl = jnp.take(Bl, idx, axis=2)
          Cl = jnp.take(Cl, idx, axis=2)
      xl, dtl, Al = kw.pop("x"), kw.pop("dt"), kw.pop("A")
      if cax is not None:
        return context_ssd(ssd, xl, dtl, Al, Bl, Cl, axis_name=cax, **kw, **ssd_kwargs)
      return ssd(xl, dtl, Al, Bl, Cl, **kw, **ssd_kwargs)

    out_y = PS(bspec, cax, hax, None)
    out_specs = (out_y, PS(bspec, hax, None, None)) if return_final else out_y
    fn = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=tuple(specs[k] for k in keys),
      out_specs=out_specs,
      check_vma=False,
    )
    return fn(*(args[k] for k in keys))

  return f
