r"""Run a sweep: train every grid point, then the evaluation tasks the sweep names.

  python -m experiments.sweep --config=configs/sweeps/state_capacity.py:cpu --workdir=runs/sc
  python -m experiments.sweep --config=configs/sweeps/state_capacity.py:paper --workdir=gs://... \
      --launcher=print        # one command line per run, for a cluster scheduler
  python -m experiments.sweep --config=configs/sweeps/state_capacity.py:copy --workdir=/shared/sc \
      --launcher=ray --ray_address=auto   # the points as Ray tasks on a running Ray cluster
  python -m experiments.report --sweep=runs/sc      # tables, fits and plots -> report.md

Runs go one after another (--launcher=local) or as Ray tasks, concurrently as the cluster's
resources allow (--launcher=ray; without --ray_address a local Ray instance on this machine;
per-point resources from the sweep config's `resources`, docs/sweeps.md). Both are resumable:
a finished run is skipped, a half-finished one resumes from its checkpoint, a failing one is
recorded in its status.json and the sweep continues (exit code 1 at the end if any failed).
--only=name1,name2 restricts the sweep to some runs (names as printed).
"""

import mamba2_jax.host_tuning  # noqa: F401  (first: malloc for XLA on CPU hosts; before numpy/jax)

import sys

from absl import app, flags
from ml_collections import config_flags

from configs.evaluate import get_config as eval_task_config
from experiments import cli
from mamba2_jax.sweep.launch import LAUNCHERS, run_sweep, summary_line

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "configs/sweeps/<sweep>.py:<arg>", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep directory", required=True)
_LAUNCHER = flags.DEFINE_enum("launcher", "local", list(LAUNCHERS), "how to run the runs")
_ONLY = flags.DEFINE_list("only", [], "run only these runs (by name)")
_RAY_ADDRESS = flags.DEFINE_string(
  "ray_address", "", "--launcher=ray: 'auto', HOST:PORT, or empty for a local Ray instance"
)


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/sweeps/<sweep>.py:<arg> is required")
  summary = run_sweep(
    _CONFIG.value,
    _WORKDIR.value,
    task_config=eval_task_config,
    launcher=_LAUNCHER.value,
    only=tuple(_ONLY.value),
    ray_address=_RAY_ADDRESS.value,
  )
  if _LAUNCHER.value in ("local", "ray"):
    print(summary_line(summary))
    if summary["failed"]:
      sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
