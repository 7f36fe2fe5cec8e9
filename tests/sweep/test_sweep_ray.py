"""The ray launcher on a real local Ray instance (2 CPUs, started once for the module), with a
stand-in interpreter for the commands: points run two at a time, each runs exactly the commands
train_command / eval_command build, a failing point is recorded and the others go on, a point
whose worker dies is retried (max_retries) and resumes, a re-run skips what is done, and a TPU
slice point holds its slice (one at a time on a one-slice cluster). The real sweep on Ray,
compared with the local launcher's results: tests/e2e/test_sweep_e2e.py.

Needs Ray (requirements-ray.txt, installed by .ci/run); without it the module skips."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from configs.evaluate import get_config as eval_task_config
from mamba2_jax.sweep.grid import eval_specs, expand
from mamba2_jax.sweep.launch import eval_command, run_sweep, train_command
from tests.sweep.test_sweep import _sweep

ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")

RENDEZVOUS_S = 30.0  # a training command waits this long at most for a second one to start


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
  """One local Ray instance for the module: 2 CPUs (this machine's), a small object store, no
  dashboard; a stand-in "TPU" resource of 4 chips: one single-host v4 2x2x1 slice."""
  ray.init(
    num_cpus=2,
    resources={"TPU": 4},
    object_store_memory=80 * 2**20,
    include_dashboard=False,
  )
  yield
  ray.shutdown()


def _fake_python(
  d: Path, fail_on: str = "", preempt: str = "", rendezvous_s: float = RENDEZVOUS_S
) -> tuple[str, Path]:
  """A stand-in interpreter: logs each command (argv, start/end times, TPU_VISIBLE_CHIPS); a
  training command waits until another one has started too (at most rendezvous_s: so two
  overlap whenever two can run at once, and the test does not depend on start-up times); fails
  (exit 3) for commands containing `fail_on`; the first training command containing `preempt`
  kills its parent, the Ray worker (a lost node)."""
  d.mkdir(parents=True, exist_ok=True)
  log, mark, script = d / "calls.jsonl", d / "preempted", d / "fakepy"
  (d / "started").mkdir()
  script.write_text(f"""#!{sys.executable}
import json, os, signal, sys, time
args, t0 = sys.argv[1:], time.time()
train = "experiments.train" in args
mine = {preempt!r} and any({preempt!r} in a for a in args)
if train and mine and not os.path.exists({str(mark)!r}):
  open({str(mark)!r}, "w").close()
  os.kill(os.getppid(), signal.SIGKILL)
  sys.exit(1)
print("step 1/3 loss 1.0", flush=True)
if train:
  open(os.path.join({str(d / "started")!r}, str(os.getpid())), "w").close()
  while len(os.listdir({str(d / "started")!r})) < 2 and time.time() < t0 + {rendezvous_s}:
    time.sleep(0.05)
  time.sleep(0.2)
with open({str(log)!r}, "a") as f:
  f.write(json.dumps({{"args": args, "start": t0, "end": time.time(),
                      "tpu": os.environ.get("TPU_VISIBLE_CHIPS")}}) + "\\n")
sys.exit(3 if {fail_on!r} and any({fail_on!r} in a for a in args) else 0)
""")
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(script), log


def _calls(log: Path) -> list[dict]:
  return [json.loads(x) for x in open(log)] if log.exists() else []


def _max_overlap(intervals) -> int:
  """The most intervals (start, end) that hold at one moment."""
  events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
  n = best = 0
  for _, step in events:
    n += step
    best = max(best, n)
  return best


def _status(wd: Path, run: str) -> dict:
  return json.loads((wd / "runs" / run / "status.json").read_text())


FAIL, PREEMPT = "d_state-16_seq_len-32", "d_state-8_seq_len-16"
GOOD = ["d_state-8_seq_len-32", "d_state-8_seq_len-16", "d_state-16_seq_len-16"]


def test_points_run_at_once_fail_alone_retry_a_lost_worker_and_resume(tmp_path, capsys):
  sweep = _sweep(max_retries=1)  # 4 points, 1 CPU each (the default resources)
  wd = tmp_path / "sw"
  py, log = _fake_python(tmp_path / "py1", fail_on=FAIL, preempt=PREEMPT)
  out = run_sweep(sweep, wd, task_config=eval_task_config, launcher="ray", python=py)
  assert out["failed"] == [FAIL] and sorted(out["done"]) == sorted(GOOD) and not out["skipped"]

  calls = _calls(log)
  train = [c for c in calls if "experiments.train" in c["args"]]
  # 4 trainings, 1 CPU each on 2 CPUs: two at a time, never more (one at a time: the first
  # waits RENDEZVOUS_S for a second one and ends before it starts)
  assert len(train) == 4 and _max_overlap([(c["start"], c["end"]) for c in train]) == 2

  # each point ran exactly the commands of train_command / eval_command, in order
  by_run = {}
  for c in calls:
    run = next(r for r in GOOD + [FAIL] if any(f"/runs/{r}/" in a for a in c["args"]))
    by_run.setdefault(run, []).append(c["args"])
  resolved = wd.resolve()
  for run in expand(sweep):
    want = [train_command(sweep, run, resolved, py)]
    if run.name != FAIL:  # its evaluations never ran
      want += [eval_command(e, run, resolved, py) for e in eval_specs(sweep)]
    assert by_run[run.name] == [w[1:] for w in want], run.name

  # the failing point: recorded with its command and log tail; the others went on
  st = _status(wd, FAIL)
  assert st["state"] == "failed" and st["failed_command"] == "train"
  assert "exit code 3" in st["error"] and "step 1/3 loss 1.0" in st["error"]
  # the point whose worker was killed: retried by Ray (2 attempts in its log), then done
  assert _status(wd, PREEMPT)["state"] == "done"
  attempts = (wd / "runs" / PREEMPT / "logs" / "train.log").read_text().count("$ ")
  assert attempts == 2

  printed = capsys.readouterr().out
  for run in GOOD + [FAIL]:
    assert f"] {run}: started" in printed, run
  for run in GOOD:
    assert f"] {run}: done in" in printed, run
  assert f"] {FAIL}: FAILED in train: exit code 3" in printed

  # a re-run skips the finished points and re-runs the failed one
  py2, log2 = _fake_python(tmp_path / "py2", rendezvous_s=0)  # one training: no one to meet
  again = run_sweep(sweep, wd, task_config=eval_task_config, launcher="ray", python=py2)
  assert sorted(again["skipped"]) == sorted(GOOD) and again["done"] == [FAIL]
  assert len(_calls(log2)) == 3 and _status(wd, FAIL)["state"] == "done"


def test_tpu_slice_points_hold_their_slice(tmp_path):
  """A single-host v4 2x2x1 slice (4 chips) on the stand-in TPU resource: ray.util.tpu reserves
  it per point, so the two points train one after another (the first training waits 3 s for a
  second one in vain); the training command runs in the slice's host task, the evaluations in
  their own 1-CPU task; a point whose host dies is re-run (max_retries) and finishes."""
  sweep = _sweep(
    grid=(("model.d_state", (8, 16)), ("seq_len", (32,))),
    resources={"tpu_slice": "v4:2x2x1", "eval": {"cpus": 1}},
    max_retries=1,
  )
  lost = "d_state-16_seq_len-32"  # its host is lost once: the point re-runs on a new slice
  py, log = _fake_python(tmp_path / "py", preempt=lost, rendezvous_s=3.0)
  out = run_sweep(sweep, tmp_path / "sl", task_config=eval_task_config, launcher="ray", python=py)
  assert sorted(out["done"]) == ["d_state-16_seq_len-32", "d_state-8_seq_len-32"]
  assert not out["failed"]
  calls = _calls(log)
  train = [c for c in calls if "experiments.train" in c["args"]]
  assert len(train) == 2 and len(calls) == 2 * 3
  assert _max_overlap([(c["start"], c["end"]) for c in train]) == 1
  for c in calls:  # Ray gives the chips to tasks holding TPU resources only
    assert (c["tpu"] is not None) == ("experiments.train" in c["args"]), c
  train_log = tmp_path / "sl" / "runs" / lost / "logs" / "train.log"
  assert train_log.read_text().count("$ ") == 2


@pytest.mark.parametrize(
  "spec, want",
  [
    (None, {"num_cpus": 1.0, "num_gpus": 0.0}),
    ({"cpus": 4, "gpus": 1}, {"num_cpus": 4.0, "num_gpus": 1.0}),
    ({"cpus": 0, "TPU": 4}, {"num_cpus": 0.0, "num_gpus": 0.0, "resources": {"TPU": 4.0}}),
  ],
)
def test_resources_of_a_point(spec, want):
  from mamba2_jax.sweep.ray_launch import parse_resources

  assert parse_resources(spec).task == want


def test_resources_of_a_tpu_slice_and_bad_resources():
  from mamba2_jax.errors import UserError
  from mamba2_jax.sweep.ray_launch import parse_resources

  r = parse_resources({"tpu_slice": "v5e:4x4", "eval": {"cpus": 2, "eval_host": 1}})
  assert r.tpu_slice == ("v5litepod", "4x4")  # Ray's name of v5e
  assert r.eval_task == {"num_cpus": 2.0, "num_gpus": 0.0, "resources": {"eval_host": 1.0}}
  assert parse_resources({"tpu_slice": "v4:2x2x2"}).eval_task["num_cpus"] == 1.0
  for bad, msg in [
    ({"cpus": -1}, "cpus must be a number >= 0"),
    ({"TPU": "four"}, "TPU must be a number >= 0"),
    ({"CPU": 2}, "write cpus, not CPU"),
    ({"eval": {"cpus": 1}}, "only for points on a tpu_slice"),
    ({"tpu_slice": "v4-16"}, "VERSION:TOPOLOGY"),
    ({"tpu_slice": "v4:2x2x2", "cpus": 8}, r"remove \['cpus'\]"),
  ]:
    with pytest.raises(UserError, match=msg):
      parse_resources(bad)
