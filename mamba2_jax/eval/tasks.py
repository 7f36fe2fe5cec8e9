"""The evaluation tasks: their names, their runners, and the checks of a task config.

The default task configs are `configs/evaluate.py` (the binaries load it and pass the configs
down; the library never imports it). Every task config has the fields of `COMMON_FIELDS`
(sentinels 0 / "" mean "derive it"); each task reads its own fields besides.
"""

from __future__ import annotations

import importlib

TASKS = ("ppl_by_position", "passkey", "state_stats", "forgetting_curve", "copy_task")
COMMON_FIELDS = (
  "task",
  "train_len",
  "chunk_len",
  "batch_size",
  "seed",
  "progress",
  "mitigation",
  "model_dtype",
)


def check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"unknown eval task {task!r}; tasks: {', '.join(TASKS)}")


def check_task_config(cfg) -> None:
  """Raises ValueError for an unknown task or a config without the fields every task reads."""
  check_task(cfg.get("task"))
  missing = [f for f in COMMON_FIELDS if f not in cfg]
  if missing:
    raise ValueError(f"eval task config of {cfg.task!r} lacks the fields {missing}")


def get_task_runner(task: str):
  """run_<task>(model, tokenizer, cfg, out_dir, *, train_len=None) -> dict."""
  check_task(task)
  return getattr(importlib.import_module(f"mamba2_jax.eval.{task}"), f"run_{task}")


def resolve_train_len(train_len, cfg) -> int | None:
  """T_train of a task run: the explicit argument, else cfg.train_len when > 0, else None."""
  if train_len:
    return int(train_len)
  return int(cfg.train_len) if cfg.get("train_len", 0) else None
