"""Sweep machinery: grid expansion, commands, launchers, resume/skip and failure isolation, and
the state-capacity estimates and fits on data with known answers."""

from __future__ import annotations

import json
import os
import stat
import sys

import ml_collections
import numpy as np
import pytest

from mamba2_jax.sweep import capacity
from mamba2_jax.sweep.grid import eval_specs, expand
from configs.evaluate import get_config as eval_task_config
from mamba2_jax.sweep.launch import check_collapse_buckets, eval_command, run_sweep, train_command


def _sweep(**kw):
  c = ml_collections.ConfigDict()
  c.train_config = "configs/train.py:tiny"
  c.train_overrides = (("total_steps", 3), ("data.source", "builtin:shakespeare"))
  c.grid = (("model.d_state", (8, 16)), (("seq_len", "tbptt_segments"), ((32, 1), (16, 4))))
  c.tokens_per_step = 256
  c.evals = ml_collections.ConfigDict(
    {
      "ppl": {"task": "ppl_by_position", "max_len_factor": 8, "overrides": (("bucket_size", 16),)},
      "pk": {"task": "passkey", "mitigation": "rri", "overrides": (("lengths", (64, 128)),)},
    }
  )
  for k, v in kw.items():
    c[k] = v
  return c


def test_grid_expansion_product_zip_and_derived_batch():
  runs = expand(_sweep())
  assert [r.name for r in runs] == [
    "d_state-8_seq_len-32",
    "d_state-8_seq_len-16",
    "d_state-16_seq_len-32",
    "d_state-16_seq_len-16",
  ]
  r = runs[1]
  over = dict(r.overrides)
  assert over["model.d_state"] == 8 and over["seq_len"] == 16 and over["tbptt_segments"] == 4
  assert over["total_steps"] == 3 and over["global_batch_size"] == 256 // (16 * 4)
  assert dict(r.values) == {"model.d_state": 8, "seq_len": 16, "tbptt_segments": 4}


def test_collapse_eval_needs_a_bucket_within_every_training_length(tmp_path):
  sweep = _sweep(collapse_eval="ppl")
  sweep.evals.ppl.overrides = (("bucket_size", 32),)  # first bucket dropped: [32, 64) > T = 32
  with pytest.raises(
    ValueError,
    match=r"sweep eval 'ppl': bucket_size 32 with drop_first_bucket "
    r"leaves no bucket within the training length 32 of run "
    r"'d_state-8_seq_len-32'.*set bucket_size <= 16",
  ):
    run_sweep(sweep, tmp_path / "sw", task_config=eval_task_config, launcher="print")
  assert not (tmp_path / "sw").exists()  # nothing started
  sweep.evals.ppl.overrides = ()  # the default bucket_size 0: derived from each run's T
  run_sweep(sweep, tmp_path / "sw", task_config=eval_task_config, launcher="print")


@pytest.mark.parametrize(
  "config",
  [
    "demo.py:cpu",
    "demo.py:quick",
    "demo.py:full",
    "state_capacity.py:copy",
    "state_capacity.py:text",
    "state_capacity.py:ci",
    "state_capacity.py:paper",
  ],
)
def test_shipped_sweeps_expand_and_resolve_their_forgetting_test(config):
  import importlib.util  # pylint: disable=g-import-not-at-top

  path, arg = config.split(":")
  spec = importlib.util.spec_from_file_location("sweep_cfg", f"configs/sweeps/{path}")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  sweep = mod.get_config(arg)
  runs, evals = expand(sweep), eval_specs(sweep)
  assert runs and evals
  check_collapse_buckets(sweep, runs, evals, eval_task_config)


def test_grid_errors():
  with pytest.raises(ValueError, match="zipped axis .* needs 2 values"):
    expand(_sweep(grid=((("seq_len", "tbptt_segments"), ((32,),)),)))
  with pytest.raises(ValueError, match="two runs would be named"):
    expand(_sweep(grid=(("seq_len", (32, 32)),)))
  with pytest.raises(ValueError, match="has 2 values but 1 labels"):
    expand(_sweep(grid=((("seq_len", "tbptt_segments"), ((32, 1), (16, 2)), ("a",)),)))


def test_run_names_from_distinct_keys_or_labels():
  # no key alone distinguishes the entries: every differing key names the run
  runs = expand(_sweep(grid=((("seq_len", "tbptt_segments"), ((32, 1), (32, 2), (16, 2))),)))
  assert [r.name for r in runs] == [
    "seq_len-32_tbptt_segments-1",
    "seq_len-32_tbptt_segments-2",
    "seq_len-16_tbptt_segments-2",
  ]
  runs = expand(
    _sweep(
      grid=(
        (("model.d_model", "model.n_layer"), ((64, 2), (64, 4)), ("small", "deep")),
        ("seq_len", (32,)),
      )
    )
  )
  assert [r.name for r in runs] == ["small_seq_len-32", "deep_seq_len-32"]


def test_eval_specs_and_commands(tmp_path):
  s = _sweep(eval_grid=(("mitigation", ("", "rri")), ("max_len_factor", (4, 16))))
  specs = eval_specs(s)
  names = [e.name for e in specs if e.task == "ppl_by_position"]
  assert len(specs) == 8 and names == [
    "ppl_mitigation-none_max_len_factor-4",
    "ppl_mitigation-none_max_len_factor-16",
    "ppl_mitigation-rri_max_len_factor-4",
    "ppl_mitigation-rri_max_len_factor-16",
  ]
  run = expand(s)[1]  # seq_len 16 x 4 segments: training length 64
  cmd = eval_command([e for e in specs if e.name == names[3]][0], run, tmp_path, python="py")
  assert "--config.max_len=1024" in cmd and "--config.mitigation=rri" in cmd
  assert "--config.bucket_size=16" in cmd and "--config=configs/evaluate.py:ppl_by_position" in cmd
  assert f"--checkpoint={tmp_path / 'runs' / run.name / 'train'}" in cmd
  tc = train_command(s, run, tmp_path, python="py")
  assert tc[:4] == ["py", "-m", "experiments.train", "--config=configs/train.py:tiny"]
  assert "--config.tbptt_segments=4" in tc and "--config.global_batch_size=4" in tc
  pk = [e for e in eval_specs(_sweep()) if e.name == "pk"][0]
  assert "--config.lengths=(64,128)" in eval_command(pk, run, tmp_path, python="py")


def _fake_python(tmp_path, fail_on=""):
  """A stand-in interpreter: logs its arguments; fails for commands containing `fail_on`."""
  log = tmp_path / "calls.jsonl"
  script = tmp_path / "fakepy"
  script.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
  f.write(json.dumps(args) + "\\n")
print("step 1/3 loss 1.0")
sys.exit(3 if {fail_on!r} and any({fail_on!r} in a for a in args) else 0)
""")
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(script), log


def _calls(log):
  return [json.loads(x) for x in open(log)] if os.path.exists(log) else []


def test_local_launcher_runs_skips_done_and_records_failures(tmp_path, capsys):
  py, log = _fake_python(tmp_path, fail_on="d_state-16_seq_len-32")
  s = _sweep()
  out = run_sweep(s, tmp_path / "sw", task_config=eval_task_config, python=py)
  assert out["failed"] == ["d_state-16_seq_len-32"]
  assert len(out["done"]) == 3
  calls = _calls(log)
  # 3 good runs x (train + 2 evals) + the failing run's train command only
  assert len(calls) == 3 * 3 + 1
  st = json.load(open(tmp_path / "sw" / "runs" / "d_state-16_seq_len-32" / "status.json"))
  assert (
    st["state"] == "failed" and st["failed_command"] == "train" and "exit code 3" in st["error"]
  )
  assert (tmp_path / "sw" / "runs" / "d_state-8_seq_len-32" / "logs" / "train.log").exists()
  assert "step 1/3 loss 1.0" in capsys.readouterr().out  # progress is echoed
  # second invocation: done runs are skipped, the failed one is retried
  py2, log2 = _fake_python(tmp_path / "again" if (tmp_path / "again").mkdir() is None else tmp_path)
  out = run_sweep(s, tmp_path / "sw", task_config=eval_task_config, python=py2)
  assert sorted(out["skipped"]) == sorted(
    ["d_state-8_seq_len-32", "d_state-8_seq_len-16", "d_state-16_seq_len-16"]
  )
  assert out["done"] == ["d_state-16_seq_len-32"]
  assert len(_calls(log2)) == 3
  sweep_json = json.load(open(tmp_path / "sw" / "sweep.json"))
  assert len(sweep_json["runs"]) == 4


def test_print_and_script_launchers(tmp_path, capsys):
  s = _sweep()
  run_sweep(s, tmp_path / "p", task_config=eval_task_config, launcher="print", python="py")
  lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("py ")]
  assert len(lines) == 4 and all(line.count(" && ") == 2 for line in lines)
  run_sweep(s, tmp_path / "s", task_config=eval_task_config, launcher="script", python="py")
  launch = (tmp_path / "s" / "launch_all.sh").read_text()
  assert launch.count("run.sh") == 4
  script = (tmp_path / "s" / "runs" / "d_state-8_seq_len-16" / "run.sh").read_text()
  assert "experiments.train" in script and script.count("experiments.evaluate") == 2


def test_evaluation_only_sweep_of_a_checkpoint(tmp_path):
  s = _sweep(checkpoint="ckpts/mamba2-130m", grid=(("model.d_state", (8,)),), tokens_per_step=0)
  py, log = _fake_python(tmp_path)
  with pytest.raises(ValueError, match="max_len_factor needs seq_len"):
    run_sweep(s, tmp_path / "e", task_config=eval_task_config, python=py)
  s.evals.ppl.max_len_factor = 0
  run_sweep(s, tmp_path / "e", task_config=eval_task_config, python=py)
  calls = _calls(log)
  assert len(calls) == 2 and all("experiments.evaluate" in c for c in calls)
  assert all("--checkpoint=ckpts/mamba2-130m" in c for c in calls)


# ---------------------------------------------------------------------------- capacity
def test_t_forget_is_the_smallest_length_from_which_all_pass():
  pts = [
    (1e3, 64, False),
    (1e3, 128, True),
    (1e3, 256, True),
    (2e3, 64, True),
    (2e3, 128, False),
    (2e3, 256, True),
    (2e3, 512, True),
    (3e3, 64, False),
    (3e3, 128, False),
  ]
  assert capacity.t_forget(pts) == {1e3: 128, 2e3: 256, 3e3: None}


def test_runs_that_never_learned_are_neither_passes_nor_collapses():
  chance = float(np.log(259))
  at_chance = {"forget_test_passed": True, "mean_loss_within_train": 5.75, "chance_loss": chance}
  # results written before "learned" existed: judged from the chance level they record
  assert capacity.collapse_verdict(at_chance) == ("not learned", False)
  new = {"forget_verdict": "not learned", "forget_test_passed": None, "learned": False}
  assert capacity.collapse_verdict(new) == ("not learned", False)
  good = {"forget_test_passed": False, "copy_loss_within_train": 0.2, "chance_loss": 4.13}
  assert capacity.collapse_verdict(good) == ("fail", True)
  assert capacity.collapse_verdict(good, learned_max_loss=0.1) == ("not learned", False)
  assert capacity.collapse_verdict({"forget_test_passed": True}) == ("pass", None)  # no chance
  assert capacity.collapse_verdict(None) == ("n/a", None)
  # a None (not learned) between a collapse and a pass neither breaks nor makes a bracket
  pts = [(1e3, 64, False), (1e3, 128, None), (1e3, 256, True), (2e3, 64, None)]
  assert capacity.t_forget(pts) == {1e3: 256, 2e3: None}
  assert capacity.t_forget_bounds(pts) == {1e3: (64, 256), 2e3: (None, None)}


def test_t_recall_is_the_best_run_per_state_size():
  pts = [(1e3, 64, None), (1e3, 128, 512), (2e3, 64, 1024), (2e3, 256, 256), (3e3, 64, None)]
  assert capacity.t_recall(pts) == {1e3: 512, 2e3: 1024, 3e3: None}


def test_linear_fit_recovers_the_paper_law():
  ns = np.array([0.8, 1.6, 2.4, 4.8, 12.9])
  rng = np.random.default_rng(0)
  y = 5.172 * ns - 4.469 + rng.normal(0, 0.05, ns.size)
  f = capacity.fit_linear(ns, y)
  assert abs(f.params["a"] - 5.172) < 0.05 and abs(f.params["b"] + 4.469) < 0.2
  assert f.r2 > 0.999 and f.n == 5
  assert f.formula().startswith("5.1") and "−" in f.formula()


@pytest.mark.parametrize("scale", [1.0, 1e6])  # paper units (M scalars) and raw scalars
def test_exponential_fit_recovers_the_paper_law(scale):
  ns = np.array([0.8, 1.6, 2.4, 4.8, 7.0, 12.9])
  y = 4.756 * (1.365**ns - 1) - 0.742
  f = capacity.fit_exponential(ns * scale, y)
  assert f is not None and f.r2 > 0.9999
  assert abs(f.params["a"] - 4.756) / 4.756 < 1e-3
  assert abs(f.params["base"] ** scale - 1.365) < 1e-3
  np.testing.assert_allclose(f.predict(ns * scale), y, rtol=1e-4, atol=1e-3)


def test_fits_need_enough_points():
  assert capacity.fit_linear([1.0], [2.0]) is None
  assert capacity.fit_exponential([1.0, 2.0], [2.0, 3.0]) is None
  assert "exact" in capacity.fit_linear([1.0, 2.0], [2.0, 3.0]).note


def test_report_recovers_known_capacity_laws(tmp_path):
  """A sweep directory whose runs follow T_forget = 2 N_S/1000 + 64 and T_recall = 3·(1.5^x - 1)
  (x = N_S/1000): the report extracts T_forget from the bucketed loss curves' forgetting test
  and refits both laws."""
  from mamba2_jax.config import Mamba2Config
  from mamba2_jax.eval import criteria
  from mamba2_jax.sweep.report import write_report

  wd = tmp_path / "sw"
  runs, lengths = [], (64, 128, 256, 512, 1024)
  for d_state in (16, 48, 80, 112):
    mc = Mamba2Config.preset("tiny", d_state=d_state)
    ns = mc.state_size
    t_forget = 2 * ns / 1000 + 64
    t_recall = 3 * (1.5 ** (ns / 1000) - 1)
    for T in lengths:
      name = f"d{d_state}_T{T}"
      runs.append(
        {"name": name, "values": {"model.d_state": d_state, "seq_len": T}, "overrides": {}}
      )
      d = wd / "runs" / name
      (d / "train").mkdir(parents=True)
      (d / "train" / "config.json").write_text(
        json.dumps({"seq_len": T, "tbptt_segments": 1, "model": json.loads(mc.to_json())})
      )
      (d / "status.json").write_text(json.dumps({"state": "done"}))
      # a loss curve that blows up past T unless T >= T_forget
      pos = np.arange(0, 8192, 64)
      loss = np.full(pos.size, 2.0)
      if T < t_forget:
        loss[pos >= T] = 6.0
      b = criteria.Buckets(pos, pos + 64, loss)
      test = criteria.forgetting_test(b, T, 2.0)
      for ev, res in (
        (
          "ppl",
          {
            "task": "ppl_by_position",
            "summary": {
              "forget_test_passed": test["passed"],
              "first_fail_position": test["first_fail_position"],
            },
            "buckets": {"start": pos.tolist(), "end": (pos + 64).tolist(), "loss": loss.tolist()},
          },
        ),
        ("passkey", {"task": "passkey", "summary": {"t_recall": t_recall}}),
      ):
        (d / "eval" / ev / "step_10").mkdir(parents=True)
        (d / "eval" / ev / "step_10" / "results.json").write_text(json.dumps(res))
  sweep = {
    "name": "synthetic",
    "evals": {"ppl": {"task": "ppl_by_position"}, "passkey": {"task": "passkey"}},
  }
  (wd / "sweep.json").write_text(json.dumps({"sweep": sweep, "runs": runs}))
  md = write_report(wd).read_text()
  rep = json.load(open(wd / "report" / "report.json"))
  for d_state in (16, 48, 80, 112):
    ns = Mamba2Config.preset("tiny", d_state=d_state).state_size
    want = min(t for t in lengths if t >= 2 * ns / 1000 + 64)
    assert rep["t_forget"][str(ns)] == want
  fr = rep["fit_t_recall"]
  assert fr["r2"] > 0.9999 and abs(fr["params"]["a"] - 3) < 1e-2
  assert abs(fr["params"]["base"] ** 1000 - 1.5) < 1e-3
  assert rep["fit_t_forget"]["params"]["a"] > 0 and "T_forget = a·N_S + b: **" in md
  assert (wd / "report" / "t_recall_fit.png").exists()


def test_t_forget_bounds_bracket_or_bound_from_above():
  pts = [
    (1e3, 64, False),
    (1e3, 128, True),
    (1e3, 256, True),  # (64, 128]
    (2e3, 256, True),
    (2e3, 512, True),  # <= 256: nothing shorter ran
    (3e3, 64, False),
    (3e3, 128, False),
  ]  # never
  assert capacity.t_forget_bounds(pts) == {1e3: (64, 128), 2e3: (None, 256), 3e3: (None, None)}


def test_report_says_not_learned_for_runs_at_chance(tmp_path):
  """Issue 14 item 3: a run whose loss within T is at chance "passes" the raw forgetting test;
  the report must say "not learned" and leave it out of T_forget, with or without the sweep's
  learned_max_loss."""
  from mamba2_jax.config import Mamba2Config
  from mamba2_jax.eval import criteria
  from mamba2_jax.sweep.report import write_report

  wd, runs = tmp_path / "sw", []
  mc = Mamba2Config.preset("tiny", d_state=16)
  chance = float(np.log(259))
  pos = np.arange(0, 4096, 64)
  for T, level, spike in ((64, 2.0, 6.0), (128, chance + 0.2, 0.0), (256, 2.0, 0.0)):
    name = f"T{T}"
    runs.append({"name": name, "values": {"seq_len": T}, "overrides": {}})
    d = wd / "runs" / name
    (d / "train").mkdir(parents=True)
    (d / "train" / "config.json").write_text(
      json.dumps({"seq_len": T, "tbptt_segments": 1, "model": json.loads(mc.to_json())})
    )
    loss = np.full(pos.size, level)
    loss[pos >= T] += spike
    test = criteria.forgetting_test(criteria.Buckets(pos, pos + 64, loss), T, 2.0, chance)
    res = {
      "task": "ppl_by_position",
      "summary": {
        "forget_verdict": test["verdict"],
        "forget_test_passed": test["passed"],
        "learned": test["learned"],
        "chance_loss": chance,
        "first_fail_position": test["first_fail_position"],
        "mean_loss_within_train": test["loss_within_train"],
      },
      "buckets": {"start": pos.tolist(), "end": (pos + 64).tolist(), "loss": loss.tolist()},
    }
    (d / "eval" / "ppl" / "step_3").mkdir(parents=True)
    (d / "eval" / "ppl" / "step_3" / "results.json").write_text(json.dumps(res))
  sweep = {"name": "chance", "evals": {"ppl": {"task": "ppl_by_position"}}}
  (wd / "sweep.json").write_text(json.dumps({"sweep": sweep, "runs": runs}))
  md = write_report(wd).read_text()
  rep = json.load(open(wd / "report" / "report.json"))
  assert [r["verdict"] for r in rep["runs"]] == ["fail", "not learned", "pass"]
  assert [r["learned"] for r in rep["runs"]] == [True, False, True]
  row = next(l for l in md.splitlines() if l.startswith("| T128 |"))
  assert "| not learned |" in row and "| yes |" not in row
  ns = str(mc.state_size)
  assert rep["t_forget"] == {ns: 256} and rep["t_forget_lower"] == {ns: 64}
  assert "0.9 x chance" in md


def test_ray_launcher_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
  from mamba2_jax.errors import UserError

  monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
  with pytest.raises(UserError) as e:
    run_sweep(_sweep(), tmp_path / "r", task_config=eval_task_config, launcher="ray")
  assert "pip install -r requirements-ray.txt" in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "r").exists()  # said before any work


def test_an_interrupted_command_gets_sigterm_and_is_waited_for(tmp_path):
  """Ctrl-C, or a cancelled Ray task (both a KeyboardInterrupt in the main thread), while a
  point's command runs silently: the command gets one SIGTERM (the trainer saves a checkpoint)
  and ends before the interrupt propagates."""
  import _thread
  import threading

  from mamba2_jax.sweep.points import run_logged

  mark = tmp_path / "sigterm"
  script = tmp_path / "slow"
  script.write_text(f"""#!{sys.executable}
import signal, sys, time
def stop(*_):
  time.sleep(0.5)  # a checkpoint being written
  open({str(mark)!r}, "w").write("saved")
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("step 1/3 loss 1.0", flush=True)
time.sleep(60)
""")
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  threading.Timer(1.5, _thread.interrupt_main).start()
  with pytest.raises(KeyboardInterrupt):
    run_logged([str(script)], tmp_path / "logs" / "train.log", "")
  assert mark.read_text() == "saved"  # written before run_logged returned
  assert "step 1/3 loss 1.0" in (tmp_path / "logs" / "train.log").read_text()
