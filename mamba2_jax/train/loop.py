"""`train_and_evaluate(config, workdir)`: the training loop, read top to bottom.

Every process runs the same program (same jitted functions in the same order); only
process 0 writes logs, metrics and the workdir's config/marker files, while every process
takes part in checkpoint saves and restores (orbax synchronises them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.checkpoints import workdir as workdir_lib
from mamba2_jax.checkpoints.hub import from_pretrained, load_config
from mamba2_jax.config import ConfigError
from mamba2_jax.data.pipeline import check_stream_fingerprint, make_global_batch
from mamba2_jax.flops import model_flops_per_token
from mamba2_jax.model import Mamba2LM
from mamba2_jax.train import checkpoint as ckpt_lib
from mamba2_jax.train.config import check_vocab, resume_diff, to_json_dict, validate
from mamba2_jax.train.data import open_stream
from mamba2_jax.train.metrics import MetricsLogger, Profiler, peak_flops
from mamba2_jax.train.optimizer import make_optimizer, schedule
from mamba2_jax.train.sharding import (
  batch_spec,
  data_readers,
  make_mesh,
  param_specs,
  shardings_of,
  token_spec,
)
from mamba2_jax.train.step import StepConfig, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm stopped the run (the last good checkpoint is kept)."""


class _Preemption:
  """SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop saves a checkpoint at the current step
  and exits cleanly. A second SIGINT aborts at once (KeyboardInterrupt), without saving."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None  # the name of the first signal received
    self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

  def _handler(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    if not self.requested:
      self.requested = signal.Signals(signum).name
      msg = "saving a checkpoint at the current step, then exiting"
      if signum == signal.SIGINT:
        msg += " (Ctrl-C again aborts without saving)"
      os.write(sys.stderr.fileno(), f"{self.requested}: {msg}\n".encode())  # reentrant-safe

  def agreed(self, ckpt: ckpt_lib.Checkpointer, step: int, sync: bool) -> bool:
    """Whether every process should stop now (orbax's preemption notice or a signal)."""
    if ckpt.reached_preemption(step):
      return True
    if jax.process_count() == 1:
      return bool(self.requested)
    if not sync:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    flags = multihost_utils.process_allgather(np.int32(bool(self.requested)))
    return bool(np.any(flags))

  def restore(self):
    for s, old in self._old.items():
      signal.signal(s, old)


def _check_workdir_config(workdir: str, cfg_json: dict, allow_change: bool) -> None:
  """Refuses to resume a workdir whose saved config differs in fields that matter. A workdir
  binds its config only once it holds a checkpoint: before that (e.g. after a failed first
  start) a different config replaces config.json."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diffs = resume_diff(saved, cfg_json)
    if diffs and not workdir_lib.complete_steps(workdir):
      if jax.process_index() == 0:
        log.warning("%s holds no checkpoint: its config.json is replaced by this config", workdir)
    elif diffs and not allow_change:
      raise ConfigError(
        f"workdir {workdir} holds a run with a different config: "
        + "; ".join(diffs[:12])
        + ("; ..." if len(diffs) > 12 else "")
        + ". Use a new --workdir, or pass "
        "--config.allow_config_change=True to resume it with the new config."
      )
    elif diffs:
      log.warning("resuming %s with a changed config: %s", workdir, "; ".join(diffs))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    marker = os.path.join(workdir, workdir_lib.TRAIN_COMPLETE)
    if os.path.exists(marker):  # a finished run continued to more steps is no longer complete
      with open(marker) as f:
        if json.load(f).get("step", 0) < cfg_json["total_steps"]:
          os.remove(marker)
    if os.path.exists(path):
      os.replace(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
    with open(path + ".tmp", "w") as f:
      json.dump(cfg_json, f, indent=2)
    os.replace(path + ".tmp", path)


def _require_finite(vals: dict, step: int, ckpt: ckpt_lib.Checkpointer) -> None:
  bad = {k: vals[k] for k in ("loss", "grad_norm") if k in vals and not np.isfinite(vals[k])}
  if bad:
    ckpt.wait()
    good = [s for s in ckpt.all_steps() if s < step]
    raise TrainingDiverged(
      f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; stopping "
      f"without saving. Last good checkpoint: "
      + (f"step {good[-1]} in {ckpt.directory}" if good else "none (no step was saved)")
    )


@dataclasses.dataclass
class Setup:
  """Everything that depends on (config, model config, mesh): shardings, optimizer, steps."""

  mesh: jax.sharding.Mesh
  model_cfg: Any
  graphdef: Any
  abstract_params: Any  # ShapeDtypeStructs with their target shardings
  abstract_opt: Any
  state_shard: dict
  data_shard: NamedSharding
  tx: optax.GradientTransformation
  train_step: Any  # jitted (state, batch) -> (state, metrics); the state is donated
  eval_step: Any  # jitted (params, batch) -> {"loss_sum", "count"}

  def init_state(self, seed: int) -> dict:
    """Fresh parameters and optimizer state, created already sharded (under jit)."""

    def init():
      model = Mamba2LM(self.model_cfg, rngs=nnx.Rngs(seed))
      params = nnx.to_pure_dict(nnx.state(model))
      return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, out_shardings=self.state_shard)()

  def state_from_pretrained(self, path: str) -> dict:
    """Parameters from an official / HF / converted checkpoint (its shape-defining fields must
    equal the model config), a fresh optimizer state; every process builds its own shards."""
    ckpt_cfg, _ = load_config(path)
    shape_fields = (
      "d_model",
      "n_layer",
      "d_state",
      "headdim",
      "expand",
      "ngroups",
      "d_conv",
      "vocab_size",
      "pad_vocab_size_multiple",
      "tie_embeddings",
      "D_has_hdim",
      "conv_bias",
      "proj_bias",
    )
    diffs = [
      f"{f}: checkpoint {getattr(ckpt_cfg, f)!r} vs config {getattr(self.model_cfg, f)!r}"
      for f in shape_fields
      if getattr(ckpt_cfg, f) != getattr(self.model_cfg, f)
    ]
    if diffs:
      raise ConfigError(
        f"config.init_checkpoint {path}: the model shapes differ (" + "; ".join(diffs) + ")"
      )
    model = from_pretrained(path, param_dtype=self.model_cfg.param_dtype)
    host = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params = jax.tree.map(
      lambda a, s: jax.make_array_from_callback(a.shape, s.sharding, lambda idx, a=a: a[idx]),
      host,
      self.abstract_params,
    )
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shard["opt_state"])(params)
    return self.state_from(params, opt_state, 0)

  def state_from(self, params, opt_state, step: int) -> dict:
    step = jax.device_put(jnp.asarray(step, jnp.int32), self.state_shard["step"])
    return {"params": params, "opt_state": opt_state, "step": step}


def build(config, model_cfg, mesh) -> Setup:
  """Shardings from the logical-axis rules, the optimizer and the jitted steps for `mesh`."""
  abstract = nnx.eval_shape(lambda: Mamba2LM(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  p_shard = shardings_of(param_specs(abstract_state, config.logical_axis_rules, mesh), mesh)
  abstract_params = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    nnx.to_pure_dict(abstract_state),
    p_shard,
  )
  tx = make_optimizer(config.optimizer, config.total_steps, abstract_params)
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  o_shard = optax.tree_map_params(
    tx, lambda _, s: s, abstract_opt, p_shard, transform_non_params=lambda _: replicated
  )
  abstract_opt = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt, o_shard
  )
  state_shard = {"params": p_shard, "opt_state": o_shard, "step": replicated}
  data_shard = NamedSharding(mesh, batch_spec(mesh, config.logical_axis_rules))
  step_cfg = StepConfig(
    seq_len=config.seq_len,
    tbptt_segments=config.tbptt_segments,
    grad_accum_steps=config.grad_accum_steps,
    token_spec=token_spec(mesh, config.logical_axis_rules),
  )
  train_step = jax.jit(
    make_train_step(graphdef, tx, step_cfg, lambda b: Mamba2Cache.zeros(model_cfg, b)),
    in_shardings=(state_shard, data_shard),
    out_shardings=(state_shard, None),
    donate_argnums=0,
  )
  eval_step = jax.jit(make_eval_step(graphdef, step_cfg), in_shardings=(p_shard, data_shard))
  return Setup(
    mesh,
    model_cfg,
    graphdef,
    abstract_params,
    abstract_opt,
    state_shard,
    data_shard,
    tx,
    train_step,
    eval_step,
  )


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest good checkpoint. Returns the last
  step's metrics."""
  # 1. Validate everything before any device work (the data's share per process depends on
  # which batch rows each process's devices hold: the hosts of one context group read alike).
  nproc, pidx = jax.process_count(), jax.process_index()
  validate(config, num_devices=jax.device_count())
  mesh = make_mesh(config.mesh_shape)
  reader, readers = data_readers(mesh, config.logical_axis_rules, config.global_batch_size)
  model_cfg = validate(config, num_devices=jax.device_count(), num_processes=readers)
  cfg_json = to_json_dict(config)
  _check_workdir_config(workdir, cfg_json, bool(config.allow_config_change))

  # 2. Data: this reader's logical shards of the stream.
  make_iter, tok_ident, stream_fp = open_stream(config, process_index=reader, process_count=readers)
  check_vocab(model_cfg, tok_ident)

  # 3. Shardings, optimizer and the jitted steps.
  if mesh.shape["tensor"] > 1 and model_cfg.fused_in_proj:
    model_cfg = model_cfg.replace(fused_in_proj=False)  # keep in_proj pieces head-sharded
  setup = build(config, model_cfg, mesh)
  log.info(
    "process %d/%d, %d devices, mesh %s, model %s: %s parameters",
    pidx,
    nproc,
    jax.device_count(),
    dict(mesh.shape),
    config.name,
    f"{model_cfg.num_params():,}",
  )

  # 4. Resume from the newest good checkpoint, or initialise (parameters created sharded).
  ckpt = ckpt_lib.Checkpointer(
    workdir,
    save_every=config.checkpoint_every,
    keep=config.keep_checkpoints,
    keep_every=config.keep_every,
    async_save=config.async_checkpointing,
  )

  def check_meta(meta):
    tok_ok = meta.get("tokenizer", {})
    if tok_ok.get("sha256") != tok_ident.get("sha256"):
      raise ConfigError(
        f"checkpoints in {workdir} were trained with tokenizer "
        f"{tok_ok.get('name')!r}, this run uses {tok_ident.get('name')!r}"
      )
    check_stream_fingerprint(meta["stream"], stream_fp)

  restored = ckpt.restore_latest(
    setup.abstract_params, setup.abstract_opt, make_data_iter=make_iter, check_meta=check_meta
  )
  if restored is not None:
    start, params, opt_state, it, _ = restored
    state = setup.state_from(params, opt_state, start)
    log.info("resumed from step %d", start)
  elif config.init_checkpoint:
    state = setup.state_from_pretrained(config.init_checkpoint)
    start, it = 0, make_iter()
    log.info("initialised from %s", config.init_checkpoint)
  else:
    state = setup.init_state(config.seed)
    start, it = 0, make_iter()

  # 5. Logging, profiling, preemption.
  train_step, eval_step, data_shard = setup.train_step, setup.eval_step, setup.data_shard
  # the learning rate of every step, computed once: evaluating the schedule per step would
  # queue a device computation behind the train step and make reading it synchronous
  lr_table = np.asarray(
    jax.jit(jax.vmap(schedule(config.optimizer, config.total_steps)))(
      jnp.arange(config.total_steps)
    )
  )
  tokens_per_step = config.global_batch_size * config.seq_len * config.tbptt_segments
  flops = 3 * model_flops_per_token(model_cfg, config.seq_len) * tokens_per_step
  logger = MetricsLogger(
    workdir,
    log_every=config.log_every,
    flops_per_step=flops,
    peak_flops=peak_flops(),
    tokens_per_step=tokens_per_step,
    total_steps=config.total_steps,
    start_step=start,
  )
  profiler = Profiler(workdir, config.profile_start, config.profile_steps)
  preempt = _Preemption()

  def meta(step):
    return {
      "config": cfg_json,
      "model": json.loads(model_cfg.to_json()),
      "tokenizer": tok_ident,
      "stream": stream_fp,
      "tokens_seen": step * tokens_per_step,
      "process_count": nproc,
    }

  make_eval = None

  def evaluate(step, params):
    """Mean loss on the first eval_batches batches of data.eval_source (default: the training
    source with another shuffle seed), the same batches every time."""
    nonlocal make_eval
    if make_eval is None:
      make_eval = open_stream(
        config,
        process_index=reader,
        process_count=readers,
        source=config.data.eval_source,
        seed_offset=1,
      )[0]
    eval_it, total, count = make_eval(), 0.0, 0.0
    for _ in range(config.eval_batches):
      with jax.set_mesh(mesh):
        out = eval_step(params, make_global_batch(next(eval_it), data_shard, readers))
      total, count = total + float(out["loss_sum"]), count + float(out["count"])
    eval_it.close()
    logger.write_eval(step, {"eval/loss": total / max(count, 1.0)})

  # 6. The loop.
  last, stopped_at = {}, None
  try:
    for step in range(start + 1, config.total_steps + 1):
      profiler.step(step)
      t0 = time.perf_counter()
      batch = make_global_batch(next(it), data_shard, readers)
      logger.add_data_wait(time.perf_counter() - t0)
      with jax.set_mesh(mesh), jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, batch)
      prev = logger.push(step, metrics, {"lr": float(lr_table[step - 1])})
      if prev is not None:
        _require_finite(prev, prev["step"], ckpt)
      stop = preempt.agreed(ckpt, step, sync=step % config.log_every == 0)
      if stop or step == config.total_steps or ckpt.should_save(step):
        last = logger.flush()  # the state about to be saved must come from a finite step
        _require_finite(last, step, ckpt)
        ckpt.save(
          step,
          state["params"],
          state["opt_state"],
          it,
          meta(step),
          force=stop or step == config.total_steps,
        )
      if config.eval_every and step % config.eval_every == 0:
        evaluate(step, state["params"])
      if stop:
        stopped_at = step
        break
    last = logger.flush() or last
    if last:
      _require_finite(last, last["step"], ckpt)
    ckpt.wait()
    if stopped_at is not None:
      log.warning(
        "%s: saved step %d in %s; the same command resumes the run",
        preempt.requested or "preemption notice",
        stopped_at,
        ckpt.directory,
      )
    if (
      not preempt.requested
      and int(state["step"]) >= config.total_steps
      and jax.process_index() == 0
    ):
      workdir_lib.mark_train_complete(
        workdir, {"step": config.total_steps, "tokens_seen": config.total_steps * tokens_per_step}
      )
  finally:
    preempt.restore()
    profiler.close()
    logger.close()
    ckpt.close()
    if hasattr(it, "close"):
      it.close()
  return last
