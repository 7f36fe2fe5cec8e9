"""The task configs: defaults in configs/evaluate.py, checks in mamba2_jax.eval.tasks."""

import ml_collections
import pytest

from configs.evaluate import get_config
from mamba2_jax.eval import TASKS, get_task_runner
from mamba2_jax.eval.tasks import COMMON_FIELDS, check_task_config, resolve_train_len


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_locked_defaults_and_a_runner(task):
  cfg = get_config(task)
  assert cfg.task == task and all(f in cfg for f in COMMON_FIELDS)
  check_task_config(cfg)
  with pytest.raises(AttributeError):
    cfg.no_such_field = 1  # locked: a typo in --config.x fails
  assert callable(get_task_runner(task))


def test_default_task_and_unknown_tasks():
  assert get_config("").task == get_config().task == "ppl_by_position"
  with pytest.raises(ValueError, match="unknown eval task 'nope'"):
    get_config("nope")
  with pytest.raises(ValueError, match="unknown eval task"):
    get_task_runner("nope")
  with pytest.raises(ValueError, match=r"lacks the fields \['train_len'"):
    check_task_config(ml_collections.ConfigDict({"task": "passkey"}))


def test_resolve_train_len():
  cfg = ml_collections.ConfigDict({"train_len": 0})
  assert resolve_train_len(None, cfg) is None and resolve_train_len(64, cfg) == 64
  cfg.train_len = 128
  assert resolve_train_len(None, cfg) == 128 and resolve_train_len(64, cfg) == 64
