"""Tokenizer identities: the dict every tokenizer describes its vocabulary with (name, vocab_size,
sha256 of the exact vocabulary, special ids), stored with prepared data and checkpoints, and the
error raised when two of them differ. A leaf module: the tokenizers (tokenizers.py) and the
synthetic vocabulary (synthetic.py) both raise it.
"""


class TokenizerMismatchError(ValueError):
  """Data, model or checkpoint were made with a different tokenizer."""
