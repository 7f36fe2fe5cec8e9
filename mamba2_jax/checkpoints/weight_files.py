"""Weight files of official / HF checkpoints as numpy state dicts, without importing torch.

``load_state_dict(path)`` dispatches on the path: ``.safetensors`` (``safetensors.numpy``, plus
a small reader for bfloat16 / float8, which that API cannot represent), ``.bin`` / ``.pt`` /
``.pth`` / ``.ckpt`` (the restricted unpickler of ``mamba2_jax.checkpoints.torch_pickle``), a
sharded index (``*.index.json``), or a directory holding one of
``model.safetensors[.index.json]`` / ``pytorch_model.bin[.index.json]``.
"""

from __future__ import annotations

import json
import math
import os
import zipfile

import ml_dtypes
import numpy as np

from mamba2_jax.checkpoints.torch_pickle import (
  UnreadableCheckpointError,
  UnsupportedCheckpointError,
  load_torch_state_dict,
)

__all__ = ["WEIGHT_FILES", "load_safetensors", "load_state_dict"]


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------
_ST_EXTRA_DTYPES = {
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "I64": np.int64,
  "U64": np.uint64,
  "I32": np.int32,
  "U32": np.uint32,
  "I16": np.int16,
  "U16": np.uint16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
  **_ST_EXTRA_DTYPES,
}


def _safetensors_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if n <= 0 or n > 100 * 2**20:
      raise UnreadableCheckpointError(f"{path}: not a safetensors file (header length {n})")
    header = json.loads(f.read(n))
  return header, 8 + n


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """``safetensors.numpy.load_file``, with a direct reader for dtypes numpy lacks (BF16, F8)."""
  path = os.fspath(path)
  header, start = _safetensors_header(path)
  needs_raw = any(
    isinstance(v, dict) and v.get("dtype") in _ST_EXTRA_DTYPES for v in header.values()
  )
  if not needs_raw:
    from safetensors.numpy import load_file

    return dict(load_file(path))
  out: dict[str, np.ndarray] = {}
  with open(path, "rb") as f:
    for name, meta in header.items():
      if name == "__metadata__":
        continue
      dt = _ST_DTYPES.get(meta["dtype"])
      if dt is None:
        raise UnsupportedCheckpointError(
          f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}"
        )
      dt = np.dtype(dt).newbyteorder("<")
      b, e = meta["data_offsets"]
      shape = tuple(meta["shape"])
      if e - b != math.prod(shape) * dt.itemsize:
        raise UnreadableCheckpointError(
          f"{path}: tensor {name!r} byte range {b}:{e} does not match shape {shape}"
        )
      f.seek(start + b)
      arr = np.frombuffer(f.read(e - b), dtype=dt).reshape(shape)
      out[name] = arr.astype(dt.newbyteorder("="), copy=True)
  return out


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
_TORCH_EXTS = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_FILES = (  # what a checkpoint directory holds, in order of preference
  "model.safetensors.index.json",
  "model.safetensors",
  "pytorch_model.bin.index.json",
  "pytorch_model.bin",
)


def _load_index(path: str) -> dict[str, np.ndarray]:
  with open(path) as f:
    index = json.load(f)
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise UnreadableCheckpointError(f"{path}: no 'weight_map' in the shard index")
  base = os.path.dirname(path)
  shards: dict[str, list[str]] = {}
  for name, shard in weight_map.items():
    shards.setdefault(shard, []).append(name)
  out: dict[str, np.ndarray] = {}
  for shard, names in shards.items():
    if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
      raise UnreadableCheckpointError(
        f"{path}: shard path {shard!r} escapes the checkpoint directory"
      )
    part = load_state_dict(os.path.join(base, shard))
    missing = [n for n in names if n not in part]
    if missing:
      raise UnreadableCheckpointError(
        f"{path}: shard {shard} lacks {missing[:5]}{'...' if len(missing) > 5 else ''}"
      )
    for n in names:
      out[n] = part[n]
  return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Load a checkpoint as ``{name: np.ndarray}`` without torch.

  ``path`` may be a ``.safetensors`` file, a torch ``.bin``/``.pt``/``.pth``/``.ckpt`` file
  (zipfile format, restricted unpickler), a sharded index ``*.index.json`` (shards are merged;
  only the tensors its weight_map names are returned) or a directory containing one of
  model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json,
  pytorch_model.bin (first found wins).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for cand in WEIGHT_FILES:
      p = os.path.join(path, cand)
      if os.path.isfile(p):
        return load_state_dict(p)
    raise FileNotFoundError(f"{path}: none of {', '.join(WEIGHT_FILES)} found")
  if not os.path.isfile(path):
    raise FileNotFoundError(path)
  lower = path.lower()
  if lower.endswith(".index.json"):
    return _load_index(path)
  if lower.endswith(".safetensors"):
    return load_safetensors(path)
  if lower.endswith(_TORCH_EXTS) or zipfile.is_zipfile(path):
    return load_torch_state_dict(path)
  raise UnsupportedCheckpointError(
    f"{path}: unknown checkpoint type (expected .safetensors, .bin/.pt/.pth/.ckpt, *.index.json or a directory)"
  )
