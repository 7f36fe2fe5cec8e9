r"""Train a Mamba-2 language model: sharded, checkpointed, resumable.

  python -m experiments.train --config=configs/train.py:tiny --workdir=runs/tiny \
      [--config.seq_len=1024 --config.total_steps=500 ...]

Multi-host: every host runs the same command; `jax.distributed.initialize` runs first, from
the flags below or the environment (TPU VMs and SLURM are detected by JAX itself), e.g.
  python -m experiments.train ... --coordinator_address=10.0.0.1:1234 --num_processes=2 \
      --process_id=0

The run resumes from WORKDIR's newest good checkpoint; SIGTERM or Ctrl-C (SIGINT) saves the
current step and exits 0 (a second Ctrl-C aborts without saving, exit code 130); a non-finite
loss stops it (exit code 3) with the last good checkpoint kept; WORKDIR/train_complete marks
the end. Outputs: WORKDIR/{config.json, metrics.jsonl, tensorboard/, checkpoints/}.
"""

import mamba2_jax.host_tuning  # noqa: F401  (first: malloc for XLA on CPU hosts; before numpy/jax)

import logging
import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli
from mamba2_jax.train import distributed

DEFAULT_CONFIG = "configs/train.py:tiny"
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, f"training config (default {DEFAULT_CONFIG})", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "run directory (checkpoints, metrics)", required=True
)
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize()  # before anything touches a jax backend
  from mamba2_jax.train.loop import TrainingDiverged, train_and_evaluate  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  # logs on process 0 only (other processes report warnings and errors)
  logging.getLogger("mamba2_jax").setLevel(
    logging.INFO if jax.process_index() == 0 else logging.WARNING
  )
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except TrainingDiverged as e:
    print(f"training stopped: {e}", file=sys.stderr)
    sys.exit(3)
  except KeyboardInterrupt:
    print("interrupted: the same command resumes from the newest checkpoint", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  cli.run(main, {"config": DEFAULT_CONFIG})
