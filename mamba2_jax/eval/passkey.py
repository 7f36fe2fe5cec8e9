"""Passkey retrieval (docs/evaluation.md §4): needle in a repeated haystack, greedy 5-token answers.

Prompt = prefix + num_blocks context blocks, one replaced by the needle, + suffix, as text, then
tokenized as a whole (as the paper's code does):
  num_blocks   = (T - len(prefix) - len(suffix)) // len(block)      lengths in tokens
  needle block = int(depth * (num_blocks - 1)),  depth = (i + 0.5) / n for sample i of n
  key          = 5 digits "00000".."99999", drawn from a generator seeded by (seed, T, i)
The prompt is a bit shorter than T (the remainder of the division and the needle being shorter
than a block). Decoding: chunked prefill with the cache carried (constant memory), then
`max_new_tokens` greedy steps of `decode_step`; correct iff the key string is a substring of the
decoded new tokens. Predictions go to `preds_{T}.jsonl` as they are made; a rerun resumes from
what is there.

T_recall = the largest length whose accuracy is > threshold (default 0.95), under
`t_recall_rule`: "prefix" (default) = largest T such that every evaluated length <= T passes, so
a lucky pass after a failure does not count; "any" = the literal largest passing length. Both
are reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from mamba2_jax.data import get_tokenizer
from mamba2_jax.errors import InvalidInput
from mamba2_jax.eval import criteria, io, streaming
from mamba2_jax.eval.tasks import resolve_train_len
from mamba2_jax.generate import decode_tokens

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PasskeyPrompt:
  ids: np.ndarray  # (n_tokens,) int32
  key: str  # the 5-digit passkey
  depth: float  # relative needle depth in [0, 1]
  needle_block: int  # index of the block replaced by the needle
  num_blocks: int


class PasskeyBuilder:
  """Builds passkey prompts of a target length in tokens (see the module docstring)."""

  def __init__(
    self,
    tokenizer,
    *,
    prefix: str,
    block: str,
    needle: str,
    suffix: str,
    use_bos: bool = False,
    add_prefix_blocks: int = 0,
  ):
    if "{K}" not in needle:
      raise ValueError(f"the needle must contain {{K}} (the key): {needle!r}")
    self.tok = get_tokenizer(tokenizer)
    self.prefix, self.block, self.needle, self.suffix = prefix, block, needle, suffix
    self.add_prefix_blocks = int(add_prefix_blocks)
    n = lambda s: len(self.tok.encode(s))
    self.prefix_len, self.block_len, self.suffix_len = n(prefix), n(block), n(suffix)
    if self.block_len == 0:
      raise ValueError("the context block is empty")
    self.bos = None
    if use_bos:
      self.bos = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

  def num_blocks(self, length: int) -> int:
    nb = (int(length) - self.prefix_len - self.suffix_len) // self.block_len
    if nb < 1:
      raise ValueError(
        f"context length {length} is too short for prefix ({self.prefix_len}) + "
        f"suffix ({self.suffix_len}) + one block ({self.block_len}) tokens"
      )
    return nb

  def text(self, length: int, depth: float, key: str) -> tuple[str, int, int]:
    nb = self.num_blocks(length)
    at = int(depth * (nb - 1))
    blocks = [self.block] * nb
    blocks[at] = self.needle.replace("{K}", key)
    head = self.block * self.add_prefix_blocks
    return head + self.prefix + "".join(blocks) + self.suffix, at, nb

  def build(self, length: int, depth: float, key: str) -> PasskeyPrompt:
    text, at, nb = self.text(length, depth, key)
    ids = self.tok.encode(text)
    if self.bos is not None:
      ids = np.concatenate([[self.bos], ids])
    return PasskeyPrompt(np.asarray(ids, np.int32), key, float(depth), at, nb)


def sample_key(seed: int, length: int, idx: int) -> str:
  """Deterministic 5-digit key of sample idx at length `length` (so resuming rebuilds it)."""
  return f"{np.random.default_rng([seed, length, idx]).integers(100000):05d}"


def sample_depth(idx: int, n: int) -> float:
  return (idx + 0.5) / n


def is_correct(prediction: str, key: str) -> bool:
  """The paper's rule: the key string occurs anywhere in the decoded answer."""
  return key in prediction


def depth_bin(depth: float, n_bins: int = 10) -> int:
  """Row of the heatmap: the first upper edge (i+1)/n_bins that is >= depth."""
  return min(max(int(math.ceil(depth * n_bins - 1e-9)) - 1, 0), n_bins - 1)


def task_lengths(cfg) -> list[int]:
  if cfg.lengths:
    return sorted(int(x) for x in cfg.lengths)
  if cfg.len_step > 0:
    return list(range(cfg.min_len, cfg.max_len + 1, cfg.len_step))
  out, t = [], cfg.min_len
  while t <= cfg.max_len:
    out.append(int(t))
    t *= 2
  return out


def _answer(
  model, tok, prompts: list[PasskeyPrompt], batch_size: int, chunk_len: int, max_new_tokens: int
) -> list[str]:
  """Greedy answers of equal-length prompts (padded with copies to batch_size rows, so every
  batch of a length has one shape)."""
  ids = np.stack([p.ids for p in prompts])
  rows = ids.shape[0]
  if rows < batch_size:
    ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - rows, axis=0)])
  last, cache = streaming.prefill_stream(model, ids, chunk_len)
  new, _ = decode_tokens(
    model, last, cache, jax.random.key(0), max_new_tokens=max_new_tokens, temperature=0.0
  )
  new = np.asarray(new)
  return [tok.decode(new[r]) for r in range(rows)]


def evaluate_length(
  model, builder: PasskeyBuilder, length: int, cfg, out: Path, bar=None
) -> list[dict]:
  """All predictions of one length, resuming `preds_{length}.jsonl`; returns its rows."""
  path = out / f"preds_{length}.jsonl"
  rows = io.read_jsonl(path)
  done = {}
  for r in rows:
    idx = int(r["idx"])
    depth = r.get("relative_position", r.get("relative_postion"))
    if r["ground_truth"] != sample_key(cfg.seed, length, idx) or (
      idx < cfg.num_samples and abs(depth - sample_depth(idx, cfg.num_samples)) > 1e-9
    ):
      raise InvalidInput(
        f"{path}: sample {idx} (key {r['ground_truth']}, depth {depth}) was made "
        f"with another seed or num_samples than this config (seed {cfg.seed}, "
        f"num_samples {cfg.num_samples}); use another --out or delete the file"
      )
    done[idx] = r
  todo = [i for i in range(cfg.num_samples) if i not in done]
  if bar is not None:
    bar.update(cfg.num_samples - len(todo))
  groups: dict[int, list[tuple[int, PasskeyPrompt]]] = {}
  for i in todo:
    p = builder.build(length, sample_depth(i, cfg.num_samples), sample_key(cfg.seed, length, i))
    groups.setdefault(p.ids.size, []).append((i, p))
  for items in groups.values():
    for lo in range(0, len(items), cfg.batch_size):
      batch = items[lo : lo + cfg.batch_size]
      preds = _answer(
        model, builder.tok, [p for _, p in batch], cfg.batch_size, cfg.chunk_len, cfg.max_new_tokens
      )
      new_rows = [
        {
          "idx": i,
          "prediction": pred,
          "ground_truth": p.key,
          "relative_position": p.depth,
          "needle_block": p.needle_block,
          "num_blocks": p.num_blocks,
          "num_tokens": int(p.ids.size),
          "correct": is_correct(pred, p.key),
        }
        for (i, p), pred in zip(batch, preds)
      ]
      io.append_jsonl(path, new_rows)
      for r in new_rows:
        done[r["idx"]] = r
      if bar is not None:
        bar.update(len(new_rows))
  return [done[i] for i in sorted(done) if i < cfg.num_samples]


def aggregate(per_length: dict[int, list[dict]], n_bins: int, threshold: float, rule: str) -> dict:
  """Accuracy per length, the depth-bin x length grid (n_bins, n_lengths) and T_recall."""
  lengths = sorted(per_length)
  grid = np.full((n_bins, len(lengths)), np.nan)
  acc = []
  for j, length in enumerate(lengths):
    rows = per_length[length]
    correct = np.array([is_correct(r["prediction"], r["ground_truth"]) for r in rows], float)
    acc.append(float(correct.mean()) if rows else float("nan"))
    bins = np.array(
      [depth_bin(r.get("relative_position", r.get("relative_postion", 0.0)), n_bins) for r in rows],
      int,
    )
    for i in range(n_bins):
      if (bins == i).any():
        grid[i, j] = correct[bins == i].mean()
  ok = [a > threshold for a in acc]
  return {
    "lengths": lengths,
    "accuracy": acc,
    "grid": grid,
    "threshold": threshold,
    "t_recall": criteria.largest_passing(lengths, ok, rule),
    "t_recall_rule": rule,
    "t_recall_prefix": criteria.largest_passing(lengths, ok, "prefix"),
    "t_recall_any": criteria.largest_passing(lengths, ok, "any"),
  }


def last_r_accuracy(grid: np.ndarray, lengths: list[int], r: int) -> list[float | None]:
  """Accuracy with the needle in the last r tokens: mean of the last floor(r / T * rows) rows of
  each column (None where that is 0 rows or more than all rows), as the paper's acc curve."""
  out = []
  n_rows = grid.shape[0]
  for j, length in enumerate(lengths):
    k = int(r / length * n_rows)
    cells = grid[-k:, j] if 0 < k <= n_rows else np.array([np.nan])
    out.append(float(np.nanmean(cells)) if np.isfinite(cells).any() else None)
  return out


def run_passkey(model, tokenizer, cfg, out_dir, *, train_len=None) -> dict:
  """Passkey grid over task_lengths(cfg) x depths; writes preds_*.jsonl, results.json,
  heatmap.png, accuracy.png. Returns {"summary", "lengths", "accuracy", "grid" (bins, lengths),
  "t_recall", ...}."""
  tok = get_tokenizer(tokenizer)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  train_len = resolve_train_len(train_len, cfg)
  builder = PasskeyBuilder(
    tok,
    prefix=cfg.prefix,
    block=cfg.block,
    needle=cfg.needle,
    suffix=cfg.suffix,
    use_bos=cfg.use_bos,
    add_prefix_blocks=cfg.add_prefix_blocks,
  )
  lengths = task_lengths(cfg)
  t0 = time.perf_counter()
  per_length = {}
  with tqdm(
    total=len(lengths) * cfg.num_samples, desc="passkey", disable=not cfg.progress, mininterval=1.0
  ) as bar:
    for length in lengths:
      bar.set_postfix(length=length)
      per_length[length] = evaluate_length(model, builder, length, cfg, out, bar)
  agg = aggregate(per_length, cfg.depth_bins, cfg.threshold, cfg.t_recall_rule)
  max_len = max(lengths)
  rs = [1 << k for k in range(max_len.bit_length()) if max_len / 16 <= 1 << k <= max_len / 2]
  agg["last_r"] = {str(r): last_r_accuracy(agg["grid"], agg["lengths"], r) for r in rs}
  summary = {
    "t_recall": agg["t_recall"],
    "t_recall_any": agg["t_recall_any"],
    "mean_accuracy": float(np.nanmean(agg["accuracy"])),
    "accuracy_at_train_len": (
      agg["accuracy"][agg["lengths"].index(train_len)] if train_len in agg["lengths"] else None
    ),
  }
  results = {
    "task": "passkey",
    "config": cfg,
    "train_len": train_len,
    "seconds": time.perf_counter() - t0,
    "summary": summary,
    **agg,
    "prompt_tokens": {
      L: [min(r["num_tokens"] for r in per_length[L]), max(r["num_tokens"] for r in per_length[L])]
      for L in lengths
      if per_length[L]
    },
  }
  results["plots"] = plot(results, out)
  io.write_json(out / "results.json", results)
  log.info(
    "passkey: T_recall %s (rule %s), mean accuracy %.3f",
    agg["t_recall"],
    cfg.t_recall_rule,
    summary["mean_accuracy"],
  )
  return results


def plot(results: dict, out: Path) -> list[str]:
  """heatmap.png (the paper's plot.py: RdYlGn, vmin -0.2, vmax 1.2, depth rows 0-100 %; with a
  colour bar of the accuracy) and
  accuracy.png (accuracy vs length, last-r curves, T_train and T_recall marked)."""
  from mamba2_jax.eval.plotting import fmt_tokens, mark_train_len, plt, save

  lengths, grid = results["lengths"], np.asarray(results["grid"], float)
  n_rows = grid.shape[0]
  fig, ax = plt.subplots(figsize=(max(2.8, 0.25 * len(lengths) + 1.8), 2.2))
  im = ax.imshow(
    np.ma.masked_invalid(grid),
    cmap="RdYlGn",
    vmin=-0.2,
    vmax=1.2,
    aspect="auto",
    interpolation="nearest",
    extent=(0, len(lengths), n_rows, 0),
  )
  ticks = [j for j, L in enumerate(lengths) if L == lengths[0] or L & (L - 1) == 0]
  ax.set_xticks(
    [j + 0.5 for j in ticks], [fmt_tokens(lengths[j]) for j in ticks], rotation=45, fontsize=7
  )
  ax.set_yticks([0, n_rows / 2, n_rows], ["0", "50", "100"], fontsize=7)
  ax.set_xlabel("Context Len.", fontsize=8)
  ax.set_ylabel("Ans. Depth (%)", fontsize=8)
  bar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03)  # the cells' accuracy, 0 .. 1
  bar.set_ticks([0.0, 0.5, 1.0])
  bar.ax.tick_params(labelsize=6)
  bar.set_label("accuracy", fontsize=7)
  paths = [save(fig, out / "heatmap.png", dpi=300)]

  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(lengths, results["accuracy"], marker="o", color="black", label="all depths")
  for r, acc in results["last_r"].items():
    xs = [L for L, a in zip(lengths, acc) if a is not None]
    ys = [a for a in acc if a is not None]
    if xs:
      ax.plot(xs, ys, marker=".", linewidth=0.8, label=f"needle in last {fmt_tokens(int(r))}")
  ax.axhline(results["threshold"], color="0.5", linestyle=":", linewidth=1)
  mark_train_len(ax, results["train_len"])
  if results["t_recall"]:
    ax.axvline(
      results["t_recall"],
      color="C2",
      linestyle="-.",
      linewidth=1,
      label=f"T_recall {fmt_tokens(results['t_recall'])}",
    )
  if len(lengths) > 1 and lengths[-1] / lengths[0] >= 8:
    ax.set_xscale("log", base=2)
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("accuracy")
  ax.legend(fontsize=6)
  paths.append(save(fig, out / "accuracy.png"))
  return paths
