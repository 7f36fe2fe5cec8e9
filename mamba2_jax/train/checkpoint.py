"""Writing training checkpoints: orbax CheckpointManager, async saves, retention, and the
verified restore for resuming, falling back past damaged steps.

The workdir layout, the step listing, the metadata readers and `CheckpointError` are
`mamba2_jax.checkpoints.workdir`; the checksums are `mamba2_jax.checkpoints.checksums`
(`meta["checksums"]` stores a layout-independent fingerprint of every saved array and every
restore recomputes and compares it; a step that fails to restore or to verify is reported by
number and the previous step is tried). Evaluation reads checkpoints through
`mamba2_jax.checkpoints.load_model`, never through this module.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from mamba2_jax.checkpoints.checksums import fingerprint, verify
from mamba2_jax.checkpoints.workdir import (
  ITEMS,
  CheckpointError,
  checkpoint_dir,
  read_data_states,
  read_meta,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
class Checkpointer:
  """CheckpointManager for training: async saves, retention, verified restore with fallback.

  Every process must call `save`, `restore_latest`, `wait` and `close` (orbax synchronises
  the processes inside them).
  """

  def __init__(
    self,
    workdir: str,
    *,
    save_every: int,
    keep: int = 3,
    keep_every: int | None = None,
    async_save: bool = True,
  ):
    save_policies = [
      ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
      ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
    ]
    keep_policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_every:
      keep_policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
      save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(save_policies),
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep_policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.directory = checkpoint_dir(workdir)
    self.mngr = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  # -- saving
  def should_save(self, step: int) -> bool:
    return self.mngr.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self.mngr.reached_preemption(step)

  def save(
    self, step: int, params, opt_state, data_iter, meta: dict[str, Any], *, force: bool = False
  ) -> bool:
    """Saves one step (asynchronously); returns whether a save was started."""
    if not force and not self.mngr.should_save(step):
      return False
    train = {"opt_state": opt_state}
    meta = {
      **meta,
      "step": int(step),
      "time": time.time(),
      "checksums": {"params": fingerprint(params), "opt_state": fingerprint(train)},
    }
    args = {
      "params": ocp.args.StandardSave(params),
      "opt_state": ocp.args.StandardSave(train),
      "meta": ocp.args.JsonSave(meta),
    }
    if data_iter is not None:
      import grain  # pylint: disable=g-import-not-at-top

      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.mngr.save(step, args=ocp.args.Composite(**args), force=force)

  # -- restoring
  def all_steps(self) -> list[int]:
    self.mngr.reload()
    return sorted(self.mngr.all_steps())

  def restore(self, step: int, abstract_params, abstract_opt_state=None, data_iter=None):
    """Restores and verifies one step. Returns (params, opt_state or None, meta).

    `abstract_*` are pytrees of jax.ShapeDtypeStruct with the target shardings (any mesh).
    `data_iter` (a ShardedStream) is set from the merged per-process iterator files, so a run
    may resume with another number of processes. Raises CheckpointError when the step is
    damaged.
    """
    meta = read_meta(os.path.dirname(self.directory), step)
    args = {"params": ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
      args["opt_state"] = ocp.args.StandardRestore({"opt_state": abstract_opt_state})
    try:
      out = self.mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged steps
      raise CheckpointError(
        f"checkpoint step {step}: restore failed "
        f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
      ) from e
    sums = meta.get("checksums", {})
    verify(out["params"], sums.get("params", {}), "params", step)
    opt_state = None
    if abstract_opt_state is not None:
      verify(out["opt_state"], sums.get("opt_state", {}), "opt_state", step)
      opt_state = out["opt_state"]["opt_state"]
    if data_iter is not None:
      try:
        data_iter.set_state(read_data_states(os.path.dirname(self.directory), step))
      except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint step {step}: data iterator state unusable ({e})") from e
    return out["params"], opt_state, meta

  def restore_latest(
    self,
    abstract_params,
    abstract_opt_state=None,
    make_data_iter: Callable[[], Any] | None = None,
    check_meta: Callable[[dict], None] | None = None,
  ):
    """Restores the newest good step, falling back past damaged ones.

    Returns (step, params, opt_state, data_iter, meta), or None when there is no checkpoint.
    `make_data_iter()` builds a fresh iterator to restore into (one per attempt, since a
    failed restore may leave it half set). `check_meta(meta)` may raise to reject a step
    for reasons other than damage (e.g. an incompatible config): that error propagates.
    """
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        meta = read_meta(os.path.dirname(self.directory), step)
        if check_meta is not None:
          check_meta(meta)
        it = make_data_iter() if make_data_iter is not None else None
        params, opt_state, meta = self.restore(step, abstract_params, abstract_opt_state, it)
      except CheckpointError as e:
        log.error("%s; trying the previous step", e)
        errors.append(str(e))
        continue
      if errors:
        log.warning(
          "resumed from step %d after skipping %d damaged newer step(s)", step, len(errors)
        )
        self._quarantine([s for s in steps if s > step])
      return step, params, opt_state, it, meta
    if steps:
      raise CheckpointError("no usable checkpoint in " + self.directory + ": " + " | ".join(errors))
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Moves damaged steps to WORKDIR/checkpoints_damaged/ (kept for inspection) so the run can
    save those step numbers again."""
    from etils import epath  # pylint: disable=g-import-not-at-top

    if jax.process_index() == 0:
      dest = epath.Path(self.directory + "_damaged")
      dest.mkdir(parents=True, exist_ok=True)
      for s in steps:
        target = dest / f"{s}-{int(time.time())}"
        epath.Path(self.directory, str(s)).rename(target)
        log.error("moved damaged checkpoint step %d to %s", s, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("mamba2_jax_quarantine_damaged_steps")
    self.mngr.reload()

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()
