"""The layout of a training workdir, and reading it (no jax, no orbax: sweeps and watchers use it).

  WORKDIR/config.json             resolved training config of the run (written once)
  WORKDIR/checkpoints/<step>/     one orbax Composite per step, items (`ITEMS`):
      params/      model parameters (nnx pure dict), float arrays, any sharding
      opt_state/   {"opt_state": optax state, "step": int32}
      data_iter/   grain iterator state, one JSON per process
      meta/        JSON: step, tokens_seen, config, model, tokenizer identity, stream
                   fingerprint, checksums of params/opt_state, time
  WORKDIR/train_complete          written by the trainer after the final step (JSON)

Orbax writes each step into a temporary directory and renames it when complete, so a step
that is still being written is never listed by `complete_steps`. The writer is
`mamba2_jax.train.checkpoint.Checkpointer`; the verified reading of a step's model is
`mamba2_jax.checkpoints.load`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from mamba2_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
TRAIN_COMPLETE = "train_complete"
ITEMS = ("params", "opt_state", "data_iter", "meta")


class CheckpointError(UserError, RuntimeError):
  """A checkpoint step cannot be used (missing item, unreadable, or checksum mismatch)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def complete_steps(workdir: str) -> list[int]:
  """Finalized checkpoint steps in ascending order (never a step still being written)."""
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  steps = []
  for name in os.listdir(d):
    # orbax writes <step>.orbax-checkpoint-tmp-* and renames it to <step> when complete
    if name.isdigit() and os.path.isdir(os.path.join(d, name)):
      steps.append(int(name))
  return sorted(steps)


def is_train_complete(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, TRAIN_COMPLETE))


def mark_train_complete(workdir: str, info: dict[str, Any]) -> None:
  """Writes WORKDIR/train_complete atomically (the trainer calls it on process 0 only)."""
  path = os.path.join(workdir, TRAIN_COMPLETE)
  with open(path + ".tmp", "w") as f:
    json.dump({**info, "time": time.time()}, f, indent=2)
  os.replace(path + ".tmp", path)


def read_run_config(workdir, default=None) -> dict[str, Any] | None:
  """WORKDIR/config.json, the run's training config as a dict (`default` when unreadable)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


def train_len(train_config: Mapping[str, Any]) -> int | None:
  """T_train of a training config (or its overrides): seq_len x tbptt_segments, None without
  seq_len. The state is passed across the TBPTT segments, so the model is trained on contexts
  of that many tokens (paper §5, docs/sweeps.md)."""
  seq_len = train_config.get("seq_len")
  if not seq_len:
    return None
  return int(seq_len) * int(train_config.get("tbptt_segments") or 1)


def read_meta(workdir: str, step: int) -> dict[str, Any]:
  """The JSON metadata item of one step (raises CheckpointError when missing/unreadable)."""
  path = os.path.join(checkpoint_dir(workdir), str(step), "meta", "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint step {step}: meta item unreadable ({e})") from None


def read_data_states(workdir: str, step: int) -> dict[str, Any]:
  """All processes' data-iterator states of one step merged: {logical shard: state}."""
  d = os.path.join(checkpoint_dir(workdir), str(step), "data_iter")
  files = sorted(f for f in os.listdir(d) if f.startswith("process_") and f.endswith(".json"))
  if not files:
    raise ValueError(f"no process_*.json iterator files in {d}")
  merged: dict[str, Any] = {}
  for f in files:
    with open(os.path.join(d, f)) as fh:
      merged.update(json.load(fh))
  return merged
