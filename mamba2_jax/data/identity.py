"""Tokenizer identities: the dict every tokenizer describes its vocabulary with (name, vocab_size,
sha256 of the exact vocabulary, special ids), stored with prepared data and checkpoints, and the
error raised when two of them differ. A leaf module (but for mamba2_jax.errors): the tokenizers (tokenizers.py) and the
synthetic vocabulary (synthetic.py) both raise it.
"""

from mamba2_jax.errors import UserError


class TokenizerMismatchError(UserError, ValueError):
  """Data, model or checkpoint were made with a different tokenizer."""
