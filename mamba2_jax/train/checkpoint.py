"""Training checkpoints: orbax CheckpointManager, checksums, fallback to the last good step.

Layout of a training workdir:

  WORKDIR/config.json             resolved training config of the run (written once)
  WORKDIR/checkpoints/<step>/     one orbax Composite per step, items:
      params/      model parameters (nnx pure dict), float arrays, any sharding
      opt_state/   {"opt_state": optax state, "step": int32}
      data_iter/   grain iterator state, one JSON per process
      meta/        JSON: step, tokens_seen, config, model, tokenizer identity, stream
                   fingerprint, checksums of params/opt_state, time
  WORKDIR/train_complete          written by the trainer after the final step (JSON)

Orbax writes each step into a temporary directory and renames it when complete, so a step
that is still being written is never listed. It does not validate what it reads back, so
`meta["checksums"]` stores a layout-independent fingerprint of every saved array (see
`fingerprint`) and every restore recomputes and compares it; a step that fails to restore
or to verify is reported by number and the previous step is tried.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mamba2_jax.config import Mamba2Config
from mamba2_jax.model import Mamba2LM

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
TRAIN_COMPLETE = "train_complete"
ITEMS = ("params", "opt_state", "data_iter", "meta")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint step cannot be used (missing item, unreadable, or checksum mismatch)."""


# ------------------------------------------------------------------------------------------------
# Checksums
_MUL1, _MUL2 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)


def _as_u32(x):
  """Bit pattern of x as uint32 words (64-bit types give 2 words per element)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = x.dtype.itemsize * 8
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  u = jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits])
  return u.astype(jnp.uint32)


def _flat_index(shape):
  """Row-major element index as uint32 (wrapping mod 2**32), built from per-axis iotas."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for ax in range(len(shape) - 1, -1, -1):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, ax) * np.uint32(stride % 2**32)
    stride *= shape[ax]
  return idx


def _leaf_fingerprint(x):
  u = _as_u32(x)
  i = _flat_index(u.shape)
  w1 = (i * _MUL1) | np.uint32(1)  # odd weights: any change of one word changes h1
  w2 = ((i + np.uint32(7)) * _MUL2) | np.uint32(1)
  rot = (u << np.uint32(13)) | (u >> np.uint32(19))
  return jnp.stack([jnp.sum(u * w1, dtype=jnp.uint32), jnp.sum(rot * w2, dtype=jnp.uint32)])


_fingerprint_jit = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def fingerprint(tree) -> dict[str, str]:
  """{leaf path: "shape dtype hash"} for every array leaf of `tree`.

  The hash is two wrapping uint32 sums of the leaf's bit pattern with position-dependent odd
  weights, computed on device as global reductions, so it is independent of the sharding and
  of the device count (a checkpoint restored onto another mesh verifies against the same
  values), and any change of a single element changes it.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  arrays = {_path_str(p): v for p, v in leaves if hasattr(v, "shape")}
  hashes = jax.device_get(_fingerprint_jit(arrays))
  return {
    k: f"{tuple(v.shape)} {jnp.dtype(v.dtype).name} {int(h[0]):08x}{int(h[1]):08x}"
    for (k, v), h in zip(arrays.items(), (hashes[k] for k in arrays))
  }


def verify(tree, expected: dict[str, str], what: str, step: int) -> None:
  """Raises CheckpointError naming the step and the first mismatching leaves."""
  got = fingerprint(tree)
  bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
  if bad:
    detail = "; ".join(f"{k}: saved {expected.get(k)}, restored {got.get(k)}" for k in bad[:3])
    raise CheckpointError(
      f"checkpoint step {step}: {what} checksum mismatch in {len(bad)} array(s) ({detail})"
    )


# ------------------------------------------------------------------------------------------------
# Workdir helpers (also used by the evaluation jobs)
def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def complete_steps(workdir: str) -> list[int]:
  """Finalized checkpoint steps in ascending order (never a step still being written)."""
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  steps = []
  for name in os.listdir(d):
    # orbax writes <step>.orbax-checkpoint-tmp-* and renames it to <step> when complete
    if name.isdigit() and os.path.isdir(os.path.join(d, name)):
      steps.append(int(name))
  return sorted(steps)


def is_train_complete(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, TRAIN_COMPLETE))


def mark_train_complete(workdir: str, info: dict[str, Any]) -> None:
  """Writes WORKDIR/train_complete atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, TRAIN_COMPLETE)
  with open(path + ".tmp", "w") as f:
    json.dump({**info, "time": time.time()}, f, indent=2)
  os.replace(path + ".tmp", path)


def read_meta(workdir: str, step: int) -> dict[str, Any]:
  """The JSON metadata item of one step (raises CheckpointError when missing/unreadable)."""
  path = os.path.join(checkpoint_dir(workdir), str(step), "meta", "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint step {step}: meta item unreadable ({e})") from None


def read_data_states(workdir: str, step: int) -> dict[str, Any]:
  """All processes' data-iterator states of one step merged: {logical shard: state}."""
  d = os.path.join(checkpoint_dir(workdir), str(step), "data_iter")
  files = sorted(f for f in os.listdir(d) if f.startswith("process_") and f.endswith(".json"))
  if not files:
    raise ValueError(f"no process_*.json iterator files in {d}")
  merged: dict[str, Any] = {}
  for f in files:
    with open(os.path.join(d, f)) as fh:
      merged.update(json.load(fh))
  return merged


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


# ------------------------------------------------------------------------------------------------
# Evaluation-side loading
def _abstract_params(config: Mamba2Config, shardings=None):
  abstract = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(state)
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), target)
  else:
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
    )
  return graphdef, state, target


def load_eval_model(
  workdir: str, step: int | None = None, *, shardings=None
) -> tuple[Mamba2LM, dict[str, Any]]:
  """The model of a training workdir at `step` (default: newest), parameters verified.

  Returns (Mamba2LM, meta); meta has "step", "tokens_seen", "tokenizer" (identity dict),
  "config" (the training config as a dict; "seq_len" is the training length) and "model".
  Raises CheckpointError for a missing or damaged step.
  """
  steps = complete_steps(workdir)
  if not steps:
    raise CheckpointError(f"{workdir}: no complete checkpoint under {checkpoint_dir(workdir)}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"{workdir}: no complete checkpoint step {step} (have {steps})")
  meta = read_meta(workdir, step)
  config = Mamba2Config.from_dict(meta["model"])
  graphdef, state, target = _abstract_params(config, shardings)
  path = os.path.join(checkpoint_dir(workdir), str(step), "params")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(path, target)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(
      f"checkpoint step {step}: params unreadable "
      f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
    ) from e
  verify(params, meta.get("checksums", {}).get("params", {}), "params", step)
  return nnx.merge(graphdef, params), meta
