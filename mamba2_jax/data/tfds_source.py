"""Prepared TFDS datasets as a source: `tfds:NAME[/CONFIG][:VERSION]:SPLIT`, no TensorFlow.

    tfds:pg19:train                   # the latest version on disk, the dataset's only config
    tfds:my_books/en:1.2.0:train[:90%]

The dataset must already be prepared in `data_dir` (`data.tfds_data_dir` / `--tfds_data_dir`;
default `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`) in the `array_record` file format, the one
with random access: nothing is downloaded or built here. It is read with
`tfds.data_source(NAME/CONFIG:VERSION, split=SPLIT, data_dir=...)`, which needs only the files
(`dataset_info.json`, `features.json` and the shards), not the builder's code, and no TensorFlow.
SPLIT is any TFDS split expression (`train`, `train[:10%]`, `train+validation`).

Resolution (`resolve`): the config is the one named, else the dataset's only config on disk, else
the default recorded at preparation (`NAME/.config/metadata.json`); the version is the one named,
else the latest on disk. The text is the feature `text_key` (`a/b` for nested features; default:
the first string feature in feature-name order, the order of `features.json`). Whatever does not
exist raises `InvalidInput` naming it and listing what does.

Two ways in, both over the same `tfds.data_source`:
- `TfdsDocuments`: random access (len + getitem = one document's token ids, tokenized on read)
  for the training stream (mamba2_jax/data/pipeline.py); each host reads only its documents.
- `input_files` + `read_documents`: the split as `InputFile` chunks of consecutive examples for
  the raw-input readers (mamba2_jax/data/sources.py): `experiments.prepare_data`,
  `load_documents` and the evaluation prompts.
Documents are in the split's index order in both (TFDS fixed it when it prepared the split).

`tensorflow_datasets` (and etils.epath) are imported only here, inside the functions: the other
sources never pay their import time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Iterator

import numpy as np

from mamba2_jax.errors import InvalidInput

PREFIX = "tfds:"
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_READ_BATCH = 64
DEFAULT_CHUNK_BYTES = 64 << 20  # examples per InputFile chunk: about this many bytes


def is_tfds(source) -> bool:
  return isinstance(source, str) and source.startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  name: str
  config: str | None
  version: str | None
  split: str

  @property
  def builder_name(self) -> str:  # what tfds.data_source takes: NAME[/CONFIG][:VERSION]
    return (
      self.name
      + (f"/{self.config}" if self.config else "")
      + (f":{self.version}" if self.version else "")
    )

  def __str__(self) -> str:
    return f"{PREFIX}{self.builder_name}:{self.split}"


_FORM = "tfds:NAME[/CONFIG][:VERSION]:SPLIT (e.g. tfds:pg19:train, tfds:c4/en:3.1.0:validation)"


def parse_spec(source: str) -> TfdsSpec:
  """`tfds:NAME[/CONFIG][:VERSION]:SPLIT` -> TfdsSpec (nothing is looked up)."""
  if not is_tfds(source):
    raise InvalidInput(f"{source!r} is not a TFDS source; expected {_FORM}")
  rest = source[len(PREFIX) :]
  head, sep, tail = rest.partition(":")
  version = None
  m = re.match(r"^(\d+\.\d+\.\d+):(.*)$", tail, re.S)
  if m:
    version, tail = m.group(1), m.group(2)
  name, _, config = head.partition("/")
  split = tail.strip()
  if not sep or not name or not split or "/" in config or (config == "" and "/" in head):
    raise InvalidInput(f"{source!r}: expected {_FORM}")
  for what, v in (("name", name), ("config", config)):
    if v and not _NAME_RE.match(v):
      raise InvalidInput(f"{source!r}: invalid dataset {what} {v!r}; expected {_FORM}")
  return TfdsSpec(name, config or None, version, split)


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A TFDS source with everything fixed: config, version, data dir and text feature."""

  spec: TfdsSpec  # config (if any) and version filled in
  data_dir: str
  text_key: str
  num_examples: int  # in the split expression
  num_bytes: int  # of its examples (serialized, as recorded by TFDS), an estimate for slices

  def to_dict(self) -> dict:
    return {"source": str(self.spec), "data_dir": self.data_dir, "text_key": self.text_key}


def default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")


def _path(p):
  from etils import epath  # pylint: disable=g-import-not-at-top

  return epath.Path(os.path.expanduser(str(p)) if "://" not in str(p) else str(p))


def _vkey(v: str):
  return tuple(int(x) for x in v.split("."))


def _versions(d) -> list[str]:
  """Complete versions (with dataset_info.json) under d, oldest first."""
  if not d.is_dir():
    return []
  found = [
    c.name for c in d.iterdir() if _VERSION_RE.match(c.name) and (c / "dataset_info.json").exists()
  ]
  return sorted(found, key=_vkey)


def _configs(d) -> list[str]:
  if not d.is_dir():
    return []
  return sorted(
    c.name
    for c in d.iterdir()
    if not _VERSION_RE.match(c.name) and not c.name.startswith(".") and _versions(c)
  )


def _datasets(root) -> list[str]:
  return sorted(
    c.name
    for c in root.iterdir()
    if c.is_dir()
    and not c.name.startswith(".")
    and c.name != "downloads"
    and (_versions(c) or _configs(c))
  )


def _listing(items, none="none") -> str:
  return ", ".join(items) if items else none


def _split_info(info: dict) -> dict[str, tuple[int, int]]:
  """split name -> (examples, bytes) from dataset_info.json."""
  out = {}
  for s in info.get("splits", []):
    n = sum(int(x) for x in s.get("shardLengths", []))
    out[s["name"]] = (n, int(s.get("numBytes", 0) or 0))
  return out


def _split_names(split: str) -> list[str]:
  return [p.split("[", 1)[0].strip() for p in split.split("+")]


def _flat_features(fd, prefix="") -> list[tuple[str, object]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  out = []
  for k in sorted(fd.keys()):
    f = fd[k]
    if isinstance(f, tfds.features.FeaturesDict):
      out.extend(_flat_features(f, f"{prefix}{k}/"))
    else:
      out.append((f"{prefix}{k}", f))
  return out


def _is_text(feature) -> bool:
  from tensorflow_datasets.core.utils import dtype_utils  # pylint: disable=g-import-not-at-top

  return tuple(feature.shape) == () and dtype_utils.is_string(feature.np_dtype)


def _describe(feature) -> str:
  name = type(feature).__name__
  if name == "Text":
    return "Text"
  shape = tuple(feature.shape)
  return f"{name} {np.dtype(feature.np_dtype).name}" + (f" {list(shape)}" if shape else "")


def _open(spec: TfdsSpec, data_dir: str):
  """tfds.data_source of a resolved spec (its version and config given: read from the files)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(
      spec.builder_name,
      split=spec.split,
      data_dir=str(_path(data_dir)),
      download=False,
      try_gcs=False,
      builder_kwargs={"file_format": "array_record"},
    )
  except (ValueError, KeyError, AssertionError) as e:  # e.g. a split slice out of range
    raise InvalidInput(f"{spec} in {data_dir}: {type(e).__name__}: {e}") from e


def resolve(source: str, data_dir: str | None = None, text_key: str | None = None):
  """(Resolved, the opened tfds data source). Raises InvalidInput naming what is missing and
  listing what exists: the data dir, dataset, config, version, split, text feature."""
  spec = parse_spec(source)
  data_dir = data_dir or default_data_dir()
  root = _path(data_dir)
  if not root.is_dir():
    raise InvalidInput(
      f"{source}: the TFDS data dir {data_dir} does not exist (set data.tfds_data_dir, "
      "--tfds_data_dir or $TFDS_DATA_DIR to where the dataset was prepared)"
    )
  ds_dir = root / spec.name
  configs, direct = _configs(ds_dir), _versions(ds_dir)
  if not (configs or direct):
    raise InvalidInput(
      f"{source}: no prepared TFDS dataset {spec.name!r} in {data_dir} (prepared datasets "
      f"there: {_listing(_datasets(root))}); prepare it with TFDS first, in the array_record "
      'format (docs/data.md "TFDS datasets")'
    )
  config = spec.config
  if config is not None:
    if config not in configs:
      raise InvalidInput(
        f"{source}: TFDS dataset {spec.name!r} has no prepared config {config!r} in {data_dir} "
        f"(configs there: {_listing(configs, 'none: it has no configs, drop /' + config)})"
      )
    cfg_dir = ds_dir / config
  elif direct:
    cfg_dir = ds_dir
  else:
    meta = ds_dir / ".config" / "metadata.json"
    default = json.loads(meta.read_text()).get("default_config_name") if meta.exists() else None
    if len(configs) == 1:
      config = configs[0]
    elif default in configs:
      config = default
    else:
      raise InvalidInput(
        f"{source}: TFDS dataset {spec.name!r} has several configs in {data_dir} "
        f"({_listing(configs)}) and no recorded default; name one: "
        f"tfds:{spec.name}/CONFIG:{spec.split}"
      )
    cfg_dir = ds_dir / config
  versions = _versions(cfg_dir)
  what = spec.name + (f"/{config}" if config else "")
  if spec.version is not None and spec.version not in versions:
    raise InvalidInput(
      f"{source}: TFDS dataset {what!r} has no prepared version {spec.version} in {data_dir} "
      f"(versions there: {_listing(versions)})"
    )
  version = spec.version or versions[-1]
  info = json.loads((cfg_dir / version / "dataset_info.json").read_text())
  formats = [info.get("fileFormat", "tfrecord")] + list(info.get("alternativeFileFormats", []))
  if "array_record" not in formats:
    raise InvalidInput(
      f"{source}: {what}:{version} in {data_dir} was prepared as {formats[0]}, which has no "
      "random access; prepare it again with file_format='array_record' or convert it "
      '(`tfds convert_format --out_file_format=array_record`; docs/data.md "TFDS datasets")'
    )
  splits = _split_info(info)
  missing = [s for s in _split_names(spec.split) if s not in splits]
  if missing:
    have = [f"{k} ({n:,} examples)" for k, (n, _) in splits.items()]
    raise InvalidInput(
      f"{source}: TFDS dataset {what}:{version} has no split {missing[0]!r} "
      f"(splits: {_listing(have)})"
    )
  spec = TfdsSpec(spec.name, config, version, spec.split)
  src = _open(spec, data_dir)
  feats = _flat_features(src.dataset_info.features)
  texts = [k for k, f in feats if _is_text(f)]
  described = ", ".join(f"{k} ({_describe(f)})" for k, f in feats)
  if text_key:
    found = dict(feats).get(text_key)
    if found is None:
      raise InvalidInput(
        f"{source}: no feature {text_key!r} (data.tfds_text_key / --tfds_text_key); "
        f"features: {described}"
      )
    if not _is_text(found):
      raise InvalidInput(
        f"{source}: feature {text_key!r} is {_describe(found)}, not text; text features: "
        f"{_listing(texts)}"
      )
  elif not texts:
    raise InvalidInput(f"{source}: no text (string) feature; features: {described}")
  key = text_key or texts[0]
  n_all = sum(splits[s][0] for s in set(_split_names(spec.split)))
  b_all = sum(splits[s][1] for s in set(_split_names(spec.split)))
  n = len(src)
  nbytes = int(round(b_all * n / n_all)) if n_all else 0
  return Resolved(spec, str(data_dir), key, n, nbytes), src


_SOURCES: dict = {}  # (data_dir, spec) -> data source, per process


def source_of(r: Resolved):
  k = (r.data_dir, str(r.spec))
  if k not in _SOURCES:
    _SOURCES[k] = _open(r.spec, r.data_dir)
  return _SOURCES[k]


def _text(example, key: str):
  v = example
  for part in key.split("/"):
    v = v[part]
  if isinstance(v, np.ndarray) and v.shape == ():
    v = v.item()
  return v


def text_of(value, where: str) -> str:
  """A text feature's value (bytes, as TFDS returns it) as str; raises BadInputError."""
  from mamba2_jax.data.records import BadInputError  # pylint: disable=g-import-not-at-top

  if isinstance(value, str):
    return value
  try:
    return bytes(value).decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadInputError("invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start}") from e


class TfdsDocuments:
  """Random access to a TFDS split as token arrays: `docs[i]` = example i's text feature,
  tokenized when read (in grain's read threads / worker processes). Picklable: a worker reopens
  the data source."""

  def __init__(self, resolved: Resolved, tokenizer, source=None):
    from mamba2_jax.data.tokenizers import get_tokenizer  # pylint: disable=g-import-not-at-top

    self.resolved = resolved
    self.tokenizer = get_tokenizer(tokenizer)
    self._source = source
    self._len = resolved.num_examples

  def _src(self):
    if self._source is None:
      self._source = source_of(self.resolved)
    return self._source

  def __len__(self) -> int:
    return self._len

  def text(self, index: int) -> str:
    ex = self._src()[int(index)]
    return text_of(_text(ex, self.resolved.text_key), f"{self.resolved.spec}: example {index}")

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < self._len:
      raise IndexError(f"document {index} out of range [0, {self._len})")
    return np.asarray(self.tokenizer.encode(self.text(index)), np.int32)

  def token_lengths(self, progress: bool = False) -> np.ndarray:
    """Tokens per document (one tokenizing pass over the split, batched)."""
    out = np.zeros((self._len,), np.int64)
    src = self._src()
    for a in range(0, self._len, _READ_BATCH):
      idx = list(range(a, min(a + _READ_BATCH, self._len)))
      exs = src.__getitems__(idx)
      texts = [
        text_of(_text(ex, self.resolved.text_key), f"{self.resolved.spec}: example {i}")
        for i, ex in zip(idx, exs)
      ]
      out[a : a + len(idx)] = [ids.size for ids in self.tokenizer.encode_batch(texts)]
      if progress and a // _READ_BATCH % 100 == 0:
        logging.info("%s: counted tokens of %d / %d documents", self.resolved.spec, a, self._len)
    return out

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_source"] = None
    return d

  def __repr__(self):
    return (
      f"TfdsDocuments({self.resolved.spec}, documents={self._len}, text={self.resolved.text_key!r})"
    )


def open_documents(source, tokenizer, data_dir=None, text_key=None) -> TfdsDocuments:
  r, src = resolve(source, data_dir, text_key)
  _SOURCES[(r.data_dir, str(r.spec))] = src
  return TfdsDocuments(r, tokenizer, src)


# ------------------------------------------------------------------------------------------------
# The raw-input side: chunks of a split as InputFiles (mamba2_jax/data/sources.py)
def input_files(source: str, data_dir=None, text_key=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
  """The split as InputFiles of consecutive examples (about chunk_bytes each, by TFDS's recorded
  sizes), in index order; prepare_data makes shards of whole chunks."""
  from mamba2_jax.data.records import InputFile  # pylint: disable=g-import-not-at-top

  r, src = resolve(source, data_dir, text_key)
  _SOURCES[(r.data_dir, str(r.spec))] = src
  n = r.num_examples
  if n == 0:
    raise InvalidInput(f"{source}: the split {r.spec.split!r} has no examples")
  per_ex = max(1.0, r.num_bytes / n) if n else 1.0
  step = max(1, int(chunk_bytes // per_ex))
  out = []
  for a in range(0, n, step):
    b = min(n, a + step)
    out.append(
      InputFile(
        path=f"{r.spec}@{a}-{b}",
        size=max(1, int(round(per_ex * (b - a)))),
        fmt="tfds",
        origin=source,
        set_name=r.spec.name,
        tfds={**r.to_dict(), "start": a, "stop": b, "num_bytes": r.num_bytes, "num_examples": n},
      )
    )
  return out


def _resolved_of(f) -> Resolved:
  t = f.tfds
  return Resolved(
    parse_spec(t["source"]), t["data_dir"], t["text_key"], t["num_examples"], t["num_bytes"]
  )


def read_documents(f, bad) -> Iterator:
  """The Documents of one chunk (`input_files`), in index order; bad text goes to `bad`."""
  from mamba2_jax.data.records import BadInputError, Document  # pylint: disable=g-import-not-at-top

  r = _resolved_of(f)
  src = source_of(r)
  if len(src) != r.num_examples:
    raise InvalidInput(
      f"{r.spec} in {r.data_dir}: {len(src)} examples, {r.num_examples} when it was listed"
    )
  start, stop = f.tfds["start"], f.tfds["stop"]
  where_src = str(r.spec)
  for a in range(start, stop, _READ_BATCH):
    idx = list(range(a, min(a + _READ_BATCH, stop)))
    for i, ex in zip(idx, src.__getitems__(idx)):
      where = f"example {i}"
      try:
        text = text_of(_text(ex, r.text_key), where)
      except BadInputError as e:
        bad(e.kind, where_src, where, str(e).removeprefix(where + ": "))
        continue
      pos = int(round(f.size * (i + 1 - start) / (stop - start)))
      yield Document(text, {"tfds_index": i}, r.spec.name, where_src, where, pos)
