"""The training and evaluation steps: pure functions of (state, batch), jitted by the trainer.

A batch is {"tokens": (B, P*T + 1) int32[, "segment_ids": same shape]} with T = seq_len and
P = tbptt_segments: inputs are tokens[:, :-1], targets tokens[:, 1:]. With segment ids, a
target counts only if it lies in the same (non-padding, id != 0) segment as its input.

The train state is a plain pytree {"params": nnx pure dict, "opt_state": optax state,
"step": int32}. One step:
  for each of `grad_accum_steps` micro-batches (lax.scan, gradients summed):
    for each of P segments of T tokens (lax.scan; truncated BPTT):
      loss and gradient of the segment, starting from the previous segment's final
      inference cache (SSM state + conv context) with stop_gradient
  gradients / number of target tokens -> optimizer update (clipping inside the optimizer).
So the loss is the mean over every target token of the global batch, whatever the split.

With `StepConfig.token_spec` (the loop's `sharding.token_spec`: batch over data x fsdp, length
over "context") the (B, T) inputs, targets, masks and segment ids are constrained to it, so a
context-parallel mesh splits every segment into contiguous slices; the steps then run under
`jax.set_mesh(mesh)` (as the trainer calls them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as PS

from mamba2_jax.loss import model_nll
from mamba2_jax.train.optimizer import global_norm

__all__ = ["StepConfig", "make_train_step", "make_eval_step", "split_batch"]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  seq_len: int
  tbptt_segments: int = 1
  grad_accum_steps: int = 1
  token_spec: Any = None  # PartitionSpec of a (B, T) input array, or None (unconstrained)


def _segment_loss(graphdef, params, inputs, targets, mask, seg, cache):
  """Sum of token losses of one segment, the count, and the final cache (if carried)."""
  model = nnx.merge(graphdef, params)
  nll, new_cache = model_nll(model, inputs, targets, segment_ids=seg, cache=cache)
  m = mask.astype(jnp.float32)
  return jnp.sum(nll * m), (jnp.sum(m), new_cache)


def split_batch(batch: dict[str, jax.Array], cfg: StepConfig) -> dict[str, jax.Array]:
  """-> {"inputs", "targets", "mask"[, "seg"]}, each (accum, P, B/accum, T)."""
  # the delivered rows (P*T + 1 tokens) and their shifted slices stay whole over the length
  # axes (slicing is local); only the (B, T) pieces are split (a local slice too)
  rows = PS(cfg.token_spec[0], None) if cfg.token_spec is not None else None
  keep = (lambda x: x) if rows is None else (lambda x: jax.lax.with_sharding_constraint(x, rows))
  tok = batch["tokens"]
  B, R = tok.shape
  A, P, T = cfg.grad_accum_steps, cfg.tbptt_segments, cfg.seq_len
  if R != P * T + 1:
    raise ValueError(
      f"batch rows have {R} tokens; expected tbptt_segments * seq_len + 1 = {P * T + 1}"
    )

  def shape(x):  # (B, P*T) -> (A, P, B/A, T)
    return jnp.transpose(x.reshape(A, B // A, P, T), (0, 2, 1, 3))

  out = {"inputs": shape(keep(tok[:, :-1])), "targets": shape(keep(tok[:, 1:]))}
  seg = batch.get("segment_ids")
  if seg is None:
    out["mask"] = jnp.ones_like(out["targets"], jnp.bool_)
  else:
    s_in, s_tg = keep(seg[:, :-1]), keep(seg[:, 1:])
    out["mask"] = shape((s_tg != 0) & (s_tg == s_in))
    out["seg"] = shape(s_in)
  if cfg.token_spec is not None:  # (A, P, B/A, T): the last two axes as a (B, T) array
    spec = PS(None, None, *cfg.token_spec)
    out = {k: jax.lax.with_sharding_constraint(v, spec) for k, v in out.items()}
  return out


def _loss_and_grad(graphdef, params, seg_batch, cache):
  """(loss sum, token count, final cache), gradient w.r.t. params, of one (B, T) segment."""

  def f(params):
    loss, (count, new_cache) = _segment_loss(
      graphdef,
      params,
      seg_batch["inputs"],
      seg_batch["targets"],
      seg_batch["mask"],
      seg_batch.get("seg"),
      cache,
    )
    return loss, (count, new_cache)

  (loss, (count, new_cache)), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss, count, new_cache, grads


def _micro_batch(graphdef, params, micro, init_cache):
  """Gradient sum, loss sum and token count over the P segments of one micro-batch
  (micro: dict of (P, b, T) arrays); each segment starts from the previous one's final cache."""
  if micro["inputs"].shape[0] == 1:
    loss, count, _, grads = _loss_and_grad(
      graphdef, params, jax.tree.map(lambda x: x[0], micro), None
    )
    return grads, loss, count

  def body(carry, seg_batch):
    g_acc, l_acc, n_acc, cache = carry
    loss, count, cache, g = _loss_and_grad(
      graphdef, params, seg_batch, jax.lax.stop_gradient(cache)
    )
    return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, n_acc + count, cache), None

  zero = jnp.zeros((), jnp.float32)
  init = (jax.tree.map(jnp.zeros_like, params), zero, zero, init_cache)
  (grads, loss, count, _), _ = jax.lax.scan(body, init, micro)
  return grads, loss, count


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig, init_cache_fn):
  """train_step(state, batch) -> (state, metrics); `init_cache_fn(batch_size)` gives the zero
  inference cache the first TBPTT segment starts from."""

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
    params = state["params"]
    parts = split_batch(batch, cfg)
    mb = parts["inputs"].shape[2]
    init_cache = init_cache_fn(mb) if cfg.tbptt_segments > 1 else None
    if cfg.grad_accum_steps == 1:
      grads, loss_sum, count = _micro_batch(
        graphdef, params, jax.tree.map(lambda x: x[0], parts), init_cache
      )
    else:

      def body(carry, micro):
        g, l, n = _micro_batch(graphdef, params, micro, init_cache)
        return jax.tree.map(jnp.add, carry, (g, l, n)), None

      zero = jnp.zeros((), jnp.float32)
      (grads, loss_sum, count), _ = jax.lax.scan(
        body, (jax.tree.map(jnp.zeros_like, params), zero, zero), parts
      )
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    metrics = {
      "loss": loss_sum / denom,
      "grad_norm": global_norm(grads),
      "param_norm": global_norm(params),
      "target_tokens": count,
    }
    new_state = {
      "params": optax.apply_updates(params, updates),
      "opt_state": opt_state,
      "step": state["step"] + 1,
    }
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, cfg: StepConfig):
  """eval_step(params, batch) -> {"loss_sum", "count"}; TBPTT segments run in sequence with
  the state carried, as in training."""

  def eval_step(params, batch):
    parts = split_batch(batch, dataclasses.replace(cfg, grad_accum_steps=1))
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(parts["inputs"].shape[2]) if cfg.tbptt_segments > 1 else None
    total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for k in range(cfg.tbptt_segments):
      seg_batch = jax.tree.map(lambda x: x[0, k], parts)
      loss, (n, cache) = _segment_loss(
        graphdef,
        params,
        seg_batch["inputs"],
        seg_batch["targets"],
        seg_batch["mask"],
        seg_batch.get("seg"),
        cache,
      )
      total, count = total + loss, count + n
    return {"loss_sum": total, "count": count}

  return eval_step
