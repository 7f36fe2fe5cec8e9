"""Launching a sweep: each run's training command, then its evaluation commands.

    WORKDIR/sweep.json               the resolved sweep config and its runs
    WORKDIR/runs/<name>/train/       the trainer's workdir (checkpoints, metrics.jsonl, ...)
    WORKDIR/runs/<name>/eval/<eval>/ experiments.evaluate output (step_<N>/results.json, ...)
    WORKDIR/runs/<name>/logs/*.log   every command's output
    WORKDIR/runs/<name>/status.json  {"state": "running" | "done" | "failed", "error": ...,
                                      "host", "started", "commands"}

Launchers: "local" runs the points one after another in subprocesses; "ray" runs each point as a
Ray task, concurrently as the cluster's resources allow (mamba2_jax/sweep/ray_launch.py). Both
run a point with `run_point` (the same commands, logs and status.json): a crash or error in one
point is recorded in its status.json with the log tail and the sweep goes on; a finished point
is skipped and a half-finished one resumes (the trainer restarts from its newest checkpoint; the
evaluation ledger skips steps already evaluated). "print" prints one shell line per run (its
commands joined with &&) for a cluster scheduler; "script" writes runs/<name>/run.sh and
WORKDIR/launch_all.sh.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from mamba2_jax.eval import criteria
from mamba2_jax.sweep import ray_launch
from mamba2_jax.sweep.grid import CURVE_TASKS, EvalSpec, Run, cli_value, eval_specs, expand, to_json
from mamba2_jax.sweep.points import ROOT, Point, shell, point_done, report_end, run_point

__all__ = ["train_command", "eval_command", "run_sweep", "summary_line", "LAUNCHERS", "run_dir"]

LAUNCHERS = ("local", "ray", "print", "script")


def run_dir(workdir, run: Run) -> Path:
  return Path(workdir) / "runs" / run.name


def train_command(sweep, run: Run, workdir, python=sys.executable) -> list[str]:
  cmd = [
    python,
    "-m",
    "experiments.train",
    f"--config={sweep.train_config}",
    f"--workdir={run_dir(workdir, run) / 'train'}",
  ]
  return cmd + [f"--config.{k}={cli_value(v)}" for k, v in run.overrides]


def eval_command(
  spec: EvalSpec, run: Run, workdir, python=sys.executable, checkpoint: str = ""
) -> list[str]:
  d = run_dir(workdir, run)
  cmd = [
    python,
    "-m",
    "experiments.evaluate",
    f"--checkpoint={checkpoint or d / 'train'}",
    f"--out={d / 'eval' / spec.name}",
    f"--config=configs/evaluate.py:{spec.task}",
    "--mode=latest",
    "--poll_interval_s=1",
  ]
  over = dict(spec.overrides)
  if spec.max_len_factor:
    if run.train_len() is None:
      raise ValueError(
        f"sweep eval {spec.name!r}: max_len_factor needs seq_len in the sweep's "
        "grid or train_overrides"
      )
    over.setdefault("max_len", spec.max_len_factor * run.train_len())
  cmd += [f"--config.{k}={cli_value(v)}" for k, v in over.items()]
  if spec.mitigation:
    cmd.append(f"--config.mitigation={spec.mitigation}")
  return cmd


def _run_local(points: list[Point], summary: dict) -> None:
  for point in points:
    print(f"{point.label}: {point.describe()}", flush=True)
    report_end(point, run_point(point), summary)


def check_collapse_buckets(
  sweep, runs: list[Run], evals: list[EvalSpec], task_config: Callable[[str], Any]
) -> None:
  """Fails before any work if a run's collapse evaluation would have no loss bucket inside its
  training length (the forgetting test's reference; the test would be undetermined).
  `task_config(task)` is the task's default config (configs/evaluate.py:get_config)."""
  name = sweep.get("collapse_eval") or ""
  for spec in evals:
    if spec.task not in CURVE_TASKS or (
      name and spec.name != name and not spec.name.startswith(name + "_")
    ):
      continue
    cfg, over = task_config(spec.task), dict(spec.overrides)
    drop = bool(over.get("drop_first_bucket", cfg.get("drop_first_bucket", False)))
    for run in runs:
      T = over.get("train_len") or run.train_len()
      # 0 = derived from T (criteria.default_bucket_size): always leaves buckets within T
      bucket = criteria.resolve_bucket_size(int(over.get("bucket_size", cfg.bucket_size)), T)
      if T and bucket * (2 if drop else 1) > int(T):
        raise ValueError(
          f"sweep eval {spec.name!r}: bucket_size {bucket}"
          + (" with drop_first_bucket" if drop else "")
          + f" leaves no bucket within the "
          f"training length {T} of run {run.name!r}, so its forgetting test is undetermined; "
          f"set bucket_size <= {int(T) // (2 if drop else 1)}"
        )


def run_sweep(
  sweep,
  workdir,
  *,
  task_config: Callable[[str], Any],
  launcher: str = "local",
  python: str = sys.executable,
  only: tuple[str, ...] = (),
  ray_address: str = "",
) -> dict:
  """Runs (or prints / scripts) every run of `sweep`; returns {"done", "failed", "skipped"}.
  `task_config(task)` is an evaluation task's default config (configs/evaluate.py:get_config),
  for the checks made before any work. `ray_address` (launcher "ray"): "auto", HOST:PORT, or
  "" for a local Ray instance (or the one this process already started)."""
  if launcher not in LAUNCHERS:
    raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {launcher!r}")
  if launcher == "ray":  # before any work: Ray installed, the resources valid
    ray_launch.import_ray()
    ray_launch.parse_resources(sweep.get("resources"))
  workdir = Path(workdir).resolve()
  runs = [r for r in expand(sweep) if not only or r.name in only]
  evals = eval_specs(sweep)
  check_collapse_buckets(sweep, runs, evals, task_config)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "sweep.json").write_text(
    json.dumps(
      {"sweep": json.loads(sweep.to_json_best_effort()), "runs": json.loads(to_json(runs))},
      indent=2,
    )
  )
  ckpt = sweep.get("checkpoint") or ""  # evaluation-only sweeps of a fixed checkpoint
  points = []
  for i, run in enumerate(runs, 1):
    cmds = [] if ckpt else [("train", train_command(sweep, run, workdir, python))]
    cmds += [(f"eval-{e.name}", eval_command(e, run, workdir, python, ckpt)) for e in evals]
    points.append(
      Point(i, len(runs), run.name, run.values, str(run_dir(workdir, run)), tuple(cmds))
    )
  if launcher == "print":
    for point in points:
      print(" && ".join(shell(c) for _, c in point.commands))
    return {"done": [], "failed": [], "skipped": []}
  if launcher == "script":
    lines = []
    for point in points:
      d = Path(point.dir)
      d.mkdir(parents=True, exist_ok=True)
      script = d / "run.sh"
      script.write_text(
        "#!/usr/bin/env bash\nset -euo pipefail\ncd "
        + shlex.quote(str(ROOT))
        + "\n"
        + "\n".join(shell(c) for _, c in point.commands)
        + "\n"
      )
      script.chmod(0o755)
      lines.append(shell(["bash", str(script)]))
    (workdir / "launch_all.sh").write_text(
      "#!/usr/bin/env bash\n# one line per run; submit "
      "each to your scheduler, or run this file\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {len(lines)} run scripts and {workdir / 'launch_all.sh'}")
    return {"done": [], "failed": [], "skipped": []}
  summary = {"done": [], "failed": [], "skipped": []}
  todo = []
  for point in points:
    if point_done(point):
      print(f"{point.label}: done before, skipped", flush=True)
      summary["skipped"].append(point.name)
    else:
      todo.append(point)
  if launcher == "local":
    _run_local(todo, summary)
  else:
    ray_launch.run(todo, summary, sweep, address=ray_address)
  return summary


def summary_line(summary: dict) -> str:
  """The sweep's last line: how many points are done, were done before, failed (named)."""
  failed = summary["failed"]
  return (
    f"sweep: {len(summary['done'])} done, {len(summary['skipped'])} skipped (done "
    f"before), {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
  )
