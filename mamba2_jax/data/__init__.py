"""Data: tokenizers (and, later, sources, preparation and the training stream)."""

from mamba2_jax.data.tokenizers import ByteTokenizer

__all__ = ["ByteTokenizer"]
