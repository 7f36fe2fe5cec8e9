"""State statistics over positions (docs/evaluation.md §2.5): SSM state norms, retention
alpha_{1:t}, input statistics (dt, B, C, x) per layer and head, and "exploding heads".

The prompt is fed in jitted pieces of `chunk_len` tokens; inside a piece a `lax.scan` runs
sub-chunks of `stat_chunk` tokens through `introspect.forward_with_internals` and reduces, per
sub-chunk, the state in the carried cache and the layer internals to small statistics, so only
(n_layer, H)-sized arrays per stat point ever reach the host. Positions t are token counts: the
state at t is the cache after tokens 0..t-1; the prompt is cut to a multiple of stat_chunk.

Definitions (per layer l, head h, batch-averaged):
  state rms  = sqrt(mean(h_t^2)) over the (P, N) entries; norm = Frobenius ||h_t||;
  mean, var  = mean and unbiased variance of the P*N entries;
  retention  alpha_{1:t} = prod_{j=1..t} alpha_j = exp(sum_j dt_j A) (log space, float64 sums);
  dt mean    = mean of dt over the sub-chunk's tokens (per head);
  B/C mean, var = over the G*N channels per token, averaged over the sub-chunk (per layer);
  x mean, var = over the P channels of a head per token, averaged over the sub-chunk;
  conv mean, var = over all entries of the layer's conv state (x|B|C, d_conv-1 taps).
Exploding head: max_{t > T_train} norm / max_{t <= T_train} norm > explode_factor.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mamba2_jax.data import get_tokenizer
from mamba2_jax.eval import introspect, io
from mamba2_jax.eval.prompts import config_prompts
from mamba2_jax.eval.tasks import resolve_train_len

log = logging.getLogger(__name__)

STATE_STATS = ("rms", "norm", "mean", "var")
INPUT_STATS = (
  "dt_mean",
  "B_mean",
  "B_var",
  "C_mean",
  "C_var",
  "x_mean",
  "x_var",
  "conv_mean",
  "conv_var",
)


def _unbiased_var(a, axes):
  n = np.prod([a.shape[ax] for ax in axes])
  return jnp.var(a, axis=axes) * (n / max(n - 1, 1))


def _layer_stats(it: introspect.Internals, lc) -> dict:
  """Per-layer statistics of one sub-chunk (see the module docstring); batch-averaged."""
  f32 = jnp.float32
  h = lc.ssm.astype(f32)  # (b, H, P, N)
  bsz, s = it.dt.shape[:2]
  Bf = it.B.astype(f32).reshape(bsz, s, -1)
  Cf = it.C.astype(f32).reshape(bsz, s, -1)
  xf = it.x.astype(f32)
  conv = jnp.concatenate([lc.conv_x, lc.conv_B, lc.conv_C], -1).astype(f32)  # (b, K-1, conv)
  return {
    "rms": jnp.sqrt(jnp.mean(h * h, axis=(-2, -1))).mean(0),
    "norm": jnp.sqrt(jnp.sum(h * h, axis=(-2, -1))).mean(0),
    "mean": jnp.mean(h, axis=(-2, -1)).mean(0),
    "var": _unbiased_var(h, (-2, -1)).mean(0),
    "log_decay_sum": it.log_decay.sum(1).mean(0),  # (H,)
    "dt_mean": it.dt.mean((0, 1)),
    "B_mean": Bf.mean(-1).mean(),
    "B_var": _unbiased_var(Bf, (-1,)).mean(),
    "C_mean": Cf.mean(-1).mean(),
    "C_var": _unbiased_var(Cf, (-1,)).mean(),
    "x_mean": xf.mean(-1).mean((0, 1)),
    "x_var": _unbiased_var(xf, (-1,)).mean((0, 1)),
    "conv_mean": conv.mean(),
    "conv_var": _unbiased_var(conv, (0, 1, 2)),
  }


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def _stats_piece(graphdef, state, tokens, cache):
  """tokens (b, n_sub, stat_chunk) -> (stats with leading axes (n_sub, n_layer), cache)."""
  model = nnx.merge(graphdef, state)

  def body(cache, toks):
    _, cache, stats = introspect.forward_with_internals(model, toks, cache, reduce=_layer_stats)
    return cache, stats

  cache, stats = jax.lax.scan(body, cache, jnp.swapaxes(tokens, 0, 1))
  return stats, cache


def collect(
  model,
  tokens: np.ndarray,
  stat_chunk: int,
  chunk_len: int,
  *,
  snapshot_at=(),
  snapshot=(0, 0),
  progress=True,
) -> tuple[dict, dict]:
  """Streams tokens (b, L) -> (stats dict of float64 arrays (points, n_layer[, H]), snapshots
  {position: (b, P, N) state of layer/head `snapshot` after `position` tokens}).

  L is cut to a multiple of stat_chunk; chunk_len is rounded down to a multiple of it.
  """
  b, L = tokens.shape
  L -= L % stat_chunk
  if L == 0:
    raise ValueError(f"the prompt is shorter than stat_chunk={stat_chunk}")
  piece = max(chunk_len // stat_chunk, 1) * stat_chunk
  graphdef, state = nnx.split(model)
  cache = model.init_cache(b)
  parts, snaps, pending = [], {}, None
  want = set(int(p) for p in snapshot_at)
  with tqdm(
    total=b * L,
    desc="state_stats",
    unit="tok",
    unit_scale=True,
    disable=not progress,
    mininterval=1.0,
  ) as bar:
    for start in range(0, L, piece):
      n = min(piece, L - start)
      toks = jnp.asarray(tokens[:, start : start + n].reshape(b, n // stat_chunk, stat_chunk))
      stats, cache = _stats_piece(graphdef, state, toks, cache)
      if start + n in want:
        layer, head = snapshot
        snaps[start + n] = np.asarray(cache.ssm[layer, :, head])
      if pending is not None:
        parts.append(jax.device_get(pending))
      pending = stats
      bar.update(b * n)
    parts.append(jax.device_get(pending))
  stats = {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts]) for k in parts[0]}
  return stats, snaps


def exploding_heads(
  norm: np.ndarray, positions: np.ndarray, train_len: int | None, factor: float
) -> tuple[np.ndarray, list[dict]]:
  """norm (points, n_layer, H) -> (ratio (n_layer, H): max beyond / max within T_train, NaN
  without points on both sides; flagged heads [{layer, head, ratio}] with ratio > factor)."""
  shape = norm.shape[1:]
  if not train_len or not (positions <= train_len).any() or not (positions > train_len).any():
    return np.full(shape, np.nan), []
  within = norm[positions <= train_len].max(axis=0)
  beyond = norm[positions > train_len].max(axis=0)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(within > 0, beyond / within, np.inf)
  flagged = [
    {"layer": int(l), "head": int(h), "ratio": float(ratio[l, h])}
    for l, h in zip(*np.nonzero(~(ratio <= factor)))
  ]
  return ratio, sorted(flagged, key=lambda d: -d["ratio"] if np.isfinite(d["ratio"]) else -1e300)


def run_state_stats(model, tokenizer, cfg, out_dir, *, train_len=None) -> dict:
  """State statistics over positions; writes results.json, stats.npz and PNGs (state_norm,
  retention, explosion_ratio, inputs, state_hist). Returns the summary, positions, flagged heads
  and the explosion ratios (n_layer, H); the full curves are in stats.npz."""
  tok = get_tokenizer(tokenizer)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  train_len = resolve_train_len(train_len, cfg)
  mc = model.config
  tokens = np.stack(list(config_prompts(cfg, tok)[1]))  # (num_prompts, max_len): one batch
  L = tokens.shape[1] - tokens.shape[1] % cfg.stat_chunk
  plot_layers = [int(l) for l in cfg.plot_layers] or [int(0.8 * mc.n_layer)]
  plot_heads = [int(h) for h in cfg.plot_heads] or list(range(min(8, mc.nheads)))
  hist = (
    plot_layers[0] if cfg.hist_layer < 0 else int(cfg.hist_layer),
    min(int(cfg.hist_head), mc.nheads - 1),
  )
  snap_at = [int(p) for p in cfg.hist_positions] or [p for p in (train_len, L) if p]
  t0 = time.perf_counter()
  stats, snaps = collect(
    model,
    tokens,
    cfg.stat_chunk,
    cfg.chunk_len,
    snapshot_at=snap_at,
    snapshot=hist,
    progress=cfg.progress,
  )
  seconds = time.perf_counter() - t0
  positions = (np.arange(stats["rms"].shape[0]) + 1) * cfg.stat_chunk
  stats["log_retention"] = np.cumsum(stats.pop("log_decay_sum"), axis=0)  # (points, n_layer, H)
  ratio, flagged = exploding_heads(stats["norm"], positions, train_len, cfg.explode_factor)
  np.savez_compressed(
    out / "stats.npz",
    positions=positions,
    explosion_ratio=ratio,
    **{k: v.astype(np.float32) if k != "log_retention" else v for k, v in stats.items()},
    **{f"state_snapshot_{p}": v for p, v in snaps.items()},
  )
  at = lambda t: int(np.argmin(np.abs(positions - t)))
  summary = {
    "num_exploding_heads": len(flagged) if train_len else None,
    "max_explosion_ratio": float(np.nanmax(ratio)) if np.isfinite(ratio).any() else None,
    "max_state_norm": float(stats["norm"].max()),
    "max_state_norm_within_train": (
      float(stats["norm"][positions <= train_len].max())
      if train_len and (positions <= train_len).any()
      else None
    ),
    "tokens_per_s": tokens.shape[0] * L / seconds,
  }
  results = {
    "task": "state_stats",
    "config": cfg,
    "train_len": train_len,
    "seconds": seconds,
    "summary": summary,
    "positions": positions,
    "exploding_heads": flagged,
    "explosion_ratio": ratio,
    "plot_layers": plot_layers,
    "plot_heads": plot_heads,
    "retention_at_train_len": (
      np.exp(stats["log_retention"][at(train_len)]) if train_len else None
    ),
    "retention_at_end": np.exp(stats["log_retention"][-1]),
    "histogram": {"layer": hist[0], "head": hist[1], "positions": sorted(snaps)},
  }
  from mamba2_jax.eval import state_plots  # pylint: disable=g-import-not-at-top

  results["plots"] = state_plots.plot_all(stats, positions, snaps, results, out)
  io.write_json(out / "results.json", results)
  log.info(
    "state_stats: %s exploding heads (factor %g), max ratio %s",
    len(flagged),
    cfg.explode_factor,
    summary["max_explosion_ratio"],
  )
  return results
