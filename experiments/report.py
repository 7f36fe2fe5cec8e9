r"""Aggregate a sweep into a report: runs, T_forget / T_recall per state size, fits, plots.

  python -m experiments.report --sweep=runs/sc [--out=runs/sc/report]

Writes report.md (tables and plots), report.json (every number) and the PNGs; see
mamba2_jax/sweep/report.py for the definitions.
"""

import mamba2_jax.host_tuning  # noqa: F401  (first: malloc for XLA on CPU hosts; before numpy/jax)

from absl import flags

from experiments import cli
from mamba2_jax.sweep.report import write_report

_SWEEP = flags.DEFINE_string(
  "sweep", None, "sweep directory (experiments.sweep --workdir)", required=True
)
_OUT = flags.DEFINE_string("out", None, "output directory (default: SWEEP/report)")


def main(argv):
  del argv
  path = write_report(_SWEEP.value, _OUT.value)
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
