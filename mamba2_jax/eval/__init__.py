"""Evaluation tasks of the Stuffed Mamba toolkit (docs/evaluation.md; copy task: docs/demo.md).

Every task is one library call that writes `results.json` and PNG plots into `out_dir` and
returns the results dict:

    from configs.evaluate import get_config     # the default task configs
    from mamba2_jax.eval import run_ppl_by_position, run_passkey, run_state_stats
    from mamba2_jax.eval import run_forgetting_curve, run_copy_task
    res = run_ppl_by_position(model, tokenizer, get_config("ppl_by_position"), "out/ppl",
                              train_len=8192)

All of them stream their inputs through `model.prefill` in chunks with the cache carried
(`mamba2_jax.eval.streaming`), so memory does not grow with the context length.
`python -m experiments.evaluate` is the command-line front end (model sources through
`mamba2_jax.checkpoints.load_model`, mitigations, `--mode=latest|all|watch` in
`mamba2_jax.eval.jobs`). Names are imported lazily (matplotlib/scipy load on first use).
"""

import importlib

from mamba2_jax.eval.tasks import TASKS, get_task_runner  # noqa: F401 - public names

_EXPORTS = {
  "run_ppl_by_position": "mamba2_jax.eval.ppl_by_position",
  "run_passkey": "mamba2_jax.eval.passkey",
  "run_state_stats": "mamba2_jax.eval.state_stats",
  "run_forgetting_curve": "mamba2_jax.eval.forgetting_curve",
  "run_copy_task": "mamba2_jax.eval.copy_task",
  "token_scores": "mamba2_jax.eval.streaming",
  "iter_token_scores": "mamba2_jax.eval.streaming",
  "prefill_stream": "mamba2_jax.eval.streaming",
  "load_model": "mamba2_jax.checkpoints.load",
  "apply_mitigation": "mamba2_jax.mitigations.spec",
  "evaluate_source": "mamba2_jax.eval.jobs",
}
__all__ = sorted([*_EXPORTS, "TASKS", "get_task_runner"])


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'mamba2_jax.eval' has no attribute {name!r}")
