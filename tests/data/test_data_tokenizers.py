"""Tokenizers: byte, HF tokenizer.json (a synthetic one; the real NeoX file from ../shared when a
checkout has it beside it, else the one scripts/get_neox_tokenizer.sh fetches — .ci/run does)."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from mamba2_jax.data import (
  ByteTokenizer,
  HFTokenizer,
  TokenizerMismatchError,
  check_compatible,
  get_tokenizer,
)
from mamba2_jax.data import testing
from mamba2_jax.data import tokenizers as tok_lib
from tests.paths import ROOT

SHARED = Path(os.environ.get("MAMBA2_JAX_SHARED", ROOT.parent / "shared"))
# the shared data dir beside the checkout, else the file scripts/get_neox_tokenizer.sh fetches
# (.ci/run does) into the cache where get_tokenizer("neox") looks
NEOX_FILE = SHARED / "data" / "tokenizers" / "gpt-neox-20b-olmo.json"
if not NEOX_FILE.exists():
  NEOX_FILE = tok_lib.neox_tokenizer_path()
needs_neox = pytest.mark.skipif(
  not NEOX_FILE.exists(), reason=(f"{NEOX_FILE} not present: run scripts/get_neox_tokenizer.sh")
)


def test_byte_identity_and_mismatch():
  tok = get_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259
  ident = tok.identity()
  assert ident["name"] == "byte" and len(ident["sha256"]) == 64 and ident["eos_id"] == 257
  tok.check_compatible(ident)
  tok.check_compatible({"name": "byte", "vocab_size": 259})  # older identities without a hash
  with pytest.raises(TokenizerMismatchError, match=r"'gpt-neox-20b' \(vocab 50277\).*'byte'"):
    tok.check_compatible({"name": "gpt-neox-20b", "vocab_size": 50277, "sha256": "x"}, "DATA")
  with pytest.raises(TokenizerMismatchError, match="no tokenizer identity"):
    tok.check_compatible(None)
  assert tok.decode([104, 105, 256, 257, 258]) == "hi"


def test_hf_tokenizer_json(tmp_path):
  path = testing.write_word_level_tokenizer(tmp_path / "tokenizer.json")
  tok = get_tokenizer(path)
  assert isinstance(tok, HFTokenizer) and tok.vocab_size == 7
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (1, 2, None)
  ids = tok.encode("hello , world")
  assert ids.dtype == np.int32 and ids.tolist() == [3, 5, 4]
  assert [x.tolist() for x in tok.encode_batch(["hello", "world extra"])] == [[3], [4, 6]]
  trimmed = get_tokenizer(f"{path}:vocab=6")
  assert trimmed.vocab_size == 6 and trimmed.encode("extra").tolist() == [0]  # now [UNK]
  assert trimmed.identity()["sha256"] != tok.identity()["sha256"]
  with pytest.raises(TokenizerMismatchError, match="sha256"):
    check_compatible(trimmed, {**tok.identity(), "vocab_size": 6})
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.identity() == tok.identity()


def _byte_level_bpe(path, vocab_size=400) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  t.train_from_iterator(testing.sample_texts(40, seed=1), trainer)
  t.save(str(path))
  return str(path)


def test_byte_level_bpe_trimmed_vocab(tmp_path):
  """`PATH:vocab=N` (documented) on a BPE file: the merges of dropped tokens go too."""
  path = _byte_level_bpe(tmp_path / "bpe.json")
  full = get_tokenizer(path)
  text = "The state collapses, naïvely, at 4096 tokens.\n  Indented."
  for n in (300, 380):
    tok = get_tokenizer(f"{path}:vocab={n}")
    ids = tok.encode(text)
    assert tok.vocab_size == n and ids.max() < n and tok.decode(ids) == text
    assert len(ids) >= len(full.encode(text))  # fewer merges, no fewer tokens
    assert (
      tok.name == f"hf:bpe.json:vocab={n}" and get_tokenizer(tok.spec).identity() == tok.identity()
    )
  with pytest.raises(ValueError, match="PATH:vocab=N"):
    get_tokenizer(f"{path}:vocab=many")


def test_get_tokenizer_errors(tmp_path, monkeypatch):
  monkeypatch.setenv("MAMBA2_JAX_CACHE", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="get_neox_tokenizer.sh"):
    get_tokenizer("neox")
  with pytest.raises(FileNotFoundError, match="not 'byte', 'neox'"):
    get_tokenizer(str(tmp_path / "missing.json"))
  tok = ByteTokenizer()
  assert get_tokenizer(tok) is tok


@needs_neox
def test_neox_from_shared_file(tmp_path, monkeypatch):
  tok = get_tokenizer(str(NEOX_FILE))
  assert tok.name == "gpt-neox-20b" and tok.vocab_size == tok_lib.NEOX_VOCAB_SIZE == 50277
  assert tok.encode("Hello, I am").tolist() == [12092, 13, 309, 717]
  assert tok.encode("Hello world").tolist() == [12092, 1533]
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, None)
  # the OLMo PII tokens (50277..50279) are gone: their text is ordinary BPE now
  assert tok.encode(" |||EMAIL_ADDRESS|||").max() < 50277
  text = "The state of Mamba-2 collapses, naïvely, at 4096 tokens.\n\n  Indented."
  assert tok.decode(tok.encode(text)) == text
  # the same file through the cache name used by get_tokenizer("neox")
  monkeypatch.setenv("MAMBA2_JAX_CACHE", str(tmp_path))
  (tmp_path / "tokenizers").mkdir()
  (tmp_path / "tokenizers" / tok_lib.NEOX_FILENAME).write_bytes(NEOX_FILE.read_bytes())
  assert get_tokenizer("neox").identity() == tok.identity()
  # a trimmed NeoX (BPE: its merges go too), by path or by name, named so that it is found again
  small = get_tokenizer(f"{NEOX_FILE}:vocab=1000")
  assert small.name == "gpt-neox-20b:vocab=1000" and small.decode(small.encode(text)) == text
  assert get_tokenizer(small.name).identity() == small.identity()
