r"""Evaluation binary: ppl_by_position | passkey | state_stats | forgetting_curve | copy_task.

  python -m experiments.evaluate --task=ppl_by_position --checkpoint=random:tiny --out=/tmp/ev
  python -m experiments.evaluate --checkpoint=ckpts/mamba2-370m --out=out/pk \
      --config=configs/evaluate.py:passkey --config.lengths="(1024,8192,16384)"
  python -m experiments.evaluate --checkpoint=runs/t8k --out=out/t8k_ppl --mode=watch \
      --config=configs/evaluate.py:ppl_by_position --config.mitigation=rri

--checkpoint: random:<preset>[:seed] | an official/HF/converted checkpoint dir | a training
workdir (then --mode=latest|all|watch; results go to OUT/step_<N>/, metrics to
OUT/metrics.jsonl, the ledger to OUT/evaluated_steps.json). An --out holds the results of one
set of settings (config, checkpoint, tokenizer): other settings fail, naming the differences,
unless --overwrite. Config overrides (--config.x=y) need --config=configs/evaluate.py:<task>;
without --config the task's defaults are used.
"""

import mamba2_jax.host_tuning  # noqa: F401  (first: malloc for XLA on CPU hosts; before numpy/jax)

import logging

from absl import app, flags
from ml_collections import config_flags

from configs.evaluate import get_config
from experiments import cli
from mamba2_jax.eval import TASKS
from mamba2_jax.eval.jobs import MODES, evaluate_source

TASK = flags.DEFINE_enum("task", None, list(TASKS), "evaluation task (default: the config's)")
CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "random:<preset>[:seed], a checkpoint dir or a training workdir",
  required=True,
)
OUT = flags.DEFINE_string("out", None, "output directory", required=True)
MODE = flags.DEFINE_enum("mode", "latest", list(MODES), "training workdirs: which steps")
TOKENIZER = flags.DEFINE_string(
  "tokenizer",
  "",
  "byte | neox | tokenizer.json path (default: "
  "byte for random:, neox for checkpoint dirs, the workdir's)",
)
MITIGATION = flags.DEFINE_string("mitigation", None, "shorthand for --config.mitigation")
POLL = flags.DEFINE_float("poll_interval_s", 60.0, "watch: seconds between polls")
MAX_ATTEMPTS = flags.DEFINE_integer(
  "max_attempts", 3, "watch/all: load attempts of a damaged step once training is complete"
)
TIMEOUT = flags.DEFINE_float("timeout_s", 0.0, "watch: stop after this long (0 = never)")
OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "if --out holds results of other settings: move them to OUT/superseded/"
)
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/evaluate.py:<task>")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every restore at INFO
  cfg = _CONFIG.value
  if cfg is None:
    if TASK.value is None:
      raise app.UsageError("pass --task or --config=configs/evaluate.py:<task>")
    cfg = get_config(TASK.value)
  elif TASK.value is not None and TASK.value != cfg.task:
    raise app.UsageError(f"--task={TASK.value} but the config is for {cfg.task}")
  if MITIGATION.value is not None:
    with cfg.unlocked():
      cfg.mitigation = MITIGATION.value
  with cli.cleanup_on_failure(OUT.value):  # no empty --out left behind by a failed run
    lines = evaluate_source(
      CHECKPOINT.value,
      cfg.task,
      cfg,
      OUT.value,
      mode=MODE.value,
      tokenizer=TOKENIZER.value,
      poll_interval_s=POLL.value,
      max_attempts=MAX_ATTEMPTS.value,
      timeout_s=TIMEOUT.value,
      overwrite=OVERWRITE.value,
    )
  for line in lines:
    print({k: v for k, v in line.items() if v is not None})


if __name__ == "__main__":
  cli.run(main)
