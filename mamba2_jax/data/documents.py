"""Token arrays per document: from a prepared directory (ArrayRecord) or raw files on the fly.

    for tokens in load_documents("data/pg19_neox", get_tokenizer("neox")): ...   # prepared dir
    for tokens in load_documents("books/*.jsonl.zst", "byte", min_doc_tokens=4096): ...  # raw

A prepared directory (written by `experiments.prepare_data`) holds `manifest.json` and
`shards/shard-NNNNN.array_record` (one record per document: the token ids as little-endian
uint16 when the vocabulary fits, else int32) beside `shard-NNNNN.lengths.npy`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mamba2_jax.data import sources as sources_lib
from mamba2_jax.data import synthetic
from mamba2_jax.data.tokenizers import get_tokenizer
from mamba2_jax.errors import InvalidInput

FORMAT = "mamba2_jax.prepared_documents/v1"
MANIFEST = "manifest.json"
STATE = "prepare_state.json"
SHARD_DIR = "shards"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


@dataclasses.dataclass
class DocCounts:
  """What happened to every document read (all of it goes into the manifest)."""

  read: int = 0  # documents that parsed
  kept: int = 0
  kept_tokens: int = 0
  kept_text_bytes: int = 0
  filtered_subset: int = 0  # not in --subset
  filtered_short: int = 0  # fewer than --min_doc_tokens tokens
  filtered_short_tokens: int = 0
  stopped_at_max_docs: bool = False

  def add(self, other: dict) -> None:
    for k, v in other.items():
      if k == "stopped_at_max_docs":
        self.stopped_at_max_docs = self.stopped_at_max_docs or bool(v)
      else:
        setattr(self, k, getattr(self, k) + v)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def parse_subsets(subset) -> frozenset[str] | None:
  if subset is None or subset == "" or subset == ():
    return None
  names = subset.split(",") if isinstance(subset, str) else list(subset)
  return frozenset(sources_lib.normalize_set_name(n) for n in names if str(n).strip())


def tokenized_documents(
  files: Sequence[sources_lib.InputFile],
  tokenizer,
  *,
  bad: sources_lib.BadInput,
  counts: DocCounts,
  min_doc_tokens: int = 0,
  subsets: frozenset[str] | None = None,
  max_docs: int | None = None,
  batch_bytes: int = 4 << 20,
  progress=None,
) -> Iterator[tuple[np.ndarray, sources_lib.Document]]:
  """(token ids, document) in input order after the subset / length / count filters.

  Texts are encoded in batches of about `batch_bytes` (HF tokenizers encode a batch on all
  cores); a batch never spans two files. `progress(nbytes)` is called with the on-disk bytes
  consumed since its last call.
  """
  tok = get_tokenizer(tokenizer)
  pending: list[sources_lib.Document] = []
  pending_bytes = 0
  reported = [0]  # raw bytes of the current file already reported to `progress`

  def report(pos):
    if progress is not None and pos > reported[0]:
      progress(pos - reported[0])
      reported[0] = pos

  def flush():
    nonlocal pending, pending_bytes
    docs, pending, pending_bytes = pending, [], 0
    for ids, doc in zip(tok.encode_batch([d.text for d in docs]), docs):
      if ids.size < min_doc_tokens:
        counts.filtered_short += 1
        counts.filtered_short_tokens += int(ids.size)
        continue
      if max_docs is not None and counts.kept >= max_docs:
        counts.stopped_at_max_docs = True
        return
      counts.kept += 1
      counts.kept_tokens += int(ids.size)
      counts.kept_text_bytes += len(doc.text.encode("utf-8"))
      yield ids, doc
    if docs:
      report(docs[-1].raw_pos)

  for f in files:
    reported[0] = 0
    for doc in sources_lib.read_documents(f, bad):
      counts.read += 1
      if subsets is not None and doc.set_name not in subsets:
        counts.filtered_subset += 1
        continue
      pending.append(doc)
      pending_bytes += len(doc.text)
      if pending_bytes >= batch_bytes or (
        max_docs is not None and counts.kept + len(pending) >= max_docs
      ):
        yield from flush()
        if counts.stopped_at_max_docs:
          return
    yield from flush()
    if counts.stopped_at_max_docs:
      return
    report(f.size)


class PreparedDataset:
  """Random access to a prepared directory: `ds[i]` is document i's int32 token ids.

  A grain `RandomAccessDataSource` (len + thread-safe getitem); picklable for worker processes.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    mpath = self.directory / MANIFEST
    if not mpath.exists():
      if (self.directory / STATE).exists():
        raise FileNotFoundError(
          f"{self.directory}: preparation did not finish (no {MANIFEST}); run the same "
          "`python -m experiments.prepare_data` command again to resume it"
        )
      raise FileNotFoundError(f"{self.directory}: not a prepared data directory (no {MANIFEST})")
    self.manifest = json.loads(mpath.read_text())
    if self.manifest.get("format") != FORMAT:
      raise InvalidInput(f"{mpath}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
    self.dtype = np.dtype(self.manifest["dtype"])
    shards = [s for s in self.manifest["shards"] if s["num_documents"] > 0]
    self.paths = [str(self.directory / SHARD_DIR / s["file"]) for s in shards]
    lengths = []
    for s in shards:
      ln = np.load(self.directory / SHARD_DIR / s["lengths_file"])
      lengths.append(ln[: s["num_documents"]])
    self.lengths = (np.concatenate(lengths) if lengths else np.zeros((0,), np.int64)).astype(
      np.int64
    )
    self._len = int(self.lengths.size)
    if self._len != self.manifest["num_documents"]:
      raise InvalidInput(
        f"{mpath}: {self._len} documents in the shards, manifest says "
        f"{self.manifest['num_documents']}"
      )
    self._source = None

  @property
  def tokenizer_identity(self) -> dict:
    return self.manifest["tokenizer"]

  def _src(self):
    if self._source is None:
      import grain  # pylint: disable=g-import-not-at-top

      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    return self._source

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < self._len:
      raise IndexError(f"document {index} out of range [0, {self._len})")
    return np.frombuffer(self._src()[int(index)], dtype=self.dtype).astype(np.int32)

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_source"] = None
    return d

  def __repr__(self):
    return (
      f"PreparedDataset({str(self.directory)!r}, documents={self._len}, "
      f"tokens={int(self.lengths.sum())}, tokenizer={self.tokenizer_identity['name']!r})"
    )


def is_prepared_dir(path) -> bool:
  p = Path(os.path.expanduser(str(path)))
  return "://" not in str(path) and p.is_dir() and ((p / MANIFEST).exists() or (p / STATE).exists())


def load_documents(
  dir_or_glob,
  tokenizer=None,
  *,
  min_doc_tokens: int = 0,
  subset=None,
  max_docs: int | None = None,
  on_error: str = "fail",
  tfds_data_dir: str | None = None,
  tfds_text_key: str | None = None,
) -> Iterator[np.ndarray]:
  """Yields int32 token arrays, one per document, in order.

  `dir_or_glob`: a prepared directory (its tokenizer identity must match `tokenizer` if one is
  given), or raw inputs (path, directory, glob, URL, `builtin:shakespeare`, a prepared TFDS split
  `tfds:NAME[/CONFIG][:VERSION]:SPLIT` read from `tfds_data_dir` with the text feature
  `tfds_text_key`, or a list of them) tokenized on the fly with `tokenizer` (required then), or a
  synthetic source
  (`synthetic:copy:...`, no tokenizer). `subset` only applies to raw inputs
  (prepared data was already filtered). Bad raw input raises `BadInputError` (file + line/row)
  unless `on_error="skip"`.
  """
  if synthetic.is_synthetic(dir_or_glob):
    yield from synthetic.load(dir_or_glob, min_doc_tokens)[0][:max_docs]
    return
  if not isinstance(dir_or_glob, (list, tuple)) and is_prepared_dir(dir_or_glob):
    ds = PreparedDataset(os.path.expanduser(str(dir_or_glob)))
    if tokenizer is not None:
      get_tokenizer(tokenizer).check_compatible(ds.tokenizer_identity, f"{dir_or_glob}")
    if subset is not None:
      raise InvalidInput(
        "subset= applies to raw inputs; prepared data was filtered when prepared"
        f" (manifest filters: {ds.manifest.get('filters')})"
      )
    n = 0
    for i in range(len(ds)):
      if ds.lengths[i] < min_doc_tokens:
        continue
      if max_docs is not None and n >= max_docs:
        return
      n += 1
      yield ds[i]
    return
  if tokenizer is None:
    raise InvalidInput(
      f"load_documents({dir_or_glob!r}): raw inputs need a tokenizer "
      "(e.g. 'byte', 'neox' or a tokenizer.json path)"
    )
  files = sources_lib.expand_inputs(
    dir_or_glob, tfds_data_dir=tfds_data_dir, tfds_text_key=tfds_text_key
  )
  bad = sources_lib.BadInput(on_error)
  for ids, _ in tokenized_documents(
    files,
    tokenizer,
    bad=bad,
    counts=DocCounts(),
    min_doc_tokens=min_doc_tokens,
    subsets=parse_subsets(subset),
    max_docs=max_docs,
  ):
    yield ids
