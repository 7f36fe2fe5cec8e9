"""Tokenizers. The byte-level tokenizer is the default for from-scratch runs."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus BOS=256, EOS=257, PAD=258 (vocab_size 259)."""

  name = "byte"
  vocab_size = 259
  bos_id, eos_id, pad_id = 256, 257, 258

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

  def identity(self) -> dict:
    """What is stored with data and checkpoints to check they match."""
    return {"name": self.name, "vocab_size": self.vocab_size}
