"""Evaluation jobs: one model source, or each step of a training workdir (--mode=latest|all|watch).

Built on `mamba2_jax.checkpoints` (load_model, and the workdir's complete_steps,
is_train_complete, CheckpointError). Output layout for a workdir:
  OUT/step_<N>/             the task's results.json + PNGs (+ task files) for step N
  OUT/metrics.jsonl         one line per evaluation {"step", "task", "tokens_seen", ...summary}
  OUT/evaluated_steps.json  the ledger {"task", "settings_key", "settings", "evaluated": {N: {...}},
                            "failed": {N: {...}}} (mamba2_jax.eval.ledger)
A non-workdir source (random:..., a pretrained dir) is evaluated into OUT itself, every time.

An OUT holds the results of one set of settings (task config, model source, tokenizer; see
mamba2_jax.eval.ledger): other settings raise SettingsMismatch naming the differences, unless
`overwrite` moves the earlier results aside. The ledger makes every mode idempotent across
restarts: a step in "evaluated" (with these settings) is never redone.
A step that fails to load (CheckpointError, a missing/partial file) is logged in "failed" and
retried at the next poll; once training is complete, a step with >= `max_attempts` failures is
given up (logged), so `watch` ends.
`watch` polls every `poll_interval_s` and stops when `is_train_complete` is true (checked before
listing the steps, so the list is final) and every listed step is evaluated or given up.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from mamba2_jax.checkpoints.load import RANDOM_PREFIX, LoadedModel, is_workdir, load_model
from mamba2_jax.checkpoints.workdir import CheckpointError, complete_steps, is_train_complete
from mamba2_jax.eval import get_task_runner, io
from mamba2_jax.eval.ledger import LEDGER, METRICS, Ledger, SettingsMismatch, result_settings
from mamba2_jax.eval.ledger import settings_key
from mamba2_jax.mitigations.spec import apply_mitigation

__all__ = ["MODES", "LEDGER", "METRICS", "Ledger", "SettingsMismatch", "evaluate_source"]
log = logging.getLogger(__name__)

MODES = ("latest", "all", "watch")
_RETRYABLE = (CheckpointError, FileNotFoundError, OSError)  # a step still being written, damaged


def evaluate_model(
  loaded: LoadedModel, task: str, cfg, out_dir, settings: dict | None = None
) -> dict:
  """Applies cfg.mitigation and runs the task; T_train = cfg.train_len or the checkpoint's.
  `settings` (ledger.result_settings) and its key are recorded in results.json."""
  train_len = cfg.train_len or loaded.meta.get("train_len") or None
  model = apply_mitigation(
    loaded.model, cfg.mitigation, tokenizer=loaded.tokenizer, train_len=train_len
  )
  results = get_task_runner(task)(model, loaded.tokenizer, cfg, out_dir, train_len=train_len)
  results["checkpoint"] = loaded.meta
  if settings is not None:
    results.update(settings_key=settings_key(settings), settings=settings)
  io.write_json(Path(out_dir) / "results.json", results)
  return results


def log_metrics(out: Path, task: str, meta: dict, results: dict) -> dict:
  line = {
    "step": meta.get("step"),
    "task": task,
    "tokens_seen": meta.get("tokens_seen"),
    "mitigation": results.get("config", {}).get("mitigation", "") or None,
    "settings_key": results.get("settings_key"),
    **results.get("summary", {}),
  }
  io.append_jsonl(out / METRICS, [line])
  return line


def evaluate_step(
  workdir: str, step: int, task: str, cfg, out: Path, ledger: Ledger, *, tokenizer: str = ""
) -> dict | None:
  """Evaluates one step into OUT/step_<N>; returns the metrics line, None on a load failure."""
  try:
    loaded = load_model(workdir, step=step, tokenizer=tokenizer, model_dtype=cfg.model_dtype)
  except _RETRYABLE as e:
    log.warning("step %d of %s could not be loaded (will retry): %s", step, workdir, e)
    ledger.record_failure(step, e)
    return None
  log.info("evaluating %s on step %d of %s", task, step, workdir)
  ledger.start()
  results = evaluate_model(loaded, task, cfg, out / f"step_{step}", ledger.data["settings"])
  line = log_metrics(out, task, loaded.meta, results)
  ledger.record_done(step, line)
  return line


def evaluate_source(
  spec: str,
  task: str,
  cfg,
  out_dir,
  *,
  mode: str = "latest",
  tokenizer: str = "",
  poll_interval_s: float = 60.0,
  max_attempts: int = 3,
  timeout_s: float = 0.0,
  overwrite: bool = False,
  sleep: Callable[[float], None] = time.sleep,
) -> list[dict]:
  """Evaluates `spec` (see mamba2_jax.checkpoints.load) with `task`; returns the metrics lines
  written. Raises SettingsMismatch if OUT holds results of other settings (task config, source,
  tokenizer), unless `overwrite` (they are moved to OUT/superseded/<key>/)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # watch may start before the trainer has created its workdir
  pending_workdir = (
    mode == "watch" and not spec.startswith(RANDOM_PREFIX) and not os.path.exists(spec)
  )
  settings = result_settings(cfg, spec, tokenizer)
  ledger = Ledger(out, task, settings, overwrite=overwrite)
  if not (is_workdir(spec) or pending_workdir):
    if mode != "latest":
      log.info("--mode=%s applies to training workdirs; %s is evaluated once", mode, spec)
    loaded = load_model(spec, tokenizer=tokenizer, model_dtype=cfg.model_dtype)
    ledger.start()
    results = evaluate_model(loaded, task, cfg, out, settings)
    line = log_metrics(out, task, loaded.meta, results)
    ledger.record_done("source", line)
    return [line]

  lines: list[dict] = []
  if mode == "latest":
    steps = complete_steps(spec)
    if not steps:
      raise FileNotFoundError(f"{spec}: no complete checkpoint step yet")
    step = max(steps)
    if ledger.done(step):
      log.info(
        "step %d already evaluated with these settings: %s",
        step,
        out / f"step_{step}" / "results.json",
      )
      return lines
    line = evaluate_step(spec, step, task, cfg, out, ledger, tokenizer=tokenizer)
    if line is None:
      raise CheckpointError(
        f"{spec}: the latest step {step} could not be loaded; see {ledger.path}"
      )
    return [line]

  start = time.monotonic()
  while True:
    complete = is_train_complete(spec)  # before listing: then the list below is final
    steps = sorted(complete_steps(spec))
    for step in steps:
      if ledger.done(step) or (complete and ledger.attempts(step) >= max_attempts):
        continue
      line = evaluate_step(spec, step, task, cfg, out, ledger, tokenizer=tokenizer)
      if line is not None:
        lines.append(line)
    left = [s for s in steps if not ledger.done(s)]
    if mode == "all":
      if left:
        log.warning("not evaluated (load failures, see %s): steps %s", ledger.path, left)
      return lines
    given_up = [s for s in left if ledger.attempts(s) >= max_attempts]
    if complete and len(given_up) == len(left):
      if given_up:
        log.error(
          "training is complete; gave up on steps %s after %d attempts", given_up, max_attempts
        )
      log.info("watch: training complete, %d step(s) evaluated", len(steps) - len(given_up))
      return lines
    if timeout_s and time.monotonic() - start > timeout_s:
      log.warning("watch: timeout after %.0f s with steps %s pending", timeout_s, left)
      return lines
    sleep(poll_interval_s)
