"""Evaluation tasks of the Stuffed Mamba toolkit (docs/evaluation.md; copy task: docs/demo.md).

Every task is one library call that writes `results.json` and PNG plots into `out_dir` and
returns the results dict:

    from mamba2_jax.eval import run_ppl_by_position, run_passkey, run_state_stats
    from mamba2_jax.eval import run_forgetting_curve, get_task_config
    res = run_ppl_by_position(model, tokenizer, get_task_config("ppl_by_position"), "out/ppl",
                              train_len=8192)

All of them stream their inputs through `model.prefill` in chunks with the cache carried
(`mamba2_jax.eval.streaming`), so memory does not grow with the context length.
`python -m experiments.evaluate` is the command-line front end (checkpoint sources, mitigations,
`--mode=latest|all|watch`). Names are imported lazily (matplotlib/scipy load on first use).
"""

import importlib

from mamba2_jax.eval.task_configs import TASKS

_EXPORTS = {
  "run_ppl_by_position": "mamba2_jax.eval.ppl_by_position",
  "run_passkey": "mamba2_jax.eval.passkey",
  "run_state_stats": "mamba2_jax.eval.state_stats",
  "run_forgetting_curve": "mamba2_jax.eval.forgetting_curve",
  "run_copy_task": "mamba2_jax.eval.copy_task",
  "token_scores": "mamba2_jax.eval.streaming",
  "iter_token_scores": "mamba2_jax.eval.streaming",
  "prefill_stream": "mamba2_jax.eval.streaming",
  "load_model": "mamba2_jax.eval.sources",
  "apply_mitigation": "mamba2_jax.eval.sources",
  "evaluate_source": "mamba2_jax.eval.runner",
}
__all__ = sorted([*_EXPORTS, "TASKS", "get_task_config", "get_task_runner"])


def get_task_config(task: str):
  """The default ml_collections config of `task` (configs/evaluate.py is a thin wrapper)."""
  from mamba2_jax.eval import task_configs  # pylint: disable=g-import-not-at-top

  return task_configs.get_config(task)


def get_task_runner(task: str):
  """run_<task>(model, tokenizer, cfg, out_dir, *, train_len=None) -> dict."""
  if task not in TASKS:
    raise ValueError(f"unknown eval task {task!r}; tasks: {', '.join(TASKS)}")
  return getattr(importlib.import_module(f"mamba2_jax.eval.{task}"), f"run_{task}")


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'mamba2_jax.eval' has no attribute {name!r}")
