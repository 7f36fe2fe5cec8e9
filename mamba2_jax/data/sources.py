"""Raw text sources: RedPajama / SlimPajama JSON lines (plain, .zst, .gz), parquet, .txt books.

`expand_inputs(patterns)` turns paths, directories, globs (`**` allowed), fsspec URLs
(`gs://...` where gcsfs is installed, `memory://` in tests), `builtin:NAME` and prepared TFDS splits
(`tfds:NAME[/CONFIG][:VERSION]:SPLIT`, chunks of examples: mamba2_jax/data/tfds_source.py) into an
ordered list of `InputFile`s; `read_documents(input_file, errors)` yields `Document`s in order.

Formats (chosen by file name):
- `*.jsonl`, `*.jsonl.zst`, `*.jsonl.gz`: one JSON object per line with a string `text`; `meta` may
  be an object, a JSON string or absent (then every other field is the metadata, as in the
  RedPajama Common Crawl files). Lines are numbered from 1.
- `*.parquet`: a `text` column (string or binary), optional `meta` (struct or JSON string) and
  `red_pajama_subset`; other columns (e.g. `__index_level_0__`) are ignored. Rows are numbered
  from 0.
- `*.txt`: the whole file is one document (UTF-8).

The set name of a document (for `--subset`) is, first found: `meta.redpajama_set_name`
(SlimPajama), the `red_pajama_subset` field (HF loader), the RedPajama file layout
(`arxiv/`, `common_crawl/`, `cc_2023-05_sample.jsonl`, `book_sample.jsonl`, ...), then the first
part of `meta.source`. Names are normalised: `RedPajamaCommonCrawl` == `common_crawl`.

Bad input goes through `BadInput`: with `on_error="fail"` the first problem raises
`BadInputError` naming the file and the line or row; with `"skip"` it is counted by kind (and the
first messages kept) for the manifest. Nothing is dropped without being counted.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
from typing import Iterator, Sequence

from mamba2_jax.data.records import (  # noqa: F401  (re-exported: sources_lib.InputFile, ...)
  BAD_KINDS,
  MAX_EXAMPLES,
  BadInput,
  BadInputError,
  Document,
  InputFile,
)
from mamba2_jax.errors import InvalidInput

JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz")
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + (".parquet", ".txt")
# ------------------------------------------------------------------------------------------------
# Set names
_SET_ALIASES = {
  "redpajamacommoncrawl": "common_crawl",
  "cc": "common_crawl",
  "commoncrawl": "common_crawl",
  "redpajamac4": "c4",
  "redpajamagithub": "github",
  "redpajamabook": "book",
  "redpajamaarxiv": "arxiv",
  "redpajamawikipedia": "wikipedia",
  "wiki": "wikipedia",
  "redpajamastackexchange": "stackexchange",
}
_KNOWN_SETS = ("common_crawl", "c4", "github", "book", "arxiv", "wikipedia", "stackexchange")


def normalize_set_name(name: str) -> str:
  k = str(name).strip().lower().replace("-", "_")
  return _SET_ALIASES.get(k, k)


def _set_name_from_path(path: str) -> str | None:
  parts = path.replace("\\", "/").split("/")
  for part in reversed(parts):
    stem = part.split(".")[0].lower()
    if stem.startswith("cc_") or stem == "common_crawl":
      return "common_crawl"
    stem = stem.removesuffix("_sample")
    if stem in _KNOWN_SETS or stem == "wiki":
      return normalize_set_name(stem)
  return None


def _doc_set_name(obj: dict, meta: dict, path_set: str | None) -> str | None:
  if isinstance(meta, dict) and meta.get("redpajama_set_name"):
    return normalize_set_name(meta["redpajama_set_name"])
  if obj.get("red_pajama_subset"):
    return normalize_set_name(obj["red_pajama_subset"])
  if path_set:
    return path_set
  src = meta.get("source") if isinstance(meta, dict) else None
  if isinstance(src, str) and src:
    return normalize_set_name(src.split("/")[0])
  return None


def _parse_meta(obj: dict) -> dict:
  meta = obj.get("meta")
  if isinstance(meta, dict):
    return meta
  if isinstance(meta, str):
    try:
      parsed = json.loads(meta)
      return parsed if isinstance(parsed, dict) else {"meta": parsed}
    except json.JSONDecodeError:
      return {"meta_raw": meta}
  if meta is None and "meta" not in obj:  # RedPajama CC: flat fields are the metadata
    return {k: v for k, v in obj.items() if k not in ("text", "red_pajama_subset")}
  return {}


# ------------------------------------------------------------------------------------------------
# The file layer
def _is_url(path: str) -> bool:
  return "://" in path


def open_binary(path: str):
  if _is_url(path):
    import fsspec  # pylint: disable=g-import-not-at-top

    return fsspec.open(path, "rb").open()
  return open(path, "rb")


def _fmt_of(path: str) -> str | None:
  name = path.lower()
  if name.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if name.endswith(".parquet"):
    return "parquet"
  if name.endswith(".txt"):
    return "txt"
  return None


def _has_magic(p: str) -> bool:
  return any(c in p for c in "*?[")


def expand_inputs(
  patterns: str | Sequence[str],
  ignored: list[str] | None = None,
  *,
  tfds_data_dir: str | None = None,
  tfds_text_key: str | None = None,
  tfds_chunk_bytes: int | None = None,
) -> list[InputFile]:
  """Ordered, de-duplicated input files. Directories and globs are expanded recursively in sorted
  order; files there with unsupported names are appended to `ignored` (reported in the manifest).
  A pattern that matches no supported file is an error. `tfds:...` sources become chunks of
  their split (tfds_source.input_files, read from `tfds_data_dir`)."""
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  from mamba2_jax.data import builtin, tfds_source  # pylint: disable=g-import-not-at-top

  out: list[InputFile] = []
  seen = set()
  for pat in map(str, patterns):
    found: list[InputFile] = []
    if tfds_source.is_tfds(pat):
      chunk = tfds_chunk_bytes or tfds_source.DEFAULT_CHUNK_BYTES
      found = tfds_source.input_files(pat, tfds_data_dir, tfds_text_key, chunk)
    elif pat.startswith(builtin.PREFIX):
      name = pat[len(builtin.PREFIX) :]
      for f in builtin.builtin_files(name):
        found.append(InputFile(str(f), f.stat().st_size, "txt", origin=pat, set_name=name))
    elif _is_url(pat):
      import fsspec  # pylint: disable=g-import-not-at-top

      fs, root = fsspec.core.url_to_fs(pat)
      if _has_magic(root):
        cands, explicit = sorted(fs.glob(root)), False
      elif fs.isdir(root):
        cands, explicit = sorted(fs.find(root)), False
      elif fs.exists(root):
        cands, explicit = [root], True
      else:
        raise FileNotFoundError(f"input {pat}: no such file or directory")
      for c in cands:
        url = fs.unstrip_protocol(c)
        found.extend(_classify(url, lambda c=c: fs.size(c), explicit, ignored))
    else:
      p = os.path.expanduser(pat)
      if _has_magic(p):
        cands = sorted(x for x in globlib.glob(p, recursive=True) if os.path.isfile(x))
        explicit = False
      elif os.path.isdir(p):
        cands = sorted(os.path.join(r, f) for r, _, fs_ in os.walk(p) for f in fs_)
        explicit = False
      elif os.path.exists(p):
        cands, explicit = [p], True
      else:
        raise FileNotFoundError(f"input {pat}: no such file or directory")
      for c in cands:
        found.extend(_classify(c, lambda c=c: os.path.getsize(c), explicit, ignored))
    if not found:
      raise FileNotFoundError(f"input {pat}: matches no {'/'.join(SUPPORTED_SUFFIXES)} file")
    for f in found:
      if f.path not in seen:
        seen.add(f.path)
        out.append(f)
  return out


def _classify(path, size_fn, explicit, ignored):
  fmt = _fmt_of(path)
  if fmt is None:
    if explicit:
      raise InvalidInput(
        f"input {path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})"
      )
    if ignored is not None and not os.path.basename(path).startswith("."):
      ignored.append(path)
    return []
  return [InputFile(path, int(size_fn()), fmt)]


# ------------------------------------------------------------------------------------------------
# Readers
def read_documents(f: InputFile, bad: BadInput) -> Iterator[Document]:
  """The documents of one file, in order. Bad input is reported to `bad` (raise or count)."""
  if f.fmt == "tfds":
    from mamba2_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    yield from tfds_source.read_documents(f, bad)
    return
  if f.size == 0:
    bad("empty_file", f.path, "", "empty file (0 bytes)")
    return
  reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "txt": _read_txt}[f.fmt]
  yield from reader(f, bad)


def _tell(raw) -> int:
  try:
    return int(raw.tell())
  except (OSError, ValueError, AttributeError):
    return 0


def _text_ok(text: str, bad: BadInput, path: str, where: str) -> bool:
  try:
    text.encode("utf-8")
    return True
  except UnicodeEncodeError as e:
    bad(
      "invalid_unicode",
      path,
      where,
      f"text is not valid Unicode ({e.reason} at character "
      f"{e.start}: an escaped lone surrogate such as \\ud800)",
    )
    return False


_CHUNK = 1 << 20


def _zstd_chunks(raw) -> Iterator[bytes]:
  """Decompressed chunks of a (multi-frame) zstd stream; a truncated last frame raises EOFError
  (zstandard's stream_reader ends quietly there, which would drop documents silently)."""
  import zstandard  # pylint: disable=g-import-not-at-top

  pending = b""
  while True:
    if not pending:
      pending = raw.read(_CHUNK)
      if not pending:
        return
    d = zstandard.ZstdDecompressor().decompressobj()
    while True:
      out = d.decompress(pending)
      if out:
        yield out
      if d.eof:
        pending = d.unused_data
        break
      pending = raw.read(_CHUNK)
      if not pending:
        raise EOFError("truncated zstd stream: the last frame is incomplete")


def _chunks(f: InputFile, raw) -> Iterator[bytes]:
  name = f.path.lower()
  if name.endswith(".zst"):
    return _zstd_chunks(raw)
  src = gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else raw
  return iter(lambda: src.read(_CHUNK), b"")


def _iter_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
  parts: list[bytes] = []
  for ch in chunks:
    start = 0
    while True:
      i = ch.find(b"\n", start)
      if i < 0:
        if start < len(ch):
          parts.append(ch[start:])
        break
      parts.append(ch[start : i + 1])
      yield b"".join(parts)
      parts = []
      start = i + 1
  if parts:
    yield b"".join(parts)


def _read_jsonl(f: InputFile, bad: BadInput) -> Iterator[Document]:
  path_set = f.set_name or _set_name_from_path(f.path)
  lineno = 0
  try:
    with open_binary(f.path) as raw:
      for lineno, line in enumerate(_iter_lines(_chunks(f, raw)), 1):
        where = f"line {lineno}"
        if not line.strip():
          bad("blank_line", f.path, where, "blank line (expected one JSON object per line)")
          continue
        try:
          s = line.decode("utf-8")
        except UnicodeDecodeError as e:
          bad(
            "invalid_utf8",
            f.path,
            where,
            f"invalid UTF-8 at byte {e.start} of the line "
            f"(near {line[max(0, e.start - 12) : e.start + 12]!r})",
          )
          continue
        try:
          obj = json.loads(s)
        except json.JSONDecodeError as e:
          bad("malformed_json", f.path, where, f"malformed JSON: {e.msg} at column {e.colno}")
          continue
        if not isinstance(obj, dict):
          bad("malformed_json", f.path, where, f"expected a JSON object, got {type(obj).__name__}")
          continue
        text = obj.get("text")
        if not isinstance(text, str):
          what = (
            "no 'text' field (fields: " + ", ".join(sorted(obj)[:8]) + ")"
            if "text" not in obj
            else f"'text' is {type(text).__name__}, not a string"
          )
          bad("missing_text", f.path, where, what)
          continue
        if not _text_ok(text, bad, f.path, where):
          continue
        meta = _parse_meta(obj)
        yield Document(text, meta, _doc_set_name(obj, meta, path_set), f.path, where, _tell(raw))
  except BadInputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (zstd/gzip corruption, I/O errors)
    bad(
      "unreadable_file",
      f.path,
      f"after line {lineno}",
      f"cannot read the rest of the file ({type(e).__name__}: {e})",
    )
    return
  if lineno == 0:
    bad("empty_file", f.path, "", "empty file (no lines after decompression)")


def _read_parquet(f: InputFile, bad: BadInput) -> Iterator[Document]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  path_set = f.set_name or _set_name_from_path(f.path)
  row = 0
  try:
    with open_binary(f.path) as raw:
      try:
        pf = pq.ParquetFile(raw)
      except Exception as e:  # pylint: disable=broad-except
        bad("unreadable_file", f.path, "", f"unreadable parquet file ({type(e).__name__}: {e})")
        return
      names = pf.schema_arrow.names
      if "text" not in names:
        bad("missing_text", f.path, "", f"no 'text' column (columns: {', '.join(names[:10])})")
        return
      cols = [c for c in ("text", "meta", "red_pajama_subset") if c in names]
      if pf.metadata.num_rows == 0:
        bad("empty_file", f.path, "", "parquet file with 0 rows")
        return
      for batch in pf.iter_batches(batch_size=64, columns=cols):
        texts = batch.column("text")
        if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type):
          texts = texts.cast(pa.large_binary())
        texts = texts.to_pylist()
        metas = batch.column("meta").to_pylist() if "meta" in cols else [None] * len(texts)
        subsets = (
          batch.column("red_pajama_subset").to_pylist()
          if "red_pajama_subset" in cols
          else [None] * len(texts)
        )
        for t, m, sub in zip(texts, metas, subsets):
          where = f"row {row}"
          row += 1
          if not isinstance(t, bytes):
            bad(
              "missing_text",
              f.path,
              where,
              "text is null" if t is None else f"text is {type(t).__name__}",
            )
            continue
          try:
            text = t.decode("utf-8")
          except UnicodeDecodeError as e:
            bad("invalid_utf8", f.path, where, f"invalid UTF-8 at byte {e.start} of the text")
            continue
          obj = {"meta": m, "red_pajama_subset": sub}
          meta = _parse_meta(obj) if m is not None else {}
          yield Document(text, meta, _doc_set_name(obj, meta, path_set), f.path, where, _tell(raw))
  except BadInputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (arrow/IO errors mid-file)
    bad(
      "unreadable_file",
      f.path,
      f"row {row}",
      f"cannot read the rest of the parquet file ({type(e).__name__}: {e})",
    )


def _read_txt(f: InputFile, bad: BadInput) -> Iterator[Document]:
  try:
    with open_binary(f.path) as raw:
      data = raw.read()
  except OSError as e:
    bad("unreadable_file", f.path, "", f"cannot read ({e})")
    return
  if not data:
    bad("empty_file", f.path, "", "empty file (0 bytes)")
    return
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    bad(
      "invalid_utf8",
      f.path,
      f"line {line}",
      f"invalid UTF-8 at byte {e.start} of the file "
      f"(near {data[max(0, e.start - 12) : e.start + 12]!r})",
    )
    return
  name = os.path.basename(f.path)
  yield Document(text, {"file": name}, f.set_name, f.path, "", len(data))
