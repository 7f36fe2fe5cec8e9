"""mamba2_jax.checkpoints.torch_pickle and weight_files: torch-free checkpoint reading (run with
the main venv, no torch).

Fixtures come from tests/fixtures/make_torch_pickles.py and make_golden.py (torch venv).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import pickletools
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from mamba2_jax.checkpoints import torch_pickle as tp
from mamba2_jax.checkpoints.torch_pickle import (
  UnreadableCheckpointError,
  UnsafeCheckpointError,
  UnsupportedCheckpointError,
  load_torch_pickle,
  load_torch_state_dict,
)
from mamba2_jax.checkpoints.weight_files import load_safetensors, load_state_dict
from tests.paths import FIXTURES

FIX = str(FIXTURES)
TP = os.path.join(FIX, "torch_pickles")
MARKER = "mamba2_jax_pwned_marker"


def test_no_torch_imported():
  assert "torch" not in sys.modules


@pytest.fixture(scope="module")
def expected():
  with np.load(os.path.join(TP, "expected.npz")) as z:
    return {k: z[k] for k in z.files}


def _expect(expected, fname, key):
  if f"{fname}::{key}" in expected:
    return expected[f"{fname}::{key}"]
  return expected[f"{fname}::{key}::bf16bits"].view(ml_dtypes.bfloat16)


def _assert_same(got, want):
  assert got.shape == want.shape and got.dtype == want.dtype, (
    got.shape,
    got.dtype,
    want.shape,
    want.dtype,
  )
  if got.dtype == ml_dtypes.bfloat16:
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  else:
    np.testing.assert_array_equal(got, want)


def _assert_no_aliasing(arrays):
  for (ka, a), (kb, b) in itertools.combinations(arrays.items(), 2):
    assert not np.shares_memory(a, b), (ka, kb)


# ------------------------------------------------------------------------------------------
# committed torch.save fixtures
# ------------------------------------------------------------------------------------------
def test_dtypes(expected):
  sd = load_torch_state_dict(os.path.join(TP, "dtypes.pt"))
  want_dtypes = {
    "f32": np.float32,
    "f16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "f64": np.float64,
    "i64": np.int64,
    "i32": np.int32,
    "i16": np.int16,
    "i8": np.int8,
    "u8": np.uint8,
    "bool": np.bool_,
    "scalar": np.float32,
    "empty": np.float32,
  }
  assert list(sd) == list(want_dtypes)  # OrderedDict order preserved
  for k, dt in want_dtypes.items():
    assert sd[k].dtype == np.dtype(dt), k
    _assert_same(sd[k], _expect(expected, "dtypes.pt", k))
  assert sd["scalar"].shape == () and float(sd["scalar"]) == 2.75
  assert sd["empty"].shape == (0, 3)
  assert sd["bf16"].astype(np.float32)[0, 0] == 1.0 and sd["bf16"].astype(np.float32)[0, 2] > 9e29
  assert sd["i64"][2] == 2**40 + 3 and sd["i64"][3] == -(2**62)


def test_views_offsets_strides_shared_storage(expected):
  raw = load_torch_pickle(os.path.join(TP, "views.pt"))
  assert type(raw) is dict
  assert raw["tied_a"] is raw["tied_b"]  # one tensor object saved twice: pickle memo, as torch.load
  sd = load_torch_state_dict(os.path.join(TP, "views.pt"))
  for k, v in sd.items():
    _assert_same(v, _expect(expected, "views.pt", k))
    assert v.flags.c_contiguous and v.flags.writeable, k
  assert sd["transposed"].shape == (5, 3)
  np.testing.assert_array_equal(sd["shared_full"].ravel(), np.arange(12, dtype=np.float32))
  np.testing.assert_array_equal(sd["shared_slice"], np.arange(4, 8, dtype=np.float32))
  np.testing.assert_array_equal(sd["shared_t"], np.arange(12, dtype=np.float32).reshape(4, 3).T)
  np.testing.assert_array_equal(sd["expanded"], np.tile(np.arange(3, dtype=np.float32), (4, 1)))
  np.testing.assert_array_equal(sd["i64_step"], np.arange(20)[1:17:5])
  np.testing.assert_array_equal(sd["tied_a"], sd["tied_b"])
  _assert_no_aliasing(sd)
  sd["tied_a"][0, 0] = 123.0  # independent copies
  assert sd["tied_b"][0, 0] != 123.0


@pytest.mark.parametrize("fname", ["module_state_dict.pt", "module_keep_vars.pt"])
def test_module_state_dict(expected, fname):
  sd = load_torch_state_dict(os.path.join(TP, fname))
  assert list(sd) == [
    "steps",
    "emb.weight",
    "conv.weight",
    "conv.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
  ]
  for k, v in sd.items():
    _assert_same(v, _expect(expected, fname, k))
  np.testing.assert_array_equal(
    sd["head.weight"], sd["emb.weight"]
  )  # tied: one storage in the file
  _assert_no_aliasing(sd)
  assert sd["steps"].dtype == np.int64 and sd["steps"][2] == 2**40


def test_legacy_format_rejected():
  with pytest.raises(UnsupportedCheckpointError, match=r"legacy.*torch>=1\.6.*safetensors"):
    load_torch_state_dict(os.path.join(TP, "legacy_format.pt"))
  with pytest.raises(UnsupportedCheckpointError, match="legacy"):
    load_state_dict(os.path.join(TP, "legacy_format.pt"))


def test_committed_malicious_pickle_rejected(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the payload would write ./mamba2_jax_pwned_marker
  path = os.path.join(TP, "malicious_os_system.pt")
  with pytest.raises(UnsafeCheckpointError, match=r"'posix\.system'.*malicious"):
    load_torch_state_dict(path)
  with pytest.raises(UnsafeCheckpointError):
    load_state_dict(path)
  with pytest.raises(pickle.UnpicklingError):  # also an UnpicklingError for generic handlers
    load_torch_pickle(path)
  assert not (tmp_path / MARKER).exists()


# ------------------------------------------------------------------------------------------
# hand-built archives (a tiny torch-format writer, so corrupt/malicious variants need no torch)
# ------------------------------------------------------------------------------------------
def _u(s: str) -> bytes:
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _i(v: int) -> bytes:
  return b"J" + struct.pack("<i", v)


def _tup(vals) -> bytes:
  return b"(" + b"".join(_i(v) for v in vals) + b"t"


def _tensor_pickle(entries) -> bytes:
  """entries: (name, storage_class, key, numel, offset, size, stride) -> protocol-2 pickle of
  {name: torch._utils._rebuild_tensor_v2(<storage pid>, offset, size, stride, False, OrderedDict())}."""
  out = bytearray(b"\x80\x02}(")
  for name, sclass, key, numel, offset, size, stride in entries:
    out += _u(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
    out += (
      b"("
      + _u("storage")
      + b"ctorch\n"
      + sclass.encode()
      + b"\n"
      + _u(key)
      + _u("cpu")
      + _i(numel)
      + b"tQ"
    )
    out += (
      _i(offset) + _tup(size) + _tup(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR"
    )
  out += b"u."
  return bytes(out)


def _write_archive(
  path,
  pkl: bytes,
  records: dict[str, bytes] | None = None,
  byteorder: str | None = "little",
  prefix: str = "archive",
):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{prefix}/data.pkl", pkl)
    if byteorder is not None:
      zf.writestr(f"{prefix}/byteorder", byteorder)
    for key, data in (records or {}).items():
      zf.writestr(f"{prefix}/data/{key}", data)
    zf.writestr(f"{prefix}/version", "3\n")
  return str(path)


def test_handwritten_writer_matches_torch_layout(tmp_path):
  pickletools.dis(
    _tensor_pickle([("w", "FloatStorage", "0", 6, 0, (2, 3), (3, 1))]), out=io.StringIO()
  )
  base = np.arange(12, dtype=np.float32)
  p = _write_archive(
    tmp_path / "x.pt",
    _tensor_pickle(
      [
        ("full", "FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
        ("t", "FloatStorage", "0", 12, 1, (3, 2), (1, 4)),
        ("h", "HalfStorage", "1", 2, 0, (2,), (1,)),
      ]
    ),
    {"0": base.tobytes(), "1": np.array([1.5, -2], np.float16).tobytes()},
    prefix="some_name",
  )
  sd = load_torch_state_dict(p)
  np.testing.assert_array_equal(sd["full"], base.reshape(3, 4))
  np.testing.assert_array_equal(sd["t"], [[1, 5], [2, 6], [3, 7]])  # t[i, j] = base[1 + i + 4 j]
  np.testing.assert_array_equal(sd["h"], np.array([1.5, -2], np.float16))


def _call_pickle_global(module: str, name: str, arg: str) -> bytes:
  return b"\x80\x02c" + f"{module}\n{name}\n".encode() + _u(arg) + b"\x85R."


def _call_pickle_stack_global(module: str, name: str, arg: str) -> bytes:
  def su(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b

  return b"\x80\x04" + su(module) + su(name) + b"\x93" + su(arg) + b"\x85R."


def _call_pickle_inst(module: str, name: str, arg: str) -> bytes:  # protocol 0 INST opcode
  return b"(S'" + arg.encode() + b"'\ni" + f"{module}\n{name}\n".encode() + b"."


def _nested_in_state_dict(module: str, name: str, arg: str) -> bytes:
  ok = _tensor_pickle([("w", "FloatStorage", "0", 1, 0, (1,), (1,))])
  return ok[:-2] + _u("evil") + b"c" + f"{module}\n{name}\n".encode() + _u(arg) + b"\x85R" + b"u."


@pytest.mark.parametrize(
  "make", [_call_pickle_global, _call_pickle_stack_global, _call_pickle_inst, _nested_in_state_dict]
)
@pytest.mark.parametrize(
  "module,name",
  [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("subprocess", "getoutput"),
    ("torch", "load"),
    ("torch._utils", "_rebuild_tensor"),
    ("collections", "defaultdict"),
    ("builtins", "getattr"),
  ],
)
def test_malicious_globals_rejected_without_execution(tmp_path, monkeypatch, make, module, name):
  monkeypatch.chdir(tmp_path)
  marker = tmp_path / MARKER
  cmd = (
    f"touch {marker}" if name in ("system", "getoutput") else f"open({str(marker)!r}, 'w').close()"
  )
  pkl = make(module, name, cmd)
  pickletools.dis(pkl, out=io.StringIO())  # well-formed pickle (disassembly executes nothing)
  p = _write_archive(tmp_path / "evil.pt", pkl, {"0": np.zeros(1, np.float32).tobytes()})
  with pytest.raises(UnsafeCheckpointError) as ei:
    load_state_dict(p)
  assert f"'{module}.{name}'" in str(ei.value) and "malicious" in str(ei.value)
  assert not marker.exists()


def test_allowed_global_misuse_is_a_clean_error(tmp_path):
  # calling a storage stand-in, feeding junk to _rebuild_tensor_v2, BUILD (setattr / __dict__
  # update) on the shared allow-listed stand-ins, EXT opcodes: all clean CheckpointErrors
  cases = [
    b"\x80\x02ctorch\nFloatStorage\n)R.",
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
    + _u("x")
    + _i(0)
    + _tup((1,))
    + _tup((1,))
    + b"tR.",
    b"\x80\x02}(" + _u("a") + b"Q" + b"u.",  # malformed persistent id
    b"\x80\x02ctorch\nFloatStorage\nN}(" + _u("dtype") + _u("S9") + b"u\x86b.",  # BUILD slotstate
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}("
    + _u("fn")
    + _i(1)
    + b"ub.",  # BUILD dict state
    b"\x80\x02ccollections\nOrderedDict\nN}("
    + _u("x")
    + _i(1)
    + b"u\x86b.",  # setattr on the class
    b"\x80\x02\x82\x01.",  # EXT1
    b"\x80\x02\xff.",  # unknown opcode
  ]
  for i, pkl in enumerate(cases):
    p = _write_archive(tmp_path / f"bad{i}.pt", pkl)
    with pytest.raises(UnreadableCheckpointError):
      load_torch_pickle(p)
  # the shared stand-ins are untouched and later loads still work
  assert tp._ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype == np.float32
  assert list(load_torch_state_dict(os.path.join(TP, "dtypes.pt")))[0] == "f32"


@pytest.mark.parametrize(
  "entry,records,msg",
  [
    (
      ("w", "FloatStorage", "0", 6, 0, (3, 3), (3, 1)),
      {"0": b"\0" * 24},
      "reaches element",
    ),  # size > storage
    (
      ("w", "FloatStorage", "0", 6, 4, (2, 2), (1, 1)),
      {"0": b"\0" * 24},
      "reaches element",
    ),  # offset + view > storage
    (("w", "FloatStorage", "0", 6, 0, (2, 3), (-3, 1)), {"0": b"\0" * 24}, "negative"),
    (
      ("w", "FloatStorage", "0", 6, 0, (2, 3), (3, 1)),
      {"0": b"\0" * 20},
      "has 20 bytes",
    ),  # truncated record
    (("w", "FloatStorage", "7", 6, 0, (2, 3), (3, 1)), {"0": b"\0" * 24}, "missing"),
  ],
)
def test_corrupt_archives(tmp_path, entry, records, msg):
  p = _write_archive(tmp_path / "c.pt", _tensor_pickle([entry]), records)
  with pytest.raises(UnreadableCheckpointError, match=msg):
    load_torch_state_dict(p)


def test_same_storage_two_dtypes_rejected(tmp_path):
  p = _write_archive(
    tmp_path / "d.pt",
    _tensor_pickle(
      [("a", "FloatStorage", "0", 2, 0, (2,), (1,)), ("b", "IntStorage", "0", 2, 0, (2,), (1,))]
    ),
    {"0": b"\0" * 8},
  )
  with pytest.raises(UnreadableCheckpointError, match="referenced as"):
    load_torch_state_dict(p)


def test_big_endian_archive(tmp_path, expected):
  """Rewrite dtypes.pt as a big-endian machine would have saved it."""
  src = os.path.join(TP, "dtypes.pt")
  ref = load_torch_pickle(src)
  dst = tmp_path / "be.pt"
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    # torch.save numbers storages "0", "1", ... in pickling order: one per tensor here
    itemsizes = [v.dtype.itemsize for v in ref.values()]
    for info in zin.infolist():
      data = zin.read(info)
      if info.filename.endswith("/byteorder"):
        data = b"big"
      elif "/data/" in info.filename:
        key = info.filename.rsplit("/", 1)[1]
        n = itemsizes[int(key)]
        data = np.frombuffer(data, dtype=f"u{n}" if n > 1 else np.uint8).byteswap().tobytes()
      zout.writestr(info.filename, data)
  got = load_torch_pickle(str(dst))
  for k in ref:
    _assert_same(got[k], ref[k])


def test_not_a_checkpoint(tmp_path):
  p = tmp_path / "junk.bin"
  p.write_bytes(b"hello world, not a zip")
  with pytest.raises(UnsupportedCheckpointError, match="not a torch zipfile"):
    load_state_dict(str(p))
  p2 = tmp_path / "plain.pt"
  p2.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  with pytest.raises(UnsupportedCheckpointError, match="bare pickle"):
    load_state_dict(str(p2))
  with pytest.raises(UnsupportedCheckpointError, match="unknown checkpoint type"):
    (tmp_path / "w.npy").write_bytes(b"x")
    load_state_dict(str(tmp_path / "w.npy"))


def test_nested_checkpoint_needs_load_torch_pickle(tmp_path):
  ok = _tensor_pickle([("w", "FloatStorage", "0", 1, 0, (1,), (1,))])
  nested = b"\x80\x02}(" + _u("model") + ok[2:-1] + _u("step") + _i(5) + b"u."
  p = _write_archive(tmp_path / "n.pt", nested, {"0": np.ones(1, np.float32).tobytes()})
  with pytest.raises(UnreadableCheckpointError, match="load_torch_pickle"):
    load_torch_state_dict(p)
  obj = load_torch_pickle(p)
  assert obj["step"] == 5 and obj["model"]["w"].tolist() == [1.0]


# ------------------------------------------------------------------------------------------
# safetensors / index dispatch
# ------------------------------------------------------------------------------------------
def _write_safetensors_raw(path, tensors: dict[str, tuple[str, tuple, bytes]]):
  header, blob = {}, b""
  for name, (dt, shape, data) in tensors.items():
    header[name] = {
      "dtype": dt,
      "shape": list(shape),
      "data_offsets": [len(blob), len(blob) + len(data)],
    }
    blob += data
  h = json.dumps(header).encode()
  h += b" " * (-len(h) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + blob)


def test_safetensors_bfloat16(tmp_path):
  bf = np.array([[1.0, -2.5], [3e20, 0.1]], dtype=ml_dtypes.bfloat16)
  p = tmp_path / "bf.safetensors"
  _write_safetensors_raw(
    p,
    {
      "b": ("BF16", (2, 2), bf.tobytes()),
      "f": ("F32", (3,), np.arange(3, dtype=np.float32).tobytes()),
    },
  )
  sd = load_state_dict(str(p))
  assert load_safetensors(str(p)).keys() == sd.keys()
  assert sd["b"].dtype == ml_dtypes.bfloat16
  _assert_same(sd["b"], bf)
  np.testing.assert_array_equal(sd["f"], np.arange(3, dtype=np.float32))
  assert sd["b"].flags.writeable


def test_sharded_safetensors_index(tmp_path):
  from safetensors.numpy import save_file

  a, b, c = (
    np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in [(2, 3), (4,), (1, 5)]
  )
  save_file({"a": a, "b": b}, str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({"c": c}, str(tmp_path / "model-00002-of-00002.safetensors"))
  idx = {
    "metadata": {"total_size": 60},
    "weight_map": {
      "a": "model-00001-of-00002.safetensors",
      "b": "model-00001-of-00002.safetensors",
      "c": "model-00002-of-00002.safetensors",
    },
  }
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
  for src in (tmp_path / "model.safetensors.index.json", tmp_path):  # file or directory
    sd = load_state_dict(str(src))
    assert sorted(sd) == ["a", "b", "c"]
    np.testing.assert_array_equal(sd["c"], c)
  idx["weight_map"]["d"] = "model-00002-of-00002.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
  with pytest.raises(UnreadableCheckpointError, match="lacks"):
    load_state_dict(str(tmp_path))
  idx["weight_map"] = {"a": "../outside.safetensors"}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
  with pytest.raises(UnreadableCheckpointError, match="escapes"):
    load_state_dict(str(tmp_path))


def test_sharded_bin_index(expected):
  sd = load_state_dict(os.path.join(TP, "sharded", "pytorch_model.bin.index.json"))
  assert sorted(sd) == ["a.bias", "a.weight", "b.steps", "b.weight"]
  for k, v in sd.items():
    _assert_same(v, _expect(expected, "sharded", k))
  assert load_state_dict(os.path.join(TP, "sharded")).keys() == sd.keys()


# ------------------------------------------------------------------------------------------
# Mamba-2 fixtures: official pytorch_model.bin == HF safetensors (after rename + vocab padding)
# ------------------------------------------------------------------------------------------
def test_official_bin_matches_hf_safetensors():
  off = load_state_dict(os.path.join(FIX, "official_tiny_g2", "pytorch_model.bin"))
  hf = load_state_dict(os.path.join(FIX, "hf_tiny_g2"))  # directory -> model.safetensors
  with open(os.path.join(FIX, "official_tiny_g2", "config.json")) as f:
    cfg = json.load(f)
  V, mult = cfg["vocab_size"], cfg["pad_vocab_size_multiple"]
  Vp = -(-V // mult) * mult
  assert (V, Vp) == (100, 112)
  # HF (tied) omits lm_head; official stores it; embedding renamed
  assert "lm_head.weight" not in hf and "backbone.embeddings.weight" in hf
  assert set(off) == (
    {k for k in hf if k != "backbone.embeddings.weight"}
    | {"backbone.embedding.weight", "lm_head.weight"}
  )
  emb = off["backbone.embedding.weight"]
  assert emb.shape == (Vp, cfg["d_model"]) and emb.dtype == np.float32
  np.testing.assert_array_equal(emb[:V], hf["backbone.embeddings.weight"])
  assert not emb[V:].any()
  np.testing.assert_array_equal(off["lm_head.weight"], emb)  # tied (shared storage in the pickle)
  assert not np.shares_memory(off["lm_head.weight"], emb)
  for k, v in hf.items():
    if k != "backbone.embeddings.weight":
      _assert_same(off[k], v)
  assert off["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 128 + 2 * 2 * 16 + 8, 64)
  assert off["backbone.layers.1.mixer.conv1d.weight"].shape == (128 + 2 * 2 * 16, 1, 4)
  assert load_state_dict(os.path.join(FIX, "official_tiny_g2")).keys() == off.keys()


def _read_hf_config(name):
  with open(os.path.join(FIX, name, "config.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", ["hf_tiny_g2", "hf_tiny_g1_untied"])
def test_golden_fixture_shapes(name):
  cfg = _read_hf_config(name)
  sd = load_state_dict(os.path.join(FIX, name))
  with np.load(os.path.join(FIX, f"golden_{name}.npz")) as z:
    g = {k: z[k] for k in z.files}
  nl, H, P, N, G, K = (
    cfg[k]
    for k in ("num_hidden_layers", "num_heads", "head_dim", "state_size", "n_groups", "conv_kernel")
  )
  V, d_inner = cfg["vocab_size"], cfg["expand"] * cfg["hidden_size"]
  conv_dim = d_inner + 2 * G * N
  assert g["input_ids"].shape == (2, 37) and g["input_ids"].max() < V
  assert g["logits"].shape == (2, 37, V) and g["logits"].dtype == np.float32
  assert g["full_logits"].shape == (2, 40, V)
  assert g["decode_ids"].shape == (2, 3) and g["decode_logits"].shape == (2, 3, V)
  for k in ("ssm_states", "decode_ssm_states"):
    assert g[k].shape == (nl, 2, H, P, N)
  for k in ("conv_states", "decode_conv_states"):
    assert g[k].shape == (nl, 2, conv_dim, K)
  np.testing.assert_allclose(
    g["full_logits"][:, :37], g["logits"], atol=1e-5
  )  # 40- vs 37-token forward
  # conv state slots roll by one per decoded token: after 3 steps slot 0 is the old slot 3
  np.testing.assert_array_equal(g["decode_conv_states"][..., 0], g["conv_states"][..., 3])
  assert sd["backbone.layers.0.mixer.in_proj.weight"].shape == (
    2 * d_inner + 2 * G * N + H,
    cfg["hidden_size"],
  )
  assert ("lm_head.weight" in sd) == (not cfg["tie_word_embeddings"])
  tsl = cfg["time_step_limit"]
  if name == "hf_tiny_g2":
    assert tsl == [0.0, {"__float__": "Infinity"}]
    # the first tokens' logits are unaffected by the decode; HF's step matches its own forward here
    np.testing.assert_allclose(g["decode_logits"], g["full_logits"][:, 37:], atol=1e-5)
  else:
    assert tsl == [0.01, 0.5]
    # HF's decode step does not clip dt to time_step_limit (its chunked forward does)
    assert np.abs(g["decode_logits"] - g["full_logits"][:, 37:]).max() > 1e-2
