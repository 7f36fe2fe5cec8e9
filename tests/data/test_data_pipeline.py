"""Training stream: packing keeps every token once, seeded order, disjoint host shards, exact
resume through an orbax CheckpointManager (with and without worker processes), global arrays."""

import numpy as np
import pytest

from mamba2_jax.data import (
  ByteTokenizer,
  StreamConfig,
  TokenizerMismatchError,
  check_stream_fingerprint,
  iterator_restore_args,
  iterator_save_args,
  make_train_iterator,
  open_documents,
  stream_fingerprint,
  testing,
)
from mamba2_jax.data.prepare import prepare
from mamba2_jax.data.pipeline import InMemoryDocuments
from tests.paths import ROOT

TOK = ByteTokenizer()
EOS, PAD = TOK.eos_id, TOK.pad_id
TEXTS = testing.sample_texts(30, seed=3, max_words=150)
DOCS = [TOK.encode(t) for t in TEXTS]
SOURCE = (InMemoryDocuments(DOCS), TOK.identity())


def _batches(it, n=None):
  out = []
  for b in it:
    out.append(b)
    if n is not None and len(out) == n:
      break
  return out


def _split_docs(stream):
  """Token stream (EOS-terminated documents) -> list of documents as bytes."""
  parts = np.split(stream, np.nonzero(stream == EOS)[0] + 1)
  assert parts[-1].size == 0, "stream must end with EOS"
  return [p[:-1].astype(np.uint8).tobytes() for p in parts[:-1]]


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_packing_keeps_every_token_once(packing):
  cfg = StreamConfig(seq_len=97, batch_size=3, seed=1, packing=packing, num_epochs=1)
  batches = _batches(make_train_iterator(cfg, process_index=0, process_count=1, documents=SOURCE))
  tokens = np.concatenate([b["tokens"] for b in batches])  # (rows, L)
  assert tokens.shape[1] == 97 and all(b["tokens"].shape == (3, 97) for b in batches)
  assert tokens.dtype == np.int32
  flat = tokens.reshape(-1)
  n_real = sum(d.size + 1 for d in DOCS)
  assert np.all(flat[:n_real] != PAD) and np.all(flat[n_real:] == PAD)  # padding only at the end
  assert flat.size - n_real < 97 * 3
  got = _split_docs(flat[:n_real])
  assert sorted(got) == sorted(t.encode() for t in TEXTS)  # every document once
  assert got != [t.encode() for t in TEXTS]  # ... shuffled
  if packing == "concat":
    assert set(batches[0]) == {"tokens"}
  else:
    segs = np.concatenate([b["segment_ids"] for b in batches])
    assert np.all((segs == 0) == (tokens == PAD))
    for row, seg in zip(tokens, segs):
      assert seg[0] == 1 or seg[0] == 0
      # the id steps up by one exactly after each EOS inside the row
      starts = np.nonzero(np.diff(seg) != 0)[0]
      real = starts[seg[starts + 1] != 0]
      assert np.all(row[real] == EOS) and np.all(np.diff(seg[seg > 0]) >= 0)
      assert np.array_equal(np.unique(seg[seg > 0]), np.arange(1, seg.max() + 1))


def test_seeded_order_and_epochs():
  def first(seed, n=6, **kw):
    it = make_train_iterator(
      StreamConfig(seq_len=64, batch_size=2, seed=seed, **kw),
      process_index=0,
      process_count=1,
      documents=SOURCE,
    )
    return np.concatenate([b["tokens"] for b in _batches(it, n)])

  assert np.array_equal(first(5), first(5))
  assert not np.array_equal(first(5), first(6))
  it = make_train_iterator(
    StreamConfig(seq_len=64, batch_size=2, seed=5, num_epochs=2),
    process_index=0,
    process_count=1,
    documents=SOURCE,
  )
  docs = _split_docs(
    np.concatenate([b["tokens"].reshape(-1) for b in _batches(it)])[
      : 2 * sum(d.size + 1 for d in DOCS)
    ]
  )
  e1, e2 = docs[: len(DOCS)], docs[len(DOCS) :]
  assert sorted(e1) == sorted(e2) and e1 != e2  # each epoch complete, in a new order
  unshuffled = first(0, n=20, shuffle=False).reshape(-1)
  assert np.array_equal(
    unshuffled[: DOCS[0].size + DOCS[1].size + 2], np.concatenate([DOCS[0], [EOS], DOCS[1], [EOS]])
  )


def test_process_shards_are_disjoint_and_cover():
  seen = []
  for p in range(3):
    it = make_train_iterator(
      StreamConfig(seq_len=50, batch_size=2, seed=9, num_epochs=1),
      process_index=p,
      process_count=3,
      documents=SOURCE,
    )
    flat = np.concatenate([b["tokens"].reshape(-1) for b in _batches(it)])
    flat = flat[: np.nonzero(flat == EOS)[0][-1] + 1]
    assert np.all(flat != PAD)
    seen.append(_split_docs(flat))
  assert all(abs(len(s) - len(DOCS) / 3) <= 1 for s in seen)
  for a in range(3):
    for b in range(a + 1, 3):
      assert not set(seen[a]) & set(seen[b])
  assert sorted(sum(seen, [])) == sorted(t.encode() for t in TEXTS)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_orbax_checkpoint(tmp_path, workers):
  import orbax.checkpoint as ocp

  cfg = StreamConfig(seq_len=40, batch_size=2, seed=11, packing="segments", num_workers=workers)
  kw = dict(process_index=0, process_count=1, documents=SOURCE)
  it = make_train_iterator(cfg, **kw)
  _batches(it, 5)
  if workers == 0:  # the saved position is inside a document: the packer must remember it
    assert it.get_state()["pos"] > 0
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter", "meta"))
  fp = stream_fingerprint(cfg, process_count=1, documents=SOURCE)
  mngr.save(
    5,
    args=ocp.args.Composite(data_iter=iterator_save_args(it), meta=ocp.args.JsonSave({"data": fp})),
  )
  mngr.wait_until_finished()
  expected = _batches(it, 6)
  it.close()
  fresh = make_train_iterator(cfg, **kw)
  mngr2 = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter", "meta"))
  restored = mngr2.restore(
    mngr2.latest_step(),
    args=ocp.args.Composite(data_iter=iterator_restore_args(fresh), meta=ocp.args.JsonRestore()),
  )
  check_stream_fingerprint(restored["meta"]["data"], fp)
  got = _batches(fresh, 6)
  fresh.close()
  for e, g in zip(expected, got):
    assert np.array_equal(e["tokens"], g["tokens"])
    assert np.array_equal(e["segment_ids"], g["segment_ids"])
  mngr.close()
  mngr2.close()


def test_fingerprint_mismatch_is_reported():
  a = stream_fingerprint(StreamConfig(seq_len=64), process_count=2, documents=SOURCE)
  assert a == stream_fingerprint(
    StreamConfig(seq_len=64, read_threads=7), process_count=2, documents=SOURCE
  )
  b = stream_fingerprint(StreamConfig(seq_len=128), process_count=4, documents=SOURCE)
  with pytest.raises(ValueError, match=r"config\.seq_len: 64 -> 128; process_count: 2 -> 4"):
    check_stream_fingerprint(a, b)


def test_prepared_source_and_config_forms(tmp_path):
  raw = tmp_path / "raw"
  testing.write_corpus(raw, "jsonl", TEXTS, files=2)
  out = str(tmp_path / "prep")
  prepare([str(raw)], "byte", out, show_progress=False, log=lambda *a: None)
  from ml_collections import ConfigDict

  cd = ConfigDict(
    {
      "source": out,
      "seq_len": 128,
      "batch_size": 4,
      "seed": 0,
      "model": "x",
      "packing": "concat",
      "num_epochs": 1,
      "min_doc_tokens": 500,
    }
  )
  it = make_train_iterator(cd, process_index=0, process_count=1)
  flat = np.concatenate([b["tokens"].reshape(-1) for b in _batches(it)])
  want = sorted(t.encode() for t in TEXTS if len(t.encode()) >= 500)
  assert sorted(_split_docs(flat[: np.nonzero(flat == EOS)[0][-1] + 1])) == want
  docs, ident = open_documents(out)
  assert len(docs) == len(TEXTS) and ident == TOK.identity()
  tok_path = testing.write_word_level_tokenizer(tmp_path / "t.json")
  with pytest.raises(TokenizerMismatchError):
    make_train_iterator(cd, process_index=0, process_count=1, tokenizer=tok_path)
  with pytest.raises(ValueError, match="packing"):
    StreamConfig(packing="pack")


def test_builtin_default_source():
  it = make_train_iterator(
    StreamConfig(seq_len=256, batch_size=4), process_index=0, process_count=1
  )
  b = next(it)
  assert b["tokens"].shape == (4, 256) and b["tokens"].max() < 259
  text = TOK.decode(b["tokens"][0])
  assert sum(c.isalpha() for c in text) > 150  # English prose, not noise


def test_global_batch_single_process():
  import jax
  from mamba2_jax.data import batch_sharding, make_global_batch

  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  it = make_train_iterator(
    StreamConfig(seq_len=32, batch_size=2, packing="segments"),
    process_index=0,
    process_count=1,
    documents=SOURCE,
  )
  b = next(it)
  g = make_global_batch(b, batch_sharding(mesh))
  assert g["tokens"].shape == (2, 32) and g["tokens"].dtype == np.int32
  assert np.array_equal(np.asarray(g["segment_ids"]), b["segment_ids"])
  assert g["tokens"].sharding.spec[0] == "data"


_MULTIHOST = r"""
import json, sys
pid, port = int(sys.argv[1]), sys.argv[2]
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np, jax.numpy as jnp
from absl import flags; flags.FLAGS(sys.argv[:1])
from mamba2_jax.data import StreamConfig, make_train_iterator, make_global_batch, batch_sharding
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
it = make_train_iterator(StreamConfig(source="builtin:shakespeare", seq_len=64, batch_size=2))
b = next(it)
g = make_global_batch(b, batch_sharding(mesh))
shards = sorted(g["tokens"].addressable_shards, key=lambda s: s.index[0].start)
local = np.concatenate([np.asarray(s.data) for s in shards])
total = jax.jit(lambda x: jnp.sum(x.astype(jnp.float32)))(g["tokens"])
print("RESULT", json.dumps({"shape": list(g["tokens"].shape), "local": b["tokens"].tolist(),
      "local_ok": bool(np.array_equal(local, b["tokens"])), "total": float(total)}))
"""


def test_global_batch_two_processes(tmp_path):
  """Two jax processes (2 CPU devices each): each host's batch becomes its part of one global
  (4, L) array, and the hosts read different documents."""
  import json
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "host.py"
  script.write_text(_MULTIHOST)
  root = ROOT
  env = {**__import__("os").environ, "PYTHONPATH": str(root)}
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), str(port)],
      cwd=root,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  res = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    res.append(json.loads(out.split("RESULT ", 1)[1]))
  assert all(r["shape"] == [4, 64] and r["local_ok"] for r in res)
  a, b = (np.asarray(r["local"]) for r in res)
  assert not np.array_equal(a, b)
  assert res[0]["total"] == res[1]["total"] == float(a.sum() + b.sum())
