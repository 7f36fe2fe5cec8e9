"""TFDS splits as a source (mamba2_jax/data/tfds_source.py): a tiny dataset prepared on disk by a
GeneratorBasedBuilder (array_record, no TensorFlow) is read through tfds.data_source by the
training stream, prepare_data, load_documents and the evaluation prompts, each checked against
the same texts given as a JSON-lines file; the errors name what was asked and list what exists.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs.evaluate import get_config as eval_config
from mamba2_jax.data import (
  BadInputError,
  PreparedDataset,
  StreamConfig,
  get_tokenizer,
  load_documents,
  make_train_iterator,
  open_documents,
  stream_fingerprint,
  testing,
)
from mamba2_jax.data import tfds_source
from mamba2_jax.data.prepare import prepare
from mamba2_jax.errors import InvalidInput, UserError
from mamba2_jax.eval import prompts
from tests.paths import ROOT

TRAIN = testing.sample_texts(14, seed=7, max_words=120)
TEST = testing.sample_texts(3, seed=8, max_words=60)
SRC = "tfds:tiny_books/small:1.0.0:train"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(data_dir, train texts in the split's index order, a jsonl file of them in that order)."""
  import tensorflow_datasets as tfds

  splits = {"train": TRAIN, "test": TEST, "bad": ["fine", b"bad \xff byte", "also fine"]}
  d = testing.write_tfds_dataset(tmp_path_factory.mktemp("tfds"), splits)
  # The reference order, read with tfds directly: TFDS fixes the example order at preparation.
  ds = tfds.data_source("tiny_books/small:1.0.0", split="train", data_dir=d, download=False)
  texts = [ds[i]["body"].decode("utf-8") for i in range(len(ds))]
  assert sorted(texts) == sorted(TRAIN)
  jsonl = testing.write_corpus(tmp_path_factory.mktemp("jsonl"), "jsonl", texts, files=1)[0]
  return d, texts, jsonl


def test_parse_spec():
  p = tfds_source.parse_spec
  assert p("tfds:pg19:train") == tfds_source.TfdsSpec("pg19", None, None, "train")
  assert p("tfds:c4/en:3.1.0:validation[:10%]") == tfds_source.TfdsSpec(
    "c4", "en", "3.1.0", "validation[:10%]"
  )
  assert str(p("tfds:a/b:1.2.3:train+test")) == "tfds:a/b:1.2.3:train+test"
  for bad in ("tfds:pg19", "tfds::train", "tfds:a/:train", "tfds:a/b/c:train", "tfds:pg19:"):
    with pytest.raises(InvalidInput, match="expected tfds:NAME"):
      p(bad)


def test_documents_in_index_order_with_the_chosen_text_feature(tiny):
  d, texts, _ = tiny
  tok = get_tokenizer("byte")
  got = list(load_documents(SRC, tok, tfds_data_dir=d))
  assert [tok.decode(x) for x in got] == texts
  # config (the only one prepared) and version (the latest) found on disk; default text: "body"
  r, _ = tfds_source.resolve("tfds:tiny_books:train", d)
  assert str(r.spec) == SRC and r.text_key == "body" and r.num_examples == len(TRAIN)
  titles = [tok.decode(x) for x in load_documents(SRC, tok, tfds_data_dir=d, tfds_text_key="title")]
  assert sorted(titles) == sorted(f"train {i}" for i in range(len(TRAIN)))
  nested = load_documents(SRC, tok, tfds_data_dir=d, tfds_text_key="meta/author")
  assert sorted(tok.decode(x) for x in nested) == sorted(f"author {i}" for i in range(len(TRAIN)))
  # split slicing is TFDS's: the examples [2, 5) of the same order
  sliced = load_documents("tfds:tiny_books:train[2:5]", tok, tfds_data_dir=d)
  assert [tok.decode(x) for x in sliced] == texts[2:5]


def _batches(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize(
  "kw",
  [
    dict(packing="concat", process_count=2, process_index=1, seed=3),
    dict(packing="segments", process_count=1, process_index=0, seed=0, min_doc_tokens=200),
    dict(packing="concat", process_count=2, process_index=0, seed=1, num_workers=1),
  ],
  ids=["concat-host1of2", "segments-min_doc_tokens", "worker-process"],
)
def test_training_stream_equals_the_same_texts_from_a_file(tiny, kw):
  """Same tokenization, shuffle, per-host slice and packing as a JSON-lines file of the texts in
  the split's order: identical batches (over two epochs)."""
  d, _, jsonl = tiny
  common = dict(seq_len=97, batch_size=3, tokenizer="byte", **kw)
  a = make_train_iterator(source=SRC, tfds_data_dir=d, **common)
  b = make_train_iterator(source=jsonl, **common)
  try:
    for x, y in zip(_batches(a, 12), _batches(b, 12)):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  finally:
    for it in (a, b):
      if hasattr(it, "close"):
        it.close()


def test_iterator_state_resumes_the_exact_next_batch(tiny):
  d, _, _ = tiny
  cfg = dict(source=SRC, tfds_data_dir=d, seq_len=64, batch_size=2, seed=5)
  it = make_train_iterator(**cfg, process_index=0, process_count=1)
  _batches(it, 3)
  state = it.get_state()
  want = _batches(it, 4)
  fresh = make_train_iterator(**cfg, process_index=0, process_count=1)
  fresh.set_state(state)
  for x, y in zip(_batches(fresh, 4), want):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_random_access_documents_tokenize_on_read(tiny):
  d, texts, _ = tiny
  docs, ident = open_documents(SRC, "byte", tfds_data_dir=d)
  assert isinstance(docs, tfds_source.TfdsDocuments) and len(docs) == len(texts)
  assert ident == get_tokenizer("byte").identity()
  np.testing.assert_array_equal(docs[5], get_tokenizer("byte").encode(texts[5]))
  lengths = docs.token_lengths()
  assert lengths.tolist() == [len(t.encode("utf-8")) for t in texts]


def test_prepare_data_from_tfds(tiny, tmp_path):
  """prepare_data shards the split (several shards), resumes as done, and the prepared directory
  streams the same batches as the TFDS split itself."""
  d, texts, _ = tiny
  out = tmp_path / "prep"
  m = prepare([SRC], "byte", out, tfds_data_dir=d, shard_bytes=4000, show_progress=False)
  ds = PreparedDataset(out)
  tok = get_tokenizer("byte")
  assert [tok.decode(ds[i]) for i in range(len(ds))] == texts
  assert len(m["shards"]) > 1 and m["num_tokens"] == sum(len(t.encode()) for t in texts)
  assert m["sources"][0]["tfds"]["source"] == SRC and m["sources"][0]["tfds"]["text_key"] == "body"
  assert prepare([SRC], "byte", out, tfds_data_dir=d, shard_bytes=4000, show_progress=False) == m
  kw = dict(seq_len=50, batch_size=2, seed=2, process_index=0, process_count=1)
  a = _batches(make_train_iterator(source=SRC, tfds_data_dir=d, **kw), 8)
  b = _batches(make_train_iterator(source=str(out), **kw), 8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_evaluation_document_prompts_from_tfds(tiny):
  d, texts, jsonl = tiny
  cfg = eval_config("ppl_by_position")
  with cfg.unlocked():
    cfg.update(prompt="docs", min_doc_len=100, num_prompts=3, max_len=900, tfds_data_dir=d)
  tok = get_tokenizer("byte")
  cfg.data = SRC
  n, got = prompts.config_prompts(cfg, tok)
  cfg.data, cfg.tfds_data_dir = jsonl, ""
  _, want = prompts.config_prompts(cfg, tok)
  got, want = np.stack(list(got)), np.stack(list(want))
  assert n == 3 and got.shape == (3, 900)
  np.testing.assert_array_equal(got, want)
  # the forgetting curve's corpus (data_type=order): the documents concatenated in order
  stream = prompts.corpus_stream(SRC, tok, 10**9, tfds_data_dir=d)
  assert tok.decode(stream) == "".join(texts)


@pytest.mark.parametrize(
  "source, kw, match",
  [
    ("tfds:no_such:train", {}, r"no prepared TFDS dataset 'no_such' .*datasets there: tiny_books"),
    ("tfds:tiny_books/big:train", {}, r"no prepared config 'big' .*configs there: small\)"),
    ("tfds:tiny_books:2.0.0:train", {}, r"no prepared version 2.0.0 .*versions there: 1.0.0\)"),
    ("tfds:tiny_books:dev", {}, r"no split 'dev' \(splits: train \(14 examples\), test \(3"),
    ("tfds:tiny_books:train+dev", {}, r"no split 'dev'"),
    ("tfds:tiny_books:train[20:30]", {}, r"tfds:tiny_books/small:1.0.0:train\[20:30\]"),
    (SRC, {"text_key": "text"}, r"no feature 'text' .*body \(Text\), meta/author \(Text\)"),
    (SRC, {"text_key": "year"}, r"'year' is Scalar int32, not text; text features: body, meta/"),
  ],
)
def test_errors_name_what_was_asked_and_list_what_exists(tiny, source, kw, match):
  d, _, _ = tiny
  with pytest.raises(UserError, match=match):
    tfds_source.resolve(source, d, kw.get("text_key"))


def test_a_tfrecord_dataset_is_refused_with_the_way_out(tiny, tmp_path):
  """Random access needs array_record: a dataset prepared as tfrecord (its dataset_info.json
  says so; writing real tfrecords needs TensorFlow) is refused before anything is opened."""
  d, _, _ = tiny
  shutil.copytree(d, tmp_path / "d")
  info_path = tmp_path / "d" / "tiny_books" / "small" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(InvalidInput, match=r"prepared as tfrecord, which has no random access"):
    tfds_source.resolve("tfds:tiny_books:train", str(tmp_path / "d"))


def test_fingerprint_records_the_resolved_dataset_only_for_tfds(tiny):
  d, _, jsonl = tiny
  docs = open_documents("tfds:tiny_books:train", "byte", tfds_data_dir=d)
  fp = stream_fingerprint(
    StreamConfig(source="tfds:tiny_books:train", tfds_data_dir=d), process_count=1, documents=docs
  )
  assert fp["data"]["tfds"]["source"] == SRC and fp["config"]["tfds_data_dir"] == d
  # other sources keep the fingerprints they had before the tfds fields existed
  other = stream_fingerprint(StreamConfig(source=jsonl), process_count=1)
  assert "tfds_data_dir" not in other["config"] and "tfds_text_key" not in other["config"]


def test_invalid_utf8_is_bad_input_named_by_example(tiny, tmp_path):
  d, _, _ = tiny
  src = "tfds:tiny_books:bad"
  docs = open_documents(src, "byte", tfds_data_dir=d)[0]
  bad = [i for i in range(3) if b"\xff" in tfds_source.source_of(docs.resolved)[i]["body"]]
  with pytest.raises(BadInputError, match=rf"small:1.0.0:bad: example {bad[0]}: invalid UTF-8"):
    docs[bad[0]]
  with pytest.raises(BadInputError, match=rf":bad: example {bad[0]}: invalid UTF-8 at byte 4"):
    list(load_documents(src, "byte", tfds_data_dir=d))
  tok = get_tokenizer("byte")
  kept = [tok.decode(x) for x in load_documents(src, tok, tfds_data_dir=d, on_error="skip")]
  assert sorted(kept) == ["also fine", "fine"]
  m = prepare([src], "byte", tmp_path / "p", tfds_data_dir=d, on_error="skip", show_progress=False)
  assert m["num_documents"] == 2 and m["bad_input"]["counts"] == {"invalid_utf8": 1}


def test_missing_data_dir(tmp_path):
  with pytest.raises(InvalidInput, match=r"the TFDS data dir .*nowhere does not exist"):
    list(load_documents(SRC, "byte", tfds_data_dir=str(tmp_path / "nowhere")))


def test_cli_prepare_data_and_lazy_import(tiny, tmp_path):
  d, texts, _ = tiny
  base = [sys.executable, "-m", "experiments.prepare_data", f"--tfds_data_dir={d}", "--quiet"]
  out = tmp_path / "cli"
  r = subprocess.run(
    base + [f"--input={SRC}", f"--out={out}", "--tfds_text_key=body"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 0, r.stderr
  m = json.loads((out / "manifest.json").read_text())
  assert m["num_documents"] == len(texts) and f"{len(texts)} documents" in r.stdout
  r = subprocess.run(
    base + ["--input=tfds:tiny_books:dev", f"--out={tmp_path / 'cli2'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2 and "no split 'dev'" in r.stderr and "Traceback" not in r.stderr
  # the other sources never import tensorflow_datasets
  txt = tmp_path / "a.txt"
  txt.write_text("hello")
  code = (
    "import sys; from mamba2_jax.data import load_documents, open_documents; "
    "import mamba2_jax.data.prepare; "
    f"open_documents({str(txt)!r}, 'byte'); assert len(list(load_documents({str(txt)!r}, 'byte'))); "
    "assert 'tensorflow_datasets' not in sys.modules, 'imported tensorflow_datasets'"
  )
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


@pytest.mark.slow  # a trainer compile: ~80 s alone on 2 busy cores, ~40 s from the run's cache
def test_train_a_few_steps_from_tfds(tiny, tmp_path):
  """The trainer on data.source=tfds:... with the config of tests/train/test_train.py's workdir
  test (the same programs: in a scripts/test.sh run they come from its compilation cache); the
  checkpoint's stream fingerprint records the version and config found on disk."""
  from mamba2_jax import checkpoints
  from mamba2_jax.train.loop import train_and_evaluate
  from tests.train.test_train import tiny_config

  d, _, _ = tiny
  config = tiny_config(**{"data.source": "tfds:tiny_books:train", "data.tfds_data_dir": d})
  last = train_and_evaluate(config, str(tmp_path))
  assert last["step"] == config.total_steps and np.isfinite(last["loss"])
  _, meta = checkpoints.load_workdir_model(str(tmp_path))
  assert meta["stream"]["data"]["tfds"] == {"source": SRC, "data_dir": d, "text_key": "body"}
  assert meta["stream"]["data"]["num_documents"] == len(TRAIN)
