"""The synthetic copy task: source, tokenizer identity, training rows and the copy_task evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.data import get_tokenizer, load_documents, make_train_iterator, open_documents
from mamba2_jax.data import synthetic
from configs.evaluate import get_config
from mamba2_jax.eval import streaming
from mamba2_jax.eval.copy_task import run_copy_task
from mamba2_jax.mitigations.spec import apply_mitigation


def test_parse_and_documents():
  t = synthetic.parse("synthetic:copy:vocab=16,span=3,pairs=2,docs=5,seed=1")
  assert t == synthetic.CopyTask(vocab=16, span=3, pairs=2, docs=5, seed=1) and t.doc_len == 13
  docs = synthetic.documents(t)
  assert len(docs) == 5 and all(d.size == 13 and d[0] == synthetic.BOS_ID for d in docs)
  for d in docs:
    body = d[1:].reshape(2, 2, 3)
    assert np.array_equal(body[:, 0], body[:, 1])  # every pair is [S S]
    assert d[1:].min() >= 2 and d[1:].max() < 16
  assert np.array_equal(docs[0], synthetic.documents(t)[0])  # deterministic
  with pytest.raises(ValueError, match="allowed keys"):
    synthetic.parse("synthetic:copy:size=3")
  with pytest.raises(ValueError, match="unknown synthetic source 'sort'"):
    synthetic.parse("synthetic:sort")
  assert [d.size for d in load_documents("synthetic:copy:span=2,docs=3")] == [5, 5, 5]


def test_copy_stream_mask_marks_the_copied_targets():
  tokens, mask = synthetic.copy_stream(vocab=10, span=2, n_pairs=2, seed=0)
  assert tokens.size == 9 and tokens[0] == synthetic.BOS_ID
  # positions whose next token is a copied one: 2, 3 (pair 1) and 6, 7 (pair 2)
  assert np.flatnonzero(mask).tolist() == [2, 3, 6, 7]
  assert np.array_equal(tokens[3:5], tokens[1:3]) and np.array_equal(tokens[7:9], tokens[5:7])


def test_tokenizer_identity_and_training_rows_align_with_pairs():
  tok = get_tokenizer("synthetic:copy:vocab=64")
  assert tok is get_tokenizer(tok) and tok.vocab_size == 64 and tok.eos_id is None
  docs, ident = open_documents("synthetic:copy:vocab=64,span=4,pairs=1,docs=50")
  assert ident == tok.identity() == get_tokenizer("synthetic-copy-v64").identity()
  get_tokenizer("synthetic-copy-v64").check_compatible(ident)
  with pytest.raises(ValueError, match="synthetic-copy-v32"):
    get_tokenizer("synthetic-copy-v32").check_compatible(ident)
  # rows of seq_len + 1 = 9 tokens are exactly one document each: BOS, S, S
  it = make_train_iterator(
    source="synthetic:copy:vocab=64,span=4,pairs=1,docs=50",
    seq_len=9,
    batch_size=4,
    add_eos=False,
    process_index=0,
    process_count=1,
    documents=(docs, ident),
  )
  rows = next(it)["tokens"]
  assert np.all(rows[:, 0] == synthetic.BOS_ID)
  assert np.array_equal(rows[:, 1:5], rows[:, 5:9])


def _model(vocab=64):
  cfg = Mamba2Config.preset("tiny", vocab_size=vocab, chunk_size=16)
  return Mamba2LM(cfg, rngs=nnx.Rngs(3))


def test_copy_task_equals_direct_masked_scores(tmp_path):
  model = _model()
  cfg = get_config("copy_task")
  with cfg.unlocked():
    cfg.span, cfg.max_len, cfg.num_prompts, cfg.batch_size = 4, 129, 3, 2
    cfg.bucket_size, cfg.chunk_len, cfg.progress = 16, 48, False
  res = run_copy_task(model, "synthetic-copy-v64", cfg, tmp_path, train_len=32)
  rows = [synthetic.copy_stream(64, 4, 16, cfg.seed + i) for i in range(3)]
  tokens = np.stack([t for t, _ in rows])
  mask = np.stack([m for _, m in rows])[:, :-1]
  loss, pred = streaming.token_scores(model, tokens, chunk_len=129)
  b = res["buckets"]
  for k, (s, e) in enumerate(zip(b["start"], b["end"])):
    m = mask[:, s:e]
    np.testing.assert_allclose(b["loss"][k], loss[:, s:e][m].mean(), rtol=1e-5)
    np.testing.assert_allclose(
      b["accuracy"][k], (pred[:, s:e] == tokens[:, 1:][:, s:e])[m].mean(), rtol=1e-6
    )
  s = res["summary"]
  assert abs(s["chance_loss"] - np.log(62)) < 1e-9
  # untrained: the copied-half loss within T is about chance (or above): "not learned", no pass
  assert s["copy_loss_within_train"] > 0.9 * s["chance_loss"]
  assert s["forget_verdict"] == "not learned" and s["learned"] is False
  assert s["forget_test_passed"] is None and res["forgetting"]["reason"].startswith("the mean loss")
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["summary"]["copy_loss_beyond_train"] == pytest.approx(s["copy_loss_beyond_train"])
  assert (tmp_path / "copy_task.png").stat().st_size > 1000


def test_state_norm_calibrates_on_a_copy_stream_for_synthetic_vocabularies():
  model = _model()
  tok = get_tokenizer("synthetic-copy-v64")
  m = apply_mitigation(model, "state_norm,calibrate=2", tokenizer=tok, train_len=64)
  tau = np.asarray(m.layers.mixer.state_norm_tau[...])
  assert tau.shape == (model.config.n_layer, model.config.nheads)
  assert np.all(np.isfinite(tau)) and np.all(tau > 0)
