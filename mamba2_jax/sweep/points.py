"""One sweep point as every executing launcher runs it: its commands in subprocesses, each
logged to runs/<name>/logs/<kind>.log, and its outcome in runs/<name>/status.json.

`run_point` is the work of one point for `local` (in the sweep's process, one point after
another) and `ray` (in a Ray task on a worker, mamba2_jax/sweep/ray_launch.py): the same
commands, logs and status.json semantics whichever launcher runs them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = [
  "Point",
  "run_point",
  "point_done",
  "report_end",
  "read_status",
  "write_status",
  "log_tail",
  "CommandFailed",
  "ROOT",
  "shell",
  "run_logged",
]

ROOT = Path(__file__).resolve().parents[2]
_ECHO = ("step ", "train_compile", "{", "Traceback", "Error", "error:")


def shell(cmd: list[str]) -> str:
  return " ".join(shlex.quote(c) for c in cmd)


def read_status(d: Path) -> dict:
  try:
    return json.loads((d / "status.json").read_text())
  except (OSError, ValueError):
    return {}


def write_status(d: Path, **info) -> None:
  d.mkdir(parents=True, exist_ok=True)
  tmp = d / "status.json.tmp"
  tmp.write_text(json.dumps({**info, "time": time.time()}, indent=2))
  os.replace(tmp, d / "status.json")


class CommandFailed(RuntimeError):
  pass


def _pump(stream, log, tail: list[str], echo_prefix: str) -> None:
  """Copies a command's output to its log (echoing the progress lines), keeping the tail."""
  for line in stream:
    log.write(line)
    tail[:] = (tail + [line])[-40:]
    if line.lstrip().startswith(_ECHO):
      print(f"{echo_prefix}{line.rstrip()}", flush=True)


def run_logged(cmd: list[str], log_path: Path, echo_prefix: str) -> None:
  """Runs cmd from the repository root, output to log_path; progress lines are echoed. The
  command runs in a session of its own; an interrupt of this process (Ctrl-C, a cancelled Ray
  task: a KeyboardInterrupt, seen within half a second) stops it with one SIGTERM (the trainer
  saves a checkpoint at the current step) and waits for it before it propagates; a second
  interrupt kills it."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  tail: list[str] = []
  with open(log_path, "a") as log:
    log.write(f"$ {shell(cmd)}\n")
    log.flush()
    p = subprocess.Popen(
      cmd,
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      bufsize=1,
      start_new_session=True,
    )
    reader = threading.Thread(target=_pump, args=(p.stdout, log, tail, echo_prefix), daemon=True)
    reader.start()
    try:
      while True:  # not one blocking wait: an interrupt is seen between the polls
        try:
          rc = p.wait(timeout=0.5)
          break
        except subprocess.TimeoutExpired:
          pass
    except BaseException:
      p.terminate()
      try:
        p.wait(timeout=60)
      except BaseException:  # a second interrupt, or 60 s
        p.kill()
        raise
      finally:
        reader.join(timeout=5)
      raise
    reader.join()
  if rc != 0:
    raise CommandFailed(f"exit code {rc} (log: {log_path}):\n" + "".join(tail[-15:]))


def log_tail(d: Path, lines: int = 15) -> str:
  """The last lines of a point's newest log (for failures the point could not record itself)."""
  logs = sorted((d / "logs").glob("*.log"), key=lambda f: f.stat().st_mtime)
  if not logs:
    return ""
  text = logs[-1].read_text(errors="replace").splitlines()[-lines:]
  return f"(log: {logs[-1]}):\n" + "\n".join(text)


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep as a launcher executes it: its commands and its directory."""

  index: int  # 1-based, in grid order
  total: int
  name: str
  values: tuple  # ((key, value), ...) its grid values
  dir: str  # WORKDIR/runs/<name>
  commands: tuple  # ((kind, argv list), ...): "train", then "eval-<name>" per evaluation

  @property
  def label(self) -> str:
    return f"[{self.index}/{self.total}] {self.name}"

  def describe(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in self.values)


def point_done(point: Point) -> bool:
  return read_status(Path(point.dir)).get("state") == "done"


def run_point(point: Point, run_command: Callable | None = None) -> dict:
  """Runs a point's commands in order, each logged to logs/<kind>.log, and records the outcome
  in its status.json ("running" while it runs, then "done" or "failed" with the failing
  command and the log tail). The work of one point for every executing launcher (local: in the
  sweep's process; ray: in a Ray task on a worker). `run_command(kind, cmd, log_path,
  echo_prefix)` runs one command and raises CommandFailed (default: `run_logged`, a subprocess
  here). Returns the status plus "name"."""
  d, host, t0 = Path(point.dir), socket.gethostname(), time.time()
  base = dict(host=host, started=t0, commands=[shell(c) for _, c in point.commands])
  write_status(d, state="running", **base)
  kind = ""
  try:
    for kind, cmd in point.commands:
      log, prefix = d / "logs" / f"{kind}.log", f"  {point.name} {kind}: "
      if run_command is None:
        run_logged(list(cmd), log, prefix)
      else:
        run_command(kind, list(cmd), log, prefix)
  except CommandFailed as e:
    info = dict(state="failed", failed_command=kind, error=str(e))
  else:
    info = dict(state="done", seconds=time.time() - t0)
  write_status(d, **info, **base)
  return {"name": point.name, **info, **base}


def report_end(point: Point, result: dict, summary: dict) -> None:
  """Prints a point's end line and files it under "done" or "failed" in the summary."""
  host = result.get("host", "")
  on = f" on {host}" if host and host != socket.gethostname() else ""
  if result.get("state") == "done":
    summary["done"].append(point.name)
    print(f"{point.label}: done in {result.get('seconds', 0):.0f} s{on}", flush=True)
  else:
    summary["failed"].append(point.name)
    where = result.get("failed_command") or "its task"
    lines = [x.strip() for x in (result.get("error") or "").splitlines() if x.strip()]
    said = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "") if lines else ""
    print(f"{point.label}: FAILED in {where}{on}: {said}", flush=True)
