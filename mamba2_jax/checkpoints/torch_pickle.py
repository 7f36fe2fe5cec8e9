"""Read PyTorch / safetensors checkpoints into numpy arrays without importing torch.

``load_torch_state_dict(path)`` reads the zipfile checkpoint format that ``torch.save`` has
written by default since torch 1.6::

    <archive>/data.pkl       pickle (protocol 2) of the saved object; tensors are reduced to
                             torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                             and storages are *persistent ids*
                             ("storage", torch.<Type>Storage, key, location, numel)
    <archive>/data/<key>     raw bytes of storage <key> (numel * itemsize bytes)
    <archive>/byteorder      "little" | "big" (absent in old files: little)
    <archive>/version, .format_version, .storage_alignment, .data/serialization_id

The pickle is read with a *restricted* unpickler: only the handful of globals a state dict
needs resolve (to local stand-ins, never to torch or to anything importable); every other
global -- ``os.system``, ``builtins.eval``, a custom class, ... -- raises
:class:`UnsafeCheckpointError` before anything is called. Nothing from the file is executed.

Every weight-file format (this one, safetensors, sharded indexes) is read through
``load_state_dict`` of ``mamba2_jax.checkpoints.weight_files``.

bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays. Tensors are returned as
independent C-contiguous numpy arrays: a tensor that is exactly its whole storage is a view of
the freshly read buffer (no second copy); views with offsets/strides, and any further tensor
sharing an already used storage (e.g. tied embeddings), are copied, so no two returned arrays
alias each other.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import tarfile
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from mamba2_jax.errors import UserError

__all__ = [
  "UnreadableCheckpointError",
  "UnsafeCheckpointError",
  "UnsupportedCheckpointError",
  "load_torch_pickle",
  "load_torch_state_dict",
]


class UnreadableCheckpointError(UserError, ValueError):
  """A weight file could not be read (a damaged training step is a different error:
  `mamba2_jax.checkpoints.workdir.CheckpointError`)."""


class UnsupportedCheckpointError(UnreadableCheckpointError):
  """The file is not in a format this reader supports (legacy torch format, TorchScript, ...)."""


class UnsafeCheckpointError(UnreadableCheckpointError, pickle.UnpicklingError):
  """The pickle references a global outside the allow-list (possibly malicious)."""


# --------------------------------------------------------------------------------------------
# Allow-list
# --------------------------------------------------------------------------------------------
class _Frozen:
  """Allow-listed stand-ins are shared module objects: a pickle's BUILD opcode must not be able
  to modify them (no __dict__, attribute assignment refused)."""

  __slots__ = ()

  def __setattr__(self, name, value):
    raise UnreadableCheckpointError(
      f"corrupt or malicious checkpoint: tries to set attribute {name!r} on {self!r}"
    )

  def __delattr__(self, name):
    raise UnreadableCheckpointError(
      f"corrupt or malicious checkpoint: tries to delete attribute {name!r} on {self!r}"
    )


class _StorageType(_Frozen):
  """Stand-in for the torch.<X>Storage class named in a persistent id (never callable)."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", np.dtype(dtype))

  def __repr__(self) -> str:
    return f"<storage type torch.{self.name} ({self.dtype})>"


class _Function(_Frozen):
  """Stand-in for an allow-listed torch function, calling our numpy implementation."""

  __slots__ = ("name", "fn")

  def __init__(self, name: str, fn):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "fn", fn)

  def __call__(self, *args):
    return self.fn(*args)

  def __repr__(self) -> str:
    return f"<{self.name} (numpy stand-in)>"


_TYPED_STORAGES = {
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "DoubleStorage": np.float64,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _Storage:
  """One storage record read from the archive: a 1-D numpy array of its dtype."""

  __slots__ = ("key", "array", "claimed")

  def __init__(self, key: str, array: np.ndarray):
    self.key = key
    self.array = array
    self.claimed = False  # a returned tensor already is a view of the whole buffer


def _as_int(v: Any, what: str) -> int:
  if isinstance(v, bool) or not isinstance(v, int):
    raise UnreadableCheckpointError(f"corrupt checkpoint: tensor {what} is {v!r}, expected an int")
  return v


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  """numpy version of torch._utils._rebuild_tensor_v2 (strided view into a storage)."""
  if not isinstance(storage, _Storage):
    raise UnreadableCheckpointError(
      f"corrupt checkpoint: tensor storage is {type(storage).__name__}, "
      "expected a persistent storage reference"
    )
  if (
    not isinstance(size, (tuple, list))
    or not isinstance(stride, (tuple, list))
    or len(size) != len(stride)
  ):
    raise UnreadableCheckpointError(f"corrupt checkpoint: tensor size {size!r} / stride {stride!r}")
  offset = _as_int(storage_offset, "storage_offset")
  size = tuple(_as_int(s, "size") for s in size)
  stride = tuple(_as_int(s, "stride") for s in stride)
  if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise UnreadableCheckpointError(
      f"corrupt checkpoint: negative offset/size/stride ({offset}, {size}, {stride})"
    )
  buf = storage.array
  dtype = buf.dtype
  numel = math.prod(size)
  if numel == 0:
    return np.zeros(size, dtype=dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= buf.size:  # never let as_strided read outside the storage
    raise UnreadableCheckpointError(
      f"corrupt checkpoint: tensor (offset {offset}, size {size}, stride {stride}) reaches element "
      f"{last} of storage '{storage.key}' which holds only {buf.size} elements"
    )
  contiguous = stride == _contiguous_strides(size)
  if contiguous and offset == 0 and numel == buf.size and not storage.claimed:
    storage.claimed = True
    return buf.reshape(size)
  view = np.lib.stride_tricks.as_strided(
    buf[offset:], shape=size, strides=tuple(s * dtype.itemsize for s in stride), writeable=False
  )
  return np.array(view, order="C", copy=True)


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
  strides, acc = [], 1
  for n in reversed(size):
    strides.append(acc)
    acc *= max(n, 1)
  return tuple(reversed(strides))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _Function(
    "torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2
  ),
  ("torch._utils", "_rebuild_parameter"): _Function(
    "torch._utils._rebuild_parameter", _rebuild_parameter
  ),
  ("torch._utils", "_rebuild_parameter_with_state"): _Function(
    "torch._utils._rebuild_parameter_with_state", _rebuild_parameter_with_state
  ),
  ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
  ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
}
for _name, _dt in _TYPED_STORAGES.items():
  _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name, _dt)


# --------------------------------------------------------------------------------------------
# Unpickler
# --------------------------------------------------------------------------------------------
_LEGACY_MAGIC_PICKLE = (
  b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickle of 0x1950a86a20f9469cfc6c
)
_RESAVE_HINT = (
  "re-save it with torch>=1.6 (torch.save's default zipfile format, e.g. "
  "torch.save(torch.load(f, weights_only=True), f2)) or convert it to safetensors"
)


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, path: str, big_endian: bool):
    super().__init__(file)
    self._zf = zf
    self._prefix = prefix
    self._path = path
    self._big_endian = big_endian
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f"refusing to load {self._path}: its pickle references the global '{module}.{name}', "
        "which is not one of the few a tensor state dict needs (torch._utils._rebuild_tensor_v2, "
        "torch._utils._rebuild_parameter, torch.*Storage, collections.OrderedDict). The file may "
        "be malicious, or it holds objects other than tensors (unsupported); nothing was executed."
      ) from None

  def persistent_load(self, pid):
    if (
      not isinstance(pid, tuple)
      or len(pid) != 5
      or pid[0] != "storage"
      or not isinstance(pid[1], _StorageType)
      or not isinstance(pid[2], str)
    ):
      raise UnreadableCheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
    _, stype, key, _location, numel = pid
    numel = _as_int(numel, "storage numel")
    st = self._storages.get(key)
    if st is not None:
      if st.array.dtype != stype.dtype:
        raise UnreadableCheckpointError(
          f"{self._path}: storage '{key}' referenced as {st.array.dtype} and {stype.dtype}"
        )
      return st
    st = _Storage(key, self._read_storage(key, stype.dtype, numel))
    self._storages[key] = st
    return st

  def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f"{self._prefix}data/{key}"
    try:
      info = self._zf.getinfo(name)
    except KeyError:
      raise UnreadableCheckpointError(f"{self._path}: storage record '{name}' is missing") from None
    nbytes = numel * dtype.itemsize
    if info.file_size < nbytes:
      raise UnreadableCheckpointError(
        f"{self._path}: storage '{name}' has {info.file_size} bytes, "
        f"expected {nbytes} ({numel} x {dtype})"
      )
    raw = np.empty(nbytes, dtype=np.uint8)
    with self._zf.open(info) as f:
      mv = memoryview(raw)
      got = 0
      while got < nbytes:
        n = f.readinto(mv[got:])
        if not n:
          break
        got += n
    if got != nbytes:
      raise UnreadableCheckpointError(
        f"{self._path}: short read of '{name}' ({got} of {nbytes} bytes)"
      )
    arr = raw.view(dtype)
    if self._big_endian and dtype.itemsize > 1:
      arr.view(f"u{dtype.itemsize}").byteswap(inplace=True)
    return arr


_FORBIDDEN_OPCODES = {
  "EXT1",
  "EXT2",
  "EXT4",
}  # copyreg extension codes can bypass find_class via its cache


def _prescan(data: bytes, path: str) -> None:
  """Static pass over the opcodes (nothing is executed) before unpickling."""
  import pickletools

  try:
    for op, arg, _pos in pickletools.genops(data):
      if op.name in _FORBIDDEN_OPCODES:
        raise UnsafeCheckpointError(
          f"refusing to load {path}: its pickle uses the {op.name} opcode (copyreg extension "
          "registry), which torch checkpoints never use; the file may be malicious."
        )
  except UnreadableCheckpointError:
    raise
  except Exception as e:  # malformed opcode stream
    raise UnreadableCheckpointError(
      f"{path}: data.pkl is not a valid pickle: {type(e).__name__}: {e}"
    ) from e


def _check_not_legacy(path: str) -> None:
  with open(path, "rb") as f:
    head = f.read(len(_LEGACY_MAGIC_PICKLE))
  if head == _LEGACY_MAGIC_PICKLE:
    raise UnsupportedCheckpointError(
      f"{path} is in torch's legacy (pre-1.6, non-zip) serialization format, which this reader "
      f"does not support; {_RESAVE_HINT}."
    )
  try:
    is_tar = tarfile.is_tarfile(path)
  except Exception:  # pragma: no cover - defensive
    is_tar = False
  if is_tar:
    raise UnsupportedCheckpointError(
      f"{path} is in torch's legacy tar serialization format, which this reader does not support; "
      f"{_RESAVE_HINT}."
    )
  if head[:1] == b"\x80":
    raise UnsupportedCheckpointError(
      f"{path} is a bare pickle, not a torch zipfile checkpoint (legacy format or plain pickle); "
      f"{_RESAVE_HINT}."
    )
  raise UnsupportedCheckpointError(
    f"{path} is not a torch zipfile checkpoint (no zip archive found)."
  )


def load_torch_pickle(path: str | os.PathLike) -> Any:
  """Unpickle a torch zipfile checkpoint with the restricted unpickler.

  Returns the saved object with tensors as numpy arrays (dicts / OrderedDicts / lists / tuples /
  Python scalars are kept as they are). As with torch.load, one tensor object saved under two
  names comes back as one array object (pickle memo); load_torch_state_dict unshares those. Raises UnsafeCheckpointError for disallowed globals and
  UnsupportedCheckpointError for the legacy format.
  """
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    _check_not_legacy(path)
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      hint = (
        " (looks like a TorchScript archive)"
        if any(n.endswith("constants.pkl") for n in names)
        else ""
      )
      raise UnsupportedCheckpointError(
        f"{path}: expected exactly one '<archive>/data.pkl' record, found {pkls}{hint}"
      )
    prefix = pkls[0][: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
      if order not in ("little", "big"):
        raise UnreadableCheckpointError(f"{path}: unknown byteorder record {order!r}")
      big_endian = order == "big"
    data = zf.read(pkls[0])
    _prescan(data, path)
    unpickler = _RestrictedUnpickler(io.BytesIO(data), zf, prefix, path, big_endian)
    try:
      return unpickler.load()
    except UnreadableCheckpointError:
      raise
    except (
      pickle.UnpicklingError,
      TypeError,
      ValueError,
      AttributeError,
      EOFError,
      IndexError,
      KeyError,
    ) as e:
      raise UnreadableCheckpointError(
        f"{path}: could not unpickle data.pkl: {type(e).__name__}: {e}"
      ) from e


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a torch.save'd state dict (zipfile format) as ``{name: np.ndarray}``, without torch."""
  obj = load_torch_pickle(path)
  if not isinstance(obj, Mapping):
    raise UnreadableCheckpointError(
      f"{os.fspath(path)}: top-level object is a {type(obj).__name__}, not a state dict"
    )
  out: dict[str, np.ndarray] = {}
  seen: set[int] = set()
  for k, v in obj.items():
    if not isinstance(k, str) or not isinstance(v, np.ndarray):
      raise UnreadableCheckpointError(
        f"{os.fspath(path)}: entry {k!r} is a {type(v).__name__}, not a tensor; use load_torch_pickle "
        "for nested checkpoints (e.g. {'model': state_dict, 'optimizer': ...})"
      )
    if id(v) in seen:  # the same tensor object saved under two names (pickle memo): unshare
      v = v.copy()
    seen.add(id(v))
    out[k] = v
  return out
