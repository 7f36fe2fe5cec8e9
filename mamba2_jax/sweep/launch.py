"""Launching a sweep: each run's training command, then its evaluation commands.

    WORKDIR/sweep.json               the resolved sweep config and its runs
    WORKDIR/runs/<name>/train/       the trainer's workdir (checkpoints, metrics.jsonl, ...)
    WORKDIR/runs/<name>/eval/<eval>/ experiments.evaluate output (step_<N>/results.json, ...)
    WORKDIR/runs/<name>/logs/*.log   every command's output
    WORKDIR/runs/<name>/status.json  {"state": "done" | "failed", "error": ..., "commands"}

Launchers: "local" runs the commands one run after another in subprocesses (a crash or error
in one run is recorded in its status.json and the sweep goes on); a finished run is skipped and
a half-finished one resumes (the trainer restarts from its newest checkpoint; the evaluation
ledger skips steps already evaluated). "print" prints one shell line per run (its commands
joined with &&) for a cluster scheduler; "script" writes runs/<name>/run.sh and WORKDIR/
launch_all.sh.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mamba2_jax.eval import criteria
from mamba2_jax.sweep.grid import CURVE_TASKS, EvalSpec, Run, cli_value, eval_specs, expand, to_json

__all__ = ["train_command", "eval_command", "run_sweep", "LAUNCHERS", "run_dir"]

LAUNCHERS = ("local", "print", "script")
ROOT = Path(__file__).resolve().parents[2]
_ECHO = ("step ", "train_compile", "{", "Traceback", "Error", "error:")


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


def _shell(cmd: list[str]) -> str:
  return " ".join(shlex.quote(c) for c in cmd)


def _status(d: Path) -> dict:
  try:
    return json.loads((d / "status.json").read_text())
  except (OSError, ValueError):
    return {}


def _write_status(d: Path, **info) -> None:
  d.mkdir(parents=True, exist_ok=True)
  tmp = d / "status.json.tmp"
  tmp.write_text(json.dumps({**info, "time": time.time()}, indent=2))
  os.replace(tmp, d / "status.json")


class CommandFailed(RuntimeError):
  pass


def _run_logged(cmd: list[str], log_path: Path, echo_prefix: str) -> None:
  """Runs cmd from the repository root, output to log_path; progress lines are echoed."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  tail: list[str] = []
  with open(log_path, "a") as log:
    log.write(f"$ {_shell(cmd)}\n")
    p = subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    for line in p.stdout:
      log.write(line)
      tail = (tail + [line])[-40:]
      if line.lstrip().startswith(_ECHO):
        print(f"{echo_prefix}{line.rstrip()}", flush=True)
    rc = p.wait()
  if rc != 0:
    raise CommandFailed(f"exit code {rc} (log: {log_path}):\n" + "".join(tail[-15:]))


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
) -> dict:
  """Runs (or prints / scripts) every run of `sweep`; returns {"done", "failed", "skipped"}.
  `task_config(task)` is an evaluation task's default config (configs/evaluate.py:get_config),
  for the checks made before any work."""
  if launcher not in LAUNCHERS:
    raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {launcher!r}")
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
  summary = {"done": [], "failed": [], "skipped": []}
  lines = []
  for i, run in enumerate(runs, 1):
    d = run_dir(workdir, run)
    ckpt = sweep.get("checkpoint") or ""  # evaluation-only sweeps of a fixed checkpoint
    cmds = [] if ckpt else [("train", train_command(sweep, run, workdir, python))]
    cmds += [(f"eval-{e.name}", eval_command(e, run, workdir, python, ckpt)) for e in evals]
    if launcher == "print":
      print(" && ".join(_shell(c) for _, c in cmds))
      continue
    if launcher == "script":
      d.mkdir(parents=True, exist_ok=True)
      script = d / "run.sh"
      script.write_text(
        "#!/usr/bin/env bash\nset -euo pipefail\ncd "
        + shlex.quote(str(ROOT))
        + "\n"
        + "\n".join(_shell(c) for _, c in cmds)
        + "\n"
      )
      script.chmod(0o755)
      lines.append(_shell(["bash", str(script)]))
      continue
    if _status(d).get("state") == "done":
      print(f"[{i}/{len(runs)}] {run.name}: done before, skipped", flush=True)
      summary["skipped"].append(run.name)
      continue
    t0 = time.time()
    print(
      f"[{i}/{len(runs)}] {run.name}: " + ", ".join(f"{k}={v}" for k, v in run.values), flush=True
    )
    try:
      for kind, cmd in cmds:
        _run_logged(cmd, d / "logs" / f"{kind}.log", f"  {run.name} {kind}: ")
    except CommandFailed as e:
      print(f"[{i}/{len(runs)}] {run.name}: FAILED in {kind}: {str(e).splitlines()[0]}", flush=True)
      _write_status(
        d, state="failed", failed_command=kind, error=str(e), commands=[_shell(c) for _, c in cmds]
      )
      summary["failed"].append(run.name)
      continue
    _write_status(d, state="done", seconds=time.time() - t0, commands=[_shell(c) for _, c in cmds])
    summary["done"].append(run.name)
    print(f"[{i}/{len(runs)}] {run.name}: done in {time.time() - t0:.0f} s", flush=True)
  if launcher == "script":
    (workdir / "launch_all.sh").write_text(
      "#!/usr/bin/env bash\n# one line per run; submit "
      "each to your scheduler, or run this file\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {len(lines)} run scripts and {workdir / 'launch_all.sh'}")
  return summary
