"""The training stream (grain Dataset API): per-host batches of packed token rows.

    it = make_train_iterator(StreamConfig(source="builtin:shakespeare", seq_len=1024,
                                          batch_size=8, seed=0, packing="concat"),
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                      # {"tokens": (8, 1024) int32[, "segment_ids"]}
    gbatch = make_global_batch(batch, batch_sharding(mesh))   # global jax.Arrays

Chain: documents (random access: a prepared ArrayRecord dir, a prepared TFDS split read with
`tfds.data_source` and tokenized on read, or raw inputs tokenized into memory) -> seeded global shuffle (a new order every epoch) -> repeat -> this process's slice
`[process_index::process_count]` (each host reads only its documents) -> threaded reads ->
packing into rows of `seq_len` -> batch -> `mp_prefetch` worker processes.

Packing (`StreamConfig.packing`):
- "concat" (the paper's setting): documents joined with EOS (and BOS if `add_bos`) and cut into
  rows of exactly `seq_len` tokens; a document continues in the next row; no segment ids.
- "segments": the same rows plus `segment_ids` (1, 2, ... per document within a row, 0 =
  padding) so the model resets its state at document boundaries.
Every token of every document appears exactly once per epoch. With a finite `num_epochs` the last
row is padded with `pad_id` (segment id 0) and the last batch with whole padding rows.

Resume: the iterator's state round-trips through an orbax `CheckpointManager` item
(`iterator_save_args(it)` / `iterator_restore_args(fresh_it)` = grain's CheckpointSave /
CheckpointRestore), restoring the exact next batch, with or without worker processes. A state
is only valid for the same source, config, process count and worker count: store
`stream_fingerprint(...)` beside it and check it with `check_stream_fingerprint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
from typing import Any, Mapping

import numpy as np

from mamba2_jax.data import documents as docs_lib
from mamba2_jax.data import synthetic
from mamba2_jax.data import tfds_source
from mamba2_jax.data.tokenizers import get_tokenizer
from mamba2_jax.errors import InvalidInput

PACKING_MODES = ("concat", "segments")
_MAX_IN_MEMORY_TOKENS = 1 << 30


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """Everything that determines the stream (besides the process index/count)."""

  source: str = "builtin:shakespeare"  # prepared dir, or raw inputs / builtin:NAME
  tokenizer: str | None = None  # raw sources: default "byte"; prepared: checked if given
  seq_len: int = 1024
  batch_size: int = 8  # per host (process)
  seed: int = 0
  packing: str = "concat"  # "concat" | "segments"
  num_workers: int = 0  # mp_prefetch processes (0 = in this process)
  num_epochs: int | None = None  # None = repeat forever
  shuffle: bool = True
  min_doc_tokens: int = 0  # drop shorter documents (the paper: 4096)
  add_bos: bool = False
  add_eos: bool = True
  read_threads: int = 2
  read_buffer: int = 8  # documents read ahead per process (documents can be MBs)
  worker_buffer: int = 2  # batches buffered per worker
  tfds_data_dir: str = ""  # tfds:... sources: where prepared (default $TFDS_DATA_DIR)
  tfds_text_key: str = ""  # tfds:... sources: the text feature (default: the first string one)

  def __post_init__(self):
    if self.packing not in PACKING_MODES:
      raise ValueError(f"StreamConfig.packing: {self.packing!r} not in {PACKING_MODES}")
    for k in ("seq_len", "batch_size"):
      if getattr(self, k) < 1:
        raise ValueError(f"StreamConfig.{k} must be >= 1, got {getattr(self, k)}")
    if self.num_workers < 0:
      raise ValueError(f"StreamConfig.num_workers must be >= 0, got {self.num_workers}")

  @classmethod
  def from_any(cls, cfg=None, **overrides) -> "StreamConfig":
    """From a StreamConfig, a dict, an ml_collections ConfigDict or any object with these
    attribute names (unknown names are ignored), then `overrides`."""
    if isinstance(cfg, cls):
      return dataclasses.replace(cfg, **overrides) if overrides else cfg
    vals = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if cfg is not None:
      get = (
        cfg.get
        if isinstance(cfg, Mapping) or hasattr(cfg, "to_dict")
        else (lambda k, d: getattr(cfg, k, d))
      )
      for n in names:
        v = get(n, dataclasses.MISSING)
        if v is not dataclasses.MISSING:
          vals[n] = v
    vals.update(overrides)
    return cls(**vals)


class InMemoryDocuments:
  """Token arrays held as one flat array + offsets (cheap to pickle into worker processes)."""

  def __init__(self, docs):
    docs = [np.asarray(d, np.int32) for d in docs]
    self.lengths = np.asarray([d.size for d in docs], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
    self.tokens = np.concatenate(docs) if docs else np.zeros((0,), np.int32)

  def __len__(self):
    return int(self.lengths.size)

  def __getitem__(self, i):
    return self.tokens[self.offsets[i] : self.offsets[i + 1]]


class _Subset:
  """Documents `indices` of `base` (e.g. those with at least min_doc_tokens tokens)."""

  def __init__(self, base, indices):
    self.base, self.indices = base, np.asarray(indices, np.int64)

  def __len__(self):
    return int(self.indices.size)

  def __getitem__(self, i):
    return self.base[int(self.indices[i])]


def _log_kept(source, kept, total, min_doc_tokens):
  if kept < total:
    logging.info(
      "%s: streaming %d of %d documents (%d have fewer than %d tokens)",
      source,
      kept,
      total,
      total - kept,
      min_doc_tokens,
    )


def open_documents(
  source,
  tokenizer=None,
  min_doc_tokens: int = 0,
  *,
  tfds_data_dir: str | None = None,
  tfds_text_key: str | None = None,
):
  """(random-access documents, tokenizer identity) for a prepared dir, raw inputs, a prepared
  TFDS split (`tfds:NAME[/CONFIG][:VERSION]:SPLIT` in `tfds_data_dir`, mamba2_jax/data/
  tfds_source.py: read and tokenized per document; min_doc_tokens > 0 tokenizes the split once
  to find the lengths) or a synthetic source (`synthetic:copy:...`, mamba2_jax/data/synthetic.py)."""
  if synthetic.is_synthetic(source):
    docs, ident = synthetic.load(source, min_doc_tokens)
    return InMemoryDocuments(docs), ident
  if tfds_source.is_tfds(source):
    tdocs = tfds_source.open_documents(
      source, tokenizer or "byte", tfds_data_dir or None, tfds_text_key or None
    )
    if min_doc_tokens <= 0:
      return tdocs, tdocs.tokenizer.identity()
    keep = np.nonzero(tdocs.token_lengths(progress=True) >= min_doc_tokens)[0]
    _log_kept(source, keep.size, len(tdocs), min_doc_tokens)
    return _Subset(tdocs, keep), tdocs.tokenizer.identity()
  if docs_lib.is_prepared_dir(source):
    ds = docs_lib.PreparedDataset(source)
    if tokenizer is not None:
      get_tokenizer(tokenizer).check_compatible(ds.tokenizer_identity, str(source))
    keep = np.nonzero(ds.lengths >= min_doc_tokens)[0]
    docs = ds if keep.size == len(ds) else _Subset(ds, keep)
    _log_kept(source, keep.size, len(ds), min_doc_tokens)
    return docs, ds.tokenizer_identity
  tok = get_tokenizer(tokenizer or "byte")
  arrays, total, short = [], 0, 0
  for ids in docs_lib.load_documents(source, tok):
    if ids.size < min_doc_tokens:
      short += 1
      continue
    arrays.append(ids)
    total += ids.size
    if total > _MAX_IN_MEMORY_TOKENS:
      raise InvalidInput(
        f"{source}: more than {_MAX_IN_MEMORY_TOKENS:,} tokens; prepare it first "
        "(python -m experiments.prepare_data) and stream the prepared directory"
      )
  if short:
    logging.info(
      "%s: streaming %d documents (%d have fewer than %d tokens)",
      source,
      len(arrays),
      short,
      min_doc_tokens,
    )
  return InMemoryDocuments(arrays), tok.identity()


# ------------------------------------------------------------------------------------------------
# Packing
def _make_pack_classes():
  import grain  # pylint: disable=g-import-not-at-top

  class PackIterator(grain.DatasetIterator):
    """Rows of exactly seq_len tokens from a stream of documents (see the module docstring)."""

    def __init__(self, parent, seq_len, bos_id, eos_id, pad_id, segments):
      super().__init__(parent)
      self._L, self._bos, self._eos, self._pad = seq_len, bos_id, eos_id, pad_id
      self._segments = segments
      self._doc = None  # current document with BOS/EOS
      self._pos = 0  # next unread position in it
      self._doc_state = None  # parent state from just before the current doc was read
      self._exhausted = False

    def _fetch(self):
      self._doc_state = self._parent.get_state()
      doc = np.asarray(next(self._parent), np.int32)
      parts = (
        ([np.asarray([self._bos], np.int32)] if self._bos is not None else [])
        + [doc]
        + ([np.asarray([self._eos], np.int32)] if self._eos is not None else [])
      )
      self._doc = np.concatenate(parts) if len(parts) > 1 else doc
      self._pos = 0

    def __next__(self):
      if self._exhausted:
        raise StopIteration
      L = self._L
      tokens = np.full((L,), self._pad, np.int32)
      segs = np.zeros((L,), np.int32) if self._segments else None
      filled, seg = 0, 0
      while filled < L:
        if self._doc is None or self._pos >= self._doc.size:
          try:
            self._fetch()
          except StopIteration:
            self._doc, self._exhausted = None, True
            if filled == 0:
              raise
            break
          if self._doc.size == 0:
            continue
        take = min(L - filled, self._doc.size - self._pos)
        tokens[filled : filled + take] = self._doc[self._pos : self._pos + take]
        if segs is not None:
          seg += 1
          segs[filled : filled + take] = seg
        filled += take
        self._pos += take
      out = {"tokens": tokens}
      if segs is not None:
        out["segment_ids"] = segs
      return out

    def get_state(self):
      if self._doc is None or self._pos >= self._doc.size:
        return {"parent": self._parent.get_state(), "pos": -1, "exhausted": self._exhausted}
      return {"parent": self._doc_state, "pos": int(self._pos), "exhausted": False}

    def set_state(self, state):
      self._parent.set_state(state["parent"])
      self._doc, self._pos, self._exhausted = None, 0, bool(state["exhausted"])
      if state["pos"] >= 0:
        self._fetch()
        self._pos = int(state["pos"])

  class PackIterDataset(grain.IterDataset):
    def __init__(self, parent, *, seq_len, bos_id, eos_id, pad_id, segments):
      super().__init__(parent)
      self._args = (seq_len, bos_id, eos_id, pad_id, segments)

    def __iter__(self):
      return PackIterator(self._parent.__iter__(), *self._args)

    def __str__(self):
      return f"PackIterDataset(seq_len={self._args[0]}, segments={self._args[4]})"

  return PackIterDataset


_PACK_CLS = None


def pack_documents(ds, *, seq_len, bos_id=None, eos_id=None, pad_id=0, segments=False):
  """grain IterDataset of documents -> IterDataset of {"tokens"[, "segment_ids"]} rows."""
  global _PACK_CLS
  if _PACK_CLS is None:
    _PACK_CLS = _make_pack_classes()
  return _PACK_CLS(
    ds, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, segments=segments
  )


class _StackPad:
  """Batch function: stack rows; a short last batch gets whole padding rows."""

  def __init__(self, batch_size, pad_id):
    self.batch_size, self.pad_id = batch_size, pad_id

  def __call__(self, rows):
    out = {}
    for k in rows[0]:
      x = np.stack([r[k] for r in rows])
      if x.shape[0] < self.batch_size:
        fill = self.pad_id if k == "tokens" else 0
        x = np.concatenate(
          [x, np.full((self.batch_size - x.shape[0],) + x.shape[1:], fill, x.dtype)]
        )
      out[k] = x
    return out


# ------------------------------------------------------------------------------------------------
def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def make_train_dataset(
  config=None, *, process_index=None, process_count=None, documents=None, **overrides
):
  """The grain IterDataset of per-host batches (see make_train_iterator)."""
  import grain  # pylint: disable=g-import-not-at-top

  cfg = StreamConfig.from_any(config, **overrides)
  pi, pc = _process(process_index, process_count)
  if documents is None:
    docs, ident = open_documents(
      cfg.source,
      cfg.tokenizer,
      cfg.min_doc_tokens,
      tfds_data_dir=cfg.tfds_data_dir,
      tfds_text_key=cfg.tfds_text_key,
    )
  else:
    docs, ident = documents
  if len(docs) == 0:
    raise InvalidInput(f"{cfg.source}: no documents (after min_doc_tokens={cfg.min_doc_tokens})")
  eos = ident.get("eos_id") if cfg.add_eos else None
  bos = ident.get("bos_id") if cfg.add_bos else None
  if cfg.add_eos and eos is None and cfg.packing == "concat":
    raise InvalidInput(
      f"tokenizer {ident.get('name')!r} has no EOS id: concat packing needs one "
      "(use packing='segments' or add_eos=False; in training --config.data.packing=segments)"
    )
  if cfg.add_bos and bos is None:
    raise InvalidInput(
      f"tokenizer {ident.get('name')!r} has no BOS id (set add_bos=False, --config.data.add_bos=False)"
    )
  pad = ident.get("pad_id")
  pad = 0 if pad is None else pad
  ds = grain.MapDataset.source(docs)
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs)
  ds = ds[pi::pc]
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer)
  )
  ds = pack_documents(
    ds, seq_len=cfg.seq_len, bos_id=bos, eos_id=eos, pad_id=pad, segments=cfg.packing == "segments"
  )
  ds = ds.batch(cfg.batch_size, drop_remainder=False, batch_fn=_StackPad(cfg.batch_size, pad))
  if cfg.num_workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer
      ),
      worker_init_fn=_ignore_sigint,
    )
  return ds


def _ignore_sigint(worker_index: int, worker_count: int) -> None:
  """Worker processes ignore Ctrl-C (a terminal sends SIGINT to the whole process group): the
  trainer handles it, saving a checkpoint, and closes the workers itself."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_train_iterator(
  config=None, *, process_index=None, process_count=None, documents=None, **overrides
):
  """A grain DatasetIterator of this process's batches {"tokens": (b, L) int32,
  "segment_ids": (b, L) int32 (packing="segments")}.

  `config`: a StreamConfig, dict, ConfigDict or object with its field names; keyword overrides
  (seq_len=..., batch_size=..., seed=..., packing=..., num_workers=..., source=...) win.
  process_index / process_count default to jax.process_index() / jax.process_count().
  `documents=(docs, tokenizer_identity)` reuses sources already opened with `open_documents`.
  Close it (`it.close()`) when using worker processes.
  """
  return iter(
    make_train_dataset(
      config,
      process_index=process_index,
      process_count=process_count,
      documents=documents,
      **overrides,
    )
  )


# ------------------------------------------------------------------------------------------------
# Checkpointing and global arrays
def iterator_save_args(it):
  """The orbax Composite item that saves `it`: Composite(..., data_iter=iterator_save_args(it))."""
  import grain  # pylint: disable=g-import-not-at-top

  return grain.checkpoint.CheckpointSave(it)


def iterator_restore_args(it):
  """Restores a freshly built iterator in place:
  Composite(..., data_iter=iterator_restore_args(it))."""
  import grain  # pylint: disable=g-import-not-at-top

  return grain.checkpoint.CheckpointRestore(it)


def stream_fingerprint(config=None, *, process_count=None, documents=None, **overrides) -> dict:
  """What an iterator state depends on; store it with the checkpoint (e.g. in `meta`)."""
  cfg = StreamConfig.from_any(config, **overrides)
  pc = _process(0 if process_count is not None else None, process_count)[1]
  if documents is None and docs_lib.is_prepared_dir(cfg.source):
    m = docs_lib.PreparedDataset(cfg.source).manifest
    data = {
      "num_documents": m["num_documents"],
      "num_tokens": m["num_tokens"],
      "tokenizer_sha256": m["tokenizer"].get("sha256"),
    }
  elif documents is not None:
    docs, ident = documents
    data = {"num_documents": len(docs), "tokenizer_sha256": ident.get("sha256")}
    tdocs = getattr(docs, "base", docs)
    if isinstance(tdocs, tfds_source.TfdsDocuments):  # the version and config found on disk
      data["tfds"] = tdocs.resolved.to_dict()
  else:
    data = {}
  fields = dataclasses.asdict(cfg)
  for k in ("read_threads", "read_buffer", "worker_buffer"):  # do not change the order
    fields.pop(k)
  if not tfds_source.is_tfds(cfg.source):  # fingerprints saved before these fields still match
    fields.pop("tfds_data_dir")
    fields.pop("tfds_text_key")
  fp = {"config": fields, "process_count": pc, "data": data}
  fp["hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
  return fp


def check_stream_fingerprint(saved: dict, current: dict) -> None:
  """Raises ValueError if a saved iterator state does not fit the current stream."""
  if saved.get("hash") == current.get("hash"):
    return
  diffs = []
  for sec in ("config", "data"):
    a, b = saved.get(sec, {}), current.get(sec, {})
    diffs += [
      f"{sec}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
      for k in sorted(set(a) | set(b))
      if a.get(k) != b.get(k)
    ]
  if saved.get("process_count") != current.get("process_count"):
    diffs.append(f"process_count: {saved.get('process_count')} -> {current.get('process_count')}")
  raise InvalidInput(
    "the saved data-iterator state belongs to a different stream ("
    + "; ".join(diffs or ["fingerprint differs"])
    + "); resuming it would not "
    "replay the same batches"
  )


def batch_sharding(mesh, data_axes=("data", "fsdp")):
  """NamedSharding that splits the batch dimension over the mesh's data axes."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  if not axes:
    axes = (mesh.axis_names[0],)
    logging.warning(
      "batch_sharding: mesh has none of %s; splitting the batch over %r", data_axes, axes[0]
    )
  return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0], None))


def make_global_batch(
  batch: dict[str, Any], sharding, readers: int | None = None
) -> dict[str, Any]:
  """Per-host numpy batch -> global jax.Arrays via jax.make_array_from_process_local_data: the
  global batch is the per-host batch x `readers` (default: the process count; processes that
  hold the same rows pass the same rows, mamba2_jax.train.sharding.data_readers)."""
  import jax  # pylint: disable=g-import-not-at-top

  n = jax.process_count() if readers is None else readers
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
  return out
