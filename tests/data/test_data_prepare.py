"""prepare -> ArrayRecord + manifest -> load_documents: exact bytes, counts, resume, workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mamba2_jax.data import (
  BadInputError,
  ByteTokenizer,
  PreparedDataset,
  TokenizerMismatchError,
  get_tokenizer,
  load_documents,
  testing,
)
from mamba2_jax.data.prepare import length_histogram, prepare
from tests.paths import ROOT

SHARED = Path(os.environ.get("MAMBA2_JAX_SHARED", ROOT.parent / "shared"))
GUTENBERG = SHARED / "data" / "gutenberg"
NEOX_FILE = SHARED / "data" / "tokenizers" / "gpt-neox-20b-olmo.json"
TEXTS = testing.sample_texts(40, seed=2)
TOK = ByteTokenizer()


def _corpus(tmp_path, fmt="jsonl.zst", files=4, texts=TEXTS):
  d = tmp_path / "raw"
  testing.write_corpus(d, fmt, texts, files=files)
  return str(d)


def _prep(tmp_path, raw, name="out", **kw):
  kw.setdefault("show_progress", False)
  kw.setdefault("log", lambda *a: None)
  return prepare([raw], "byte", str(tmp_path / name), **kw), str(tmp_path / name)


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet_struct", "txt"])
def test_prepared_round_trip(tmp_path, fmt):
  raw = _corpus(tmp_path, fmt)
  m, out = _prep(tmp_path, raw, shard_bytes=1500)
  assert len(m["shards"]) > 1
  got = [TOK.decode_bytes(x) for x in load_documents(out, TOK)]
  assert got == [t.encode() for t in TEXTS]
  assert list(load_documents(out)) and all(x.dtype == np.int32 for x in load_documents(out))
  lengths = [len(t.encode()) for t in TEXTS]
  assert m["num_documents"] == len(TEXTS) and m["num_tokens"] == sum(lengths)
  assert m["dtype"] == "<u2" and m["tokenizer"] == TOK.identity()
  assert m["counts"]["read"] == m["counts"]["kept"] == len(TEXTS)
  assert sum(b["documents"] for b in m["length_histogram"]) == len(TEXTS)
  assert sum(b["tokens"] for b in m["length_histogram"]) == sum(lengths)
  assert sum(s["size"] for s in m["sources"]) == m["source_bytes"] > 0
  ds = PreparedDataset(out)
  assert ds.lengths.tolist() == lengths and TOK.decode_bytes(ds[7]) == TEXTS[7].encode()


def test_filters_are_counted(tmp_path):
  raw = _corpus(tmp_path, "slimpajama")
  m, out = _prep(tmp_path, raw, min_doc_tokens=300, subset=["book", "arxiv"])
  keep = [t for i, t in enumerate(TEXTS) if i % 3 != 2 and len(t.encode()) >= 300]
  assert [TOK.decode_bytes(x).decode() for x in load_documents(out)] == keep
  c = m["counts"]
  assert c["filtered_subset"] == sum(1 for i in range(len(TEXTS)) if i % 3 == 2)
  assert c["read"] == len(TEXTS) and c["kept"] == len(keep)
  assert c["kept"] + c["filtered_short"] + c["filtered_subset"] == c["read"]
  assert m["filters"] == {"min_doc_tokens": 300, "subset": ["arxiv", "book"], "max_docs": None}
  m2, out2 = _prep(tmp_path, raw, name="few", max_docs=5, shard_bytes=1500)
  assert m2["num_documents"] == 5 and m2["counts"]["stopped_at_max_docs"]
  assert [TOK.decode_bytes(x).decode() for x in load_documents(out2)] == TEXTS[:5]


def test_resume_and_settings_guard(tmp_path):
  raw = _corpus(tmp_path, "jsonl", files=5)
  m, out = _prep(tmp_path, raw, shard_bytes=1)
  shards = Path(out) / "shards"
  assert len(m["shards"]) == 5
  # Simulate an interruption during shard 3: its marker is missing, a temp file is left over.
  os.remove(shards / "shard-00003.json")
  os.replace(shards / "shard-00003.array_record", shards / "shard-00003.array_record.tmp")
  os.remove(Path(out) / "manifest.json")
  with pytest.raises(FileNotFoundError, match="did not finish.*resume"):
    PreparedDataset(out)
  before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-0000[0124].array_record")}
  m2, _ = _prep(tmp_path, raw, shard_bytes=1)
  after = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-0000[0124].array_record")}
  assert before == after  # finished shards were not redone
  drop = ("prepare_seconds_last_run",)
  assert {k: v for k, v in m2.items() if k not in drop} == {
    k: v for k, v in m.items() if k not in drop
  }
  assert [TOK.decode_bytes(x).decode() for x in load_documents(out)] == TEXTS
  with pytest.raises(ValueError, match="other settings.*min_doc_tokens"):
    _prep(tmp_path, raw, shard_bytes=1, min_doc_tokens=10)
  m3, _ = _prep(tmp_path, raw, shard_bytes=1, min_doc_tokens=10, overwrite=True)
  assert m3["filters"]["min_doc_tokens"] == 10


def test_workers_give_identical_output(tmp_path):
  raw = _corpus(tmp_path, "jsonl.gz", files=4)
  m1, out1 = _prep(tmp_path, raw, name="w1", shard_bytes=1)
  m2, out2 = _prep(tmp_path, raw, name="w2", shard_bytes=1, workers=2)
  assert m1["shards"] == m2["shards"] and m1["num_tokens"] == m2["num_tokens"]
  a, b = list(load_documents(out1)), list(load_documents(out2))
  assert len(a) == len(b) == len(TEXTS) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bad_input_fail_and_skip(tmp_path):
  raw = tmp_path / "raw"
  testing.write_corpus(raw, "jsonl", TEXTS[:6], files=2)
  testing.write_bytes(
    raw / "part-009.jsonl", b'{"text": "ok"}\n{"text": broken}\n{"meta": 1}\n{"text": "\xff"}\n'
  )
  testing.write_bytes(raw / "part-010.jsonl", b"")
  with pytest.raises(BadInputError, match=r"part-009\.jsonl: line 2: malformed JSON"):
    _prep(tmp_path, str(raw))
  m, out = _prep(tmp_path, str(raw), name="skip", on_error="skip")
  assert m["bad_input"]["counts"] == {
    "malformed_json": 1,
    "missing_text": 1,
    "invalid_utf8": 1,
    "empty_file": 1,
  }
  assert m["bad_input"]["total"] == 4 and len(m["bad_input"]["examples"]) == 4
  assert m["num_documents"] == 7  # 6 good + "ok"


def test_on_error_hint_resumes_into_the_same_out(tmp_path):
  """The failure's hint (`--on_error=skip`) works as printed, into the same --out: settings bind
  OUT once a shard is finished, and shards finished under "fail" are what "skip" gives."""
  raw = tmp_path / "raw"
  good = testing.write_corpus(raw, "jsonl.zst", TEXTS[:6], files=2)
  whole = Path(good[0]).read_bytes()
  testing.write_bytes(raw / "zz-last.jsonl.zst", whole[: len(whole) // 2])  # truncated
  # one unit (no shard finishes before the failure), then one shard per file
  for name, shard_bytes in [("one", 1 << 20), ("many", 1)]:
    with pytest.raises(BadInputError, match="truncated.*--on_error=skip"):
      _prep(tmp_path, str(raw), name=name, shard_bytes=shard_bytes)
    m, out = _prep(tmp_path, str(raw), name=name, shard_bytes=shard_bytes, on_error="skip")
    assert m["bad_input"]["total"] == 1 and m["num_documents"] == 6
  # skip -> fail after a shard skipped input: that shard is not what "fail" gives; refused
  (Path(out) / "manifest.json").unlink()
  (Path(out) / "shards" / "shard-00000.json").unlink()
  with pytest.raises(ValueError, match="other settings.*on_error"):
    _prep(tmp_path, str(raw), name="many", shard_bytes=1)


def test_tokenizer_identity_is_checked(tmp_path):
  raw = _corpus(tmp_path, "jsonl")
  _, out = _prep(tmp_path, raw)
  other = get_tokenizer(testing.write_word_level_tokenizer(tmp_path / "tok.json"))
  with pytest.raises(TokenizerMismatchError, match="tokenized with 'byte'"):
    next(load_documents(out, other))
  with pytest.raises(ValueError, match="raw inputs need a tokenizer"):
    next(load_documents(raw))


def test_length_histogram():
  h = length_histogram(np.array([0, 1, 2, 3, 4, 1000]))
  assert [(b["min"], b["max_exclusive"], b["documents"]) for b in h] == [
    (0, 1, 1),
    (1, 2, 1),
    (2, 4, 2),
    (4, 8, 1),
    (512, 1024, 1),
  ]


def test_cli(tmp_path):
  raw = _corpus(tmp_path, "jsonl", files=2)
  out = tmp_path / "cli"
  cmd = [
    sys.executable,
    "-m",
    "experiments.prepare_data",
    f"--input={raw}",
    "--tokenizer=byte",
    f"--out={out}",
    "--min_doc_tokens=100",
    "--quiet",
  ]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stderr
  m = json.loads((out / "manifest.json").read_text())
  assert f"{m['num_documents']} documents" in r.stdout and m["filters"]["min_doc_tokens"] == 100
  testing.write_bytes(Path(raw) / "zz.jsonl", b'{"text": "a"}\n{"txt": "b"}\n')
  cmd[5] = f"--out={tmp_path / 'cli2'}"
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode != 0 and "zz.jsonl: line 2: no 'text' field" in r.stderr


@pytest.mark.skipif(
  not (GUTENBERG.exists() and NEOX_FILE.exists()),
  reason=(f"{GUTENBERG} / {NEOX_FILE} not present (shared data beside the checkout)"),
)
def test_gutenberg_with_neox(tmp_path):
  src = str(GUTENBERG / "validation-001.jsonl.zst")
  m = prepare(
    [src],
    str(NEOX_FILE),
    str(tmp_path / "g"),
    max_docs=3,
    min_doc_tokens=4096,
    show_progress=False,
    log=lambda *a: None,
  )
  assert m["num_documents"] == 3 and m["tokenizer"]["name"] == "gpt-neox-20b"
  assert m["tokenizer"]["vocab_size"] == 50277 and m["dtype"] == "<u2"
  assert m["length_stats"]["min"] >= 4096
  tok = get_tokenizer(str(NEOX_FILE))
  docs = list(load_documents(str(tmp_path / "g"), tok))
  raw = next(load_documents(src, tok, max_docs=1, min_doc_tokens=4096))
  assert len(docs) == 3 and np.array_equal(docs[0], raw)
  assert tok.decode(docs[0][:50]).strip()
