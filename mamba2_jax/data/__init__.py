"""Data: sources, tokenizers, preparation to ArrayRecord, documents and the grain training stream.

    from mamba2_jax.data import get_tokenizer, load_documents, make_train_iterator, StreamConfig

Heavy dependencies (grain, pyarrow, tokenizers) are imported on first use.
"""

from mamba2_jax.data.documents import PreparedDataset, load_documents
from mamba2_jax.data.identity import TokenizerMismatchError
from mamba2_jax.data.pipeline import (
  StreamConfig,
  batch_sharding,
  check_stream_fingerprint,
  iterator_restore_args,
  iterator_save_args,
  make_global_batch,
  make_train_dataset,
  make_train_iterator,
  open_documents,
  stream_fingerprint,
)
from mamba2_jax.data.sources import BadInputError
from mamba2_jax.data.tokenizers import (
  ByteTokenizer,
  HFTokenizer,
  check_compatible,
  get_tokenizer,
)

__all__ = [
  "BadInputError",
  "ByteTokenizer",
  "HFTokenizer",
  "PreparedDataset",
  "StreamConfig",
  "TokenizerMismatchError",
  "batch_sharding",
  "check_compatible",
  "check_stream_fingerprint",
  "get_tokenizer",
  "iterator_restore_args",
  "iterator_save_args",
  "load_documents",
  "make_global_batch",
  "make_train_dataset",
  "make_train_iterator",
  "open_documents",
  "stream_fingerprint",
]
