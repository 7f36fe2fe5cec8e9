"""Synthetic token sources for collapse experiments: `synthetic:copy:<key=value,...>`.

The copy task (docs/demo.md): a document is BOS followed by `pairs` pairs [S S], each S a
span of `span` tokens drawn uniformly from ids 2..vocab-1 (0 = PAD, 1 = BOS), so the second half
of every pair is predictable from the first and nothing else is. With `pairs * 2 * span + 1`
tokens a document is exactly one training row of `seq_len = pairs * 2 * span` inputs, so
"one pair per sequence" (nothing in training ever needs forgetting) and "several pairs per
sequence" (the model must drop old pairs) are two settings of one source.

    synthetic:copy:vocab=64,span=32,pairs=1,docs=100000,seed=0

`copy_stream(...)` builds the evaluation input: BOS then n fresh pairs, with the mask of the
copied halves (the positions whose next-token prediction is determined by the context).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from mamba2_jax.data.identity import TokenizerMismatchError
from mamba2_jax.errors import InvalidInput

PREFIX = "synthetic:"
PAD_ID, BOS_ID = 0, 1

__all__ = [
  "CopyTask",
  "SyntheticTokenizer",
  "is_synthetic",
  "parse",
  "documents",
  "load",
  "identity",
  "tokenizer_for",
  "copy_stream",
  "copy_prompt",
  "pairs_for",
]


@dataclasses.dataclass(frozen=True)
class CopyTask:
  vocab: int = 64
  span: int = 32
  pairs: int = 1
  docs: int = 100_000
  seed: int = 0

  def __post_init__(self):
    for f in ("vocab", "span", "pairs", "docs"):
      if getattr(self, f) < 1:
        raise InvalidInput(f"synthetic:copy: {f} must be >= 1, got {getattr(self, f)}")
    if self.vocab < 3:
      raise InvalidInput(
        f"synthetic:copy: vocab must be >= 3 (ids 0, 1 are PAD, BOS), got {self.vocab}"
      )

  @property
  def doc_len(self) -> int:
    return 1 + 2 * self.span * self.pairs


def is_synthetic(source) -> bool:
  return isinstance(source, str) and source.startswith(PREFIX)


def parse(source: str) -> CopyTask:
  """`synthetic:copy[:k=v,...]` -> CopyTask (ValueError naming the allowed keys otherwise)."""
  rest = source[len(PREFIX) :]
  kind, _, args = rest.partition(":")
  if kind != "copy":
    raise InvalidInput(f"{source}: unknown synthetic source {kind!r}; allowed: 'copy'")
  kw = {}
  fields = {f.name for f in dataclasses.fields(CopyTask)}
  for item in filter(None, args.split(",")):
    k, sep, v = item.partition("=")
    if not sep or k not in fields:
      raise InvalidInput(f"{source}: bad argument {item!r}; allowed keys: {sorted(fields)}")
    kw[k] = int(v)
  return CopyTask(**kw)


def _pairs(seed: int, vocab: int, span: int, shape: tuple[int, ...]) -> np.ndarray:
  """Pairs [S S] of random spans, shape[-1] pairs per row: int32 shape[:-1] + (2*span*pairs,)."""
  rng = np.random.default_rng(seed)
  spans = rng.integers(2, vocab, shape + (1, span), dtype=np.int32)
  return np.broadcast_to(spans, shape + (2, span)).reshape(shape[:-1] + (-1,))


def documents(task: CopyTask) -> list[np.ndarray]:
  """task.docs documents of task.doc_len int32 tokens (deterministic in task.seed)."""
  body = _pairs(task.seed, task.vocab, task.span, (task.docs, task.pairs))
  return list(np.concatenate([np.full((task.docs, 1), BOS_ID, np.int32), body], axis=1))


def load(source: str, min_doc_tokens: int = 0) -> tuple[list[np.ndarray], dict]:
  """(the source's documents of at least min_doc_tokens tokens, tokenizer identity)."""
  task = parse(source)
  return [d for d in documents(task) if d.size >= min_doc_tokens], identity(task)


class SyntheticTokenizer:
  """The "tokenizer" of the synthetic vocabulary: ids 0..vocab-1 (0 = PAD, 1 = BOS, no EOS).

  Text is ids written as decimal numbers separated by spaces (for logs and generation); its
  identity is checked like a real tokenizer's. `get_tokenizer("synthetic:copy:vocab=64")` or
  `get_tokenizer("synthetic-copy-v64")` returns one.
  """

  bos_id, eos_id, pad_id = BOS_ID, None, PAD_ID

  def __init__(self, vocab: int):
    self.vocab_size = int(vocab)
    self.name = self.spec = f"synthetic-copy-v{self.vocab_size}"

  def identity(self) -> dict:
    return {
      "name": self.name,
      "vocab_size": self.vocab_size,
      "bos_id": self.bos_id,
      "eos_id": self.eos_id,
      "pad_id": self.pad_id,
      "sha256": hashlib.sha256(self.name.encode()).hexdigest(),
    }

  def check_compatible(self, identity: dict, what: str = "the data", fix: str = "") -> None:
    mine = self.identity()
    if not isinstance(identity, dict) or any(
      identity.get(k) != mine[k] for k in ("name", "vocab_size", "sha256")
    ):
      raise TokenizerMismatchError(
        f"{what} was made with {identity!r}, this run uses {mine['name']!r}"
        + (f". {fix}" if fix else "")
      )

  def encode(self, text: str) -> np.ndarray:
    return np.asarray([int(t) for t in text.split()], np.int32)

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))

  def __repr__(self):
    return f"SyntheticTokenizer({self.vocab_size})"


def tokenizer_for(spec: str) -> SyntheticTokenizer | None:
  """SyntheticTokenizer for "synthetic:copy:..." or "synthetic-copy-v<V>", else None."""
  if spec.startswith("synthetic-copy-v") and spec[len("synthetic-copy-v") :].isdigit():
    return SyntheticTokenizer(int(spec[len("synthetic-copy-v") :]))
  if is_synthetic(spec):
    return SyntheticTokenizer(parse(spec).vocab)
  return None


def identity(task: CopyTask) -> dict:
  """The tokenizer identity of the task's vocabulary (stored with data and checkpoints)."""
  return SyntheticTokenizer(task.vocab).identity()


def copy_stream(vocab: int, span: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (1 + 2*span*n_pairs,) int32, mask bool): BOS then n_pairs fresh pairs [S S];
  mask[i] is True where tokens[i + 1] is a copied token (the loss/accuracy positions)."""
  tokens = np.concatenate([[BOS_ID], _pairs(seed, vocab, span, (n_pairs,))]).astype(np.int32)
  copied = np.zeros(tokens.size, bool)
  starts = 1 + np.arange(n_pairs) * 2 * span + span  # first token of each second half
  for s in starts:
    copied[s : s + span] = True
  mask = np.zeros(tokens.size, bool)
  mask[:-1] = copied[1:]  # predicting tokens[i + 1] from tokens[: i + 1]
  return tokens, mask


def pairs_for(length: int, span: int) -> int:
  """The number of whole pairs in a copy stream of `length` tokens (BOS included), >= 1."""
  return max(1, (length - 1) // (2 * span))


def copy_prompt(vocab: int, span: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`copy_stream` with as many pairs as fit in `length` tokens."""
  return copy_stream(vocab, span, pairs_for(length, span), seed)
