"""The `ray` launcher: every sweep point is a Ray task, run as the cluster's resources allow.

A point's task runs `points.run_point` on a worker, the same function the `local` launcher runs
in its own process: the same commands (train_command / eval_command, run as subprocesses from
the worker's checkout), logs and status.json. The workdir must therefore be a path every node
sees (a shared file system), and the checkout and interpreter must sit at the same paths on
every node, as on TPU VMs set up by one script.

Per-point resources come from the sweep config's optional `resources`:
  cpus, gpus          Ray's CPU / GPU counts for the point's task (default 1 CPU, 0 GPU); Ray
                      sets CUDA_VISIBLE_DEVICES for the commands of a task with GPUs
  any other name      a custom resource, e.g. "TPU": 4 (one single-host TPU VM's chips) or a
                      resource a node was started with (`ray start --resources=...`)
  tpu_slice           "VERSION:TOPOLOGY" (e.g. "v4:2x2x2", "v5e:4x4", "v6e:4x8"): a whole
                      multi-host TPU slice per point, reserved by ray.util.tpu's
                      slice_placement_group (Ray gang-schedules it: the slice's
                      TPU-<type>-head resource, held by its host 0, and the node label
                      ray.io/tpu-slice-name pick one slice; one placement-group bundle per
                      host). The training command runs on every host at once (JAX finds its
                      peers on TPU VMs; host i > 0 logs to logs/train.host<i>.log). Then the
                      slice is released and the evaluation commands (single-process programs)
                      run in a task of their own with the resources of `eval` (default 1 CPU;
                      {"TPU": 1} runs them on one chip of any TPU host: for tasks of 1 or 2
                      chips Ray sets the sub-host bounds, a single-host process)
  eval                only with tpu_slice: the resources of its evaluation task
and its optional `max_retries` (default 3): how often Ray re-runs a point whose worker or node
died (a preempted VM; on a slice: any of its hosts, and the point re-runs on a slice reserved
afresh); the re-run resumes from the newest checkpoint and skips evaluations already done. A
command that fails is not retried: it is recorded in status.json, as `local` does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

from mamba2_jax.errors import InvalidInput, UserError
from mamba2_jax.sweep.points import (
  ROOT,
  CommandFailed,
  Point,
  run_logged,
  log_tail,
  read_status,
  report_end,
  run_point,
  write_status,
)

__all__ = ["run", "parse_resources", "import_ray", "INSTALL_HINT", "Resources"]

INSTALL_HINT = (
  "--launcher=ray needs Ray, an optional dependency: install it with "
  "`.venv/bin/pip install -r requirements-ray.txt` (or `bash scripts/setup_ray.sh`)"
)
DEFAULT_MAX_RETRIES = 3
_STOP_TIMEOUT_S = 90  # Ctrl-C: how long the points' commands get to stop (run_point waits 60 s)
_VERSIONS = {"v5e": "v5litepod"}  # Ray's name of the v5e generation
_TOPOLOGY = re.compile(r"^\d+x\d+(x\d+)?$")


class RayNotInstalled(UserError):
  pass


def import_ray():
  """The `ray` module, or a UserError that says how to install it."""
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RayNotInstalled(INSTALL_HINT) from e
  return ray


@dataclasses.dataclass(frozen=True)
class Resources:
  """A point's Ray resources: options of its task, or a TPU slice (and its evaluation task)."""

  task: dict  # .options() of the point's task: num_cpus, num_gpus, resources
  tpu_slice: tuple = ()  # (accelerator version, topology)
  eval_task: dict = dataclasses.field(default_factory=dict)

  def describe(self) -> str:
    if self.tpu_slice:
      return f"a TPU slice {self.tpu_slice[0]}:{self.tpu_slice[1]} (evaluations: " + (
        _describe(self.eval_task) + ")"
      )
    return _describe(self.task)


def _describe(opts: dict) -> str:
  parts = [f"{opts.get('num_cpus', 0):g} CPU"]
  if opts.get("num_gpus"):
    parts.append(f"{opts['num_gpus']:g} GPU")
  parts += [f"{v:g} {k}" for k, v in opts.get("resources", {}).items()]
  return ", ".join(parts)


def _amount(key: str, v) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
    raise InvalidInput(f"sweep resources: {key} must be a number >= 0, got {v!r}")
  return float(v)


def _task_options(spec: dict, where: str) -> dict:
  spec = dict(spec)
  opts = {
    "num_cpus": _amount(f"{where}cpus", spec.pop("cpus", 1)),
    "num_gpus": _amount(f"{where}gpus", spec.pop("gpus", 0)),
  }
  for k in ("CPU", "GPU"):
    if k in spec:
      raise InvalidInput(f"sweep resources: write {where}{k.lower()}s, not {where}{k}")
  custom = {str(k): _amount(f"{where}{k}", v) for k, v in spec.items()}
  if custom:
    opts["resources"] = custom
  return opts


def parse_resources(spec) -> Resources:
  """The sweep config's `resources` (a dict or ConfigDict; None: 1 CPU per point), checked."""
  if spec is None:
    spec = {}
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  slice_spec = str(spec.pop("tpu_slice", "") or "")
  ev = spec.pop("eval", None)
  if not slice_spec:
    if ev is not None:
      raise InvalidInput("sweep resources: `eval` is only for points on a tpu_slice")
    return Resources(task=_task_options(spec, ""))
  version, _, topology = slice_spec.partition(":")
  version = _VERSIONS.get(version.lower(), version.lower())
  if not _TOPOLOGY.match(topology):
    raise InvalidInput(
      f"sweep resources: tpu_slice must be VERSION:TOPOLOGY (e.g. 'v4:2x2x2', 'v5e:4x4'), "
      f"got {slice_spec!r}"
    )
  if spec:
    raise InvalidInput(
      f"sweep resources: a tpu_slice point takes the slice's hosts; remove {sorted(spec)} "
      "(the evaluation task's resources go in `eval`)"
    )
  ev = dict(ev.to_dict() if hasattr(ev, "to_dict") else ev or {})
  return Resources(task={}, tpu_slice=(version, topology), eval_task=_task_options(ev, "eval."))


# ------------------------------------------------------------------------- on the workers
def _point_task(point: Point) -> dict:
  return run_point(point)


def _host_command(cmd: list[str], log_path: str, echo_prefix: str) -> str:
  """One command on one host; returns its error ("" when it succeeded)."""
  try:
    run_logged(cmd, Path(log_path), echo_prefix)
  except CommandFailed as e:
    return str(e)
  return ""


class SliceLost(RuntimeError):
  """A host of a point's TPU slice was lost (preempted): the whole point is re-run by Ray on a
  slice reserved afresh (a multi-host program cannot go on without one of its hosts)."""


def _slice_point_task(point: Point, res: Resources, max_retries: int) -> dict:
  """A point on a TPU slice, through `run_point`: reserves a slice (waiting for a free one),
  runs the training command on every host of it at once, releases it, then runs the
  evaluations in a task of their own (resources `eval`)."""
  import ray  # pylint: disable=g-import-not-at-top
  from ray.util import tpu  # pylint: disable=g-import-not-at-top
  from ray.util.scheduling_strategies import (  # pylint: disable=g-import-not-at-top
    PlacementGroupSchedulingStrategy,
  )

  version, topology = res.tpu_slice
  host = ray.remote(_host_command)
  handle = None

  def on_slice(cmd, log, prefix) -> list[str]:
    nonlocal handle
    handle = tpu.slice_placement_group(topology, version, head_reservation_timeout_s=None)
    ray.get(handle.placement_group.ready())
    bundle = {k: v for k, v in handle.bundle_resources.items() if k != "CPU"}
    refs = [
      host.options(
        max_retries=0,  # a lost host re-runs the whole point (SliceLost)
        num_cpus=0,
        resources=bundle,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
          placement_group=handle.placement_group, placement_group_bundle_index=i
        ),
      ).remote(cmd, str(log if i == 0 else log.with_name(f"{log.stem}.host{i}.log")), prefix)
      for i in range(handle.num_bundles)
    ]
    errors, lost = [], []
    for ref in refs:  # all of them: a lost host outranks the errors of the hosts it left
      try:
        errors.append(ray.get(ref))
      except ray.exceptions.RayError as e:
        lost.append(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}")
    handle.shutdown()
    handle = None
    if lost:
      raise SliceLost(f"a host of the {version}:{topology} slice was lost: {lost[0]}")
    return [e for e in errors if e]

  def run_command(kind, cmd, log, prefix):
    if kind == "train":
      errors = on_slice(cmd, log, prefix)
    else:
      try:
        opts = dict(res.eval_task, max_retries=max_retries)
        errors = [ray.get(host.options(**opts).remote(cmd, str(log), prefix))]
      except ray.exceptions.RayError as e:  # its worker lost more often than max_retries
        errors = [f"{type(e).__name__}: {e}"]
    errors = [e for e in errors if e]
    if errors:
      raise CommandFailed(errors[0])

  try:
    return run_point(point, run_command)
  finally:
    if handle is not None:
      handle.shutdown()


# ------------------------------------------------------------------------- on the driver
def _start_line(point: Point, status: dict, again: bool) -> str:
  verb = "started again (its worker was lost)" if again else "started"
  return f"{point.label}: {verb} on {status.get('host', '?')}: {point.describe()}"


def _lost(point: Point, err: Exception, retries: int) -> dict:
  """Records a point whose Ray task failed for good in its status.json: its worker or node was
  lost more often than max_retries (a preempted VM), or an error outside its commands."""
  d = Path(point.dir)
  last = (str(err).strip().splitlines() or [""])[-1]
  if isinstance(err, _ray_exceptions().RayTaskError):
    what = f"error in the point's Ray task: {last}"
  else:
    what = f"{type(err).__name__} after {retries} retries: {last}"
  old = read_status(d)
  base = dict(host=old.get("host", ""), started=old.get("started"), commands=old.get("commands"))
  info = dict(state="failed", failed_command="ray task", error=f"{what}\n{log_tail(d)}")
  write_status(d, **info, **base)
  return {"name": point.name, **info, **base}


def _ray_exceptions():
  import ray.exceptions  # pylint: disable=g-import-not-at-top

  return ray.exceptions


def run(points: list[Point], summary: dict, sweep, *, address: str = "") -> None:
  """Runs `points` as Ray tasks on the cluster at `address` ("auto", HOST:PORT; "" = a new
  local instance), or on the Ray instance this process already started; prints a line as each
  starts and ends and files each under summary["done"] / ["failed"]."""
  ray = import_ray()
  res = parse_resources(sweep.get("resources"))
  retries = int(sweep.get("max_retries", DEFAULT_MAX_RETRIES))
  if not points:
    return
  own = not ray.is_initialized()
  if own:
    ray.init(address=address or "local", include_dashboard=False)
  try:
    _run(ray, points, summary, res, retries)
  finally:
    if own:
      ray.shutdown()


def _worker_env() -> dict:
  """The workers import this checkout (the driver's; the same path on every node), also where
  the interpreter has another one installed."""
  path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  return {"env_vars": {"PYTHONPATH": os.pathsep.join(path)}}


def _run(ray, points, summary, res: Resources, retries: int) -> None:
  env = _worker_env()
  if res.tpu_slice:
    task = ray.remote(_slice_point_task).options(
      num_cpus=0, max_retries=retries, retry_exceptions=[SliceLost], runtime_env=env
    )
    submit = lambda p: task.remote(p, res, retries)  # noqa: E731
  else:
    task = ray.remote(_point_task).options(**res.task, max_retries=retries, runtime_env=env)
    submit = task.remote
  t0 = time.time()
  pending = {submit(p): p for p in points}
  total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "TPU")}
  print(
    f"ray: {len(points)} points submitted, each needs {res.describe()}; cluster: "
    + ", ".join(f"{v:g} {k}" for k, v in sorted(total.items())),
    flush=True,
  )
  seen: dict[str, float] = {}

  def announce(point, status):
    started = status.get("started")
    if status.get("host") and started and started >= t0 and seen.get(point.name) != started:
      print(_start_line(point, status, point.name in seen), flush=True)
      seen[point.name] = started

  try:
    while pending:
      ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
      for ref, point in pending.items():
        if ref not in ready:
          st = read_status(Path(point.dir))
          if st.get("state") == "running":
            announce(point, st)
      for ref in ready:
        point = pending.pop(ref)
        try:
          result = ray.get(ref)
        except ray.exceptions.RayError as e:
          result = _lost(point, e, retries)
        announce(point, result)
        report_end(point, result, summary)
  except KeyboardInterrupt:
    # the tasks stop their commands with SIGTERM (the trainer saves a checkpoint); wait for
    # that before Ray goes down (a second Ctrl-C stops waiting)
    print(f"interrupted: stopping {len(pending)} points", flush=True)
    for ref in pending:
      ray.cancel(ref)
    ray.wait(list(pending), num_returns=len(pending), timeout=_STOP_TIMEOUT_S)
    raise
