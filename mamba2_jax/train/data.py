"""The trainer's data: per-process batches from logical data shards, checkpointable.

The global batch is the union of `num_shards` logical shards' batches (shard s reads the
documents `[s::num_shards]` of the shuffled stream, mamba2_jax/data/pipeline.py), and process p
of n reads shards [p*S/n, (p+1)*S/n). With a fixed `data.num_shards` the set of rows in every
global batch is the same for any number of processes: a 2-process run trains on exactly the
batches of a 1-process run (the loss is a mean over rows, so their order does not matter).
"""

from __future__ import annotations

import json

import numpy as np

from mamba2_jax.errors import InvalidInput
from mamba2_jax.data.pipeline import (
  StreamConfig,
  make_train_iterator,
  open_documents,
  stream_fingerprint,
)

__all__ = ["ShardedStream", "stream_config", "open_stream"]


class ShardedStream:
  """Iterator of this process's batches: its logical shards' batches concatenated.

  Implements get_state() -> bytes / set_state(bytes) / start_prefetch(), which grain's orbax
  checkpoint handler uses for non-grain iterators (one JSON file per process).
  """

  def __init__(self, config: StreamConfig, shards, num_shards: int, documents):
    self.shards = tuple(shards)
    self.iters = [
      make_train_iterator(config, process_index=s, process_count=num_shards, documents=documents)
      for s in self.shards
    ]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.iters]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps({str(s): it.get_state() for s, it in zip(self.shards, self.iters)}).encode()

  def set_state(self, state: bytes | dict) -> None:
    """Restores this process's shards from a {shard: state} mapping (bytes: JSON) that may
    hold other shards too (e.g. all processes' states merged, after a change of the
    process count)."""
    saved = json.loads(state) if isinstance(state, (bytes, str)) else state
    missing = [s for s in self.shards if str(s) not in saved]
    if missing:
      raise InvalidInput(
        f"data iterator state has no entry for logical shard(s) {missing} "
        f"(it holds {sorted(saved, key=int)})"
      )
    for s, it in zip(self.shards, self.iters):
      it.set_state(saved[str(s)])

  def start_prefetch(self) -> None:
    for it in self.iters:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()

  def close(self) -> None:
    for it in self.iters:
      if hasattr(it, "close"):
        it.close()


def stream_config(
  config,
  *,
  source=None,
  batch_size: int,
  seed_offset: int = 0,
  num_epochs=None,
  shuffle: bool = True,
) -> StreamConfig:
  """StreamConfig of one logical shard; rows are tbptt_segments * seq_len + 1 tokens."""
  d = config.data
  return StreamConfig(
    source=source or d.source,
    tokenizer=d.tokenizer,
    seq_len=config.tbptt_segments * config.seq_len + 1,
    batch_size=batch_size,
    seed=config.seed + seed_offset,
    packing=d.packing,
    num_workers=d.num_workers,
    num_epochs=num_epochs,
    shuffle=shuffle,
    min_doc_tokens=d.min_doc_tokens,
    add_bos=d.add_bos,
    add_eos=d.add_eos,
    tfds_data_dir=d.get("tfds_data_dir", ""),
    tfds_text_key=d.get("tfds_text_key", ""),
  )


def open_stream(
  config,
  *,
  process_index: int,
  process_count: int,
  source=None,
  seed_offset: int = 0,
  num_epochs=None,
  shuffle: bool = True,
):
  """-> (make_iterator() -> ShardedStream, tokenizer identity, stream fingerprint).

  Documents are opened once; `make_iterator` builds fresh iterators over them (e.g. one to
  restore a checkpoint into).
  """
  num_shards = config.data.num_shards or process_count
  per_shard = config.global_batch_size // num_shards
  per_proc = num_shards // process_count
  shards = range(process_index * per_proc, (process_index + 1) * per_proc)
  cfg = stream_config(
    config,
    source=source,
    batch_size=per_shard,
    seed_offset=seed_offset,
    num_epochs=num_epochs,
    shuffle=shuffle,
  )
  documents = open_documents(
    cfg.source,
    cfg.tokenizer,
    cfg.min_doc_tokens,
    tfds_data_dir=cfg.tfds_data_dir,
    tfds_text_key=cfg.tfds_text_key,
  )
  fp = stream_fingerprint(cfg, process_count=num_shards, documents=documents)
  fp["shards_per_process"] = per_proc
  return (lambda: ShardedStream(cfg, shards, num_shards, documents)), documents[1], fp
