r"""Configs of the evaluation tasks (defaults in mamba2_jax/eval/task_configs.py).

  python -m experiments.evaluate --checkpoint=random:tiny --out=/tmp/ev \
      --config=configs/evaluate.py:passkey --config.lengths="(512,1024)" --config.num_samples=10

Tasks: ppl_by_position, passkey, state_stats, forgetting_curve.
"""

import ml_collections

from mamba2_jax.eval.task_configs import get_config as _get_config


def get_config(task: str = "ppl_by_position") -> ml_collections.ConfigDict:
  return _get_config(task or "ppl_by_position")
