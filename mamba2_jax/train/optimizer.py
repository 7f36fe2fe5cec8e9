"""Optimizer: AdamW with the paper's recipe (App. F.1), gradient clipping, LR schedules.

Weight decay (default 0.1) applies to every parameter except those named in
`optimizer.no_decay` (A_log, dt_bias, D, norm scales, biases). The schedules:
  wsd       warmup-stable-decay (MiniCPM): linear warmup to lr, constant, then a linear
            decay to min_lr_ratio * lr over the last decay_fraction of total_steps
  cosine    linear warmup, then cosine decay to min_lr_ratio * lr at total_steps
  constant  linear warmup, then lr
The transformation skips updates whose gradients are not finite (optax.apply_if_finite), so
a non-finite step never corrupts the parameters; the trainer decides when to stop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["schedule", "decay_mask", "make_optimizer"]


def schedule(opt, total_steps: int):
  """The learning rate as a function of the step (0-based), an optax schedule."""
  lr, warm = float(opt.lr), int(opt.warmup_steps)
  end = lr * float(opt.min_lr_ratio)
  warmup = optax.linear_schedule(0.0, lr, max(warm, 1))
  rest = max(total_steps - warm, 1)
  if opt.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=end / lr)
  elif opt.schedule == "wsd":
    decay = max(int(round(total_steps * float(opt.decay_fraction))), 1)
    stable = max(rest - decay, 0)
    after = optax.join_schedules(
      [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [stable]
    )
  else:
    raise ValueError(
      f"config.optimizer.schedule: must be one of ('wsd', 'cosine', 'constant'), "
      f"got {opt.schedule!r}"
    )
  if warm == 0:
    return after
  return optax.join_schedules([warmup, after], [warm])


def _no_decay(name: str, tokens) -> bool:
  return any(name == t or name.endswith("_" + t) or name.startswith(t + "_") for t in tokens)


# Model constants stored beside the parameters (non-Param nnx variables): the model stops
# their gradient, so AdamW's update is exactly 0 — and they must not decay either.
FROZEN = ("state_norm_tau",)


def decay_mask(params, no_decay):
  """True for the leaves that get weight decay (leaf name matched against `no_decay`; never
  the FROZEN constants)."""

  def leaf(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name not in FROZEN and not _no_decay(name, tuple(no_decay))

  return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(opt, total_steps: int, params_like) -> optax.GradientTransformation:
  """AdamW (+ global-norm clipping when clip_norm > 0) from `config.optimizer`."""
  lr = schedule(opt, total_steps)
  parts = []
  if float(opt.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
  parts.append(
    optax.adamw(
      lr,
      b1=float(opt.b1),
      b2=float(opt.b2),
      eps=float(opt.eps),
      weight_decay=float(opt.weight_decay),
      mask=decay_mask(params_like, opt.no_decay),
    )
  )
  return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**30)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
