"""Checksums of saved arrays: a layout-independent `fingerprint` of every leaf, and `verify`.

Orbax does not validate what it reads back, so a training checkpoint's `meta["checksums"]`
stores the fingerprint of every saved array and every restore recomputes and compares it
(`verify` raises `CheckpointError` naming the step and the first mismatching leaves).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mamba2_jax.checkpoints.workdir import CheckpointError

_MUL1, _MUL2 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)


def _as_u32(x):
  """Bit pattern of x as uint32 words (64-bit types give 2 words per element)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = x.dtype.itemsize * 8
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  u = jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits])
  return u.astype(jnp.uint32)


def _flat_index(shape):
  """Row-major element index as uint32 (wrapping mod 2**32), built from per-axis iotas."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for ax in range(len(shape) - 1, -1, -1):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, ax) * np.uint32(stride % 2**32)
    stride *= shape[ax]
  return idx


def _leaf_fingerprint(x):
  u = _as_u32(x)
  i = _flat_index(u.shape)
  w1 = (i * _MUL1) | np.uint32(1)  # odd weights: any change of one word changes h1
  w2 = ((i + np.uint32(7)) * _MUL2) | np.uint32(1)
  rot = (u << np.uint32(13)) | (u >> np.uint32(19))
  return jnp.stack([jnp.sum(u * w1, dtype=jnp.uint32), jnp.sum(rot * w2, dtype=jnp.uint32)])


_fingerprint_jit = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def fingerprint(tree) -> dict[str, str]:
  """{leaf path: "shape dtype hash"} for every array leaf of `tree`.

  The hash is two wrapping uint32 sums of the leaf's bit pattern with position-dependent odd
  weights, computed on device as global reductions, so it is independent of the sharding and
  of the device count (a checkpoint restored onto another mesh verifies against the same
  values), and any change of a single element changes it.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  arrays = {_path_str(p): v for p, v in leaves if hasattr(v, "shape")}
  hashes = jax.device_get(_fingerprint_jit(arrays))
  return {
    k: f"{tuple(v.shape)} {jnp.dtype(v.dtype).name} {int(h[0]):08x}{int(h[1]):08x}"
    for (k, v), h in zip(arrays.items(), (hashes[k] for k in arrays))
  }


def verify(tree, expected: dict[str, str], what: str, step: int) -> None:
  """Raises CheckpointError naming the step and the first mismatching leaves."""
  got = fingerprint(tree)
  bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
  if bad:
    detail = "; ".join(f"{k}: saved {expected.get(k)}, restored {got.get(k)}" for k in bad[:3])
    raise CheckpointError(
      f"checkpoint step {step}: {what} checksum mismatch in {len(bad)} array(s) ({detail})"
    )
