"""Loss / ppl by position and the "has it learned to forget" test (docs/evaluation.md §2.3-2.4).

Per-token next-token losses of long prompts (streamed, constant memory) are averaged over the
prompts, bucketed by position and plotted; the forgetting test FAILs if the bucketed mean loss
anywhere exceeds `forget_factor` x the maximum bucketed loss within the first T_train positions.
Positions are the index i of the predicting token (loss[i] scores token i+1 given 0..i), so
"within T_train" means i < T_train, the positions a model trained on T_train-token sequences saw.
A model whose mean loss within T_train is not clearly below chance, ln(vocab_size), has no
verdict: "not learned" (`criteria.is_learned`). bucket_size 0 derives the bucket size from T_train
(`criteria.default_bucket_size`: at least two buckets within T_train).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from mamba2_jax.data import get_tokenizer
from mamba2_jax.eval import criteria, io, prompts, streaming
from mamba2_jax.eval.tasks import resolve_train_len

log = logging.getLogger(__name__)


def prompt_bucket_sums(
  model,
  prompt_iter: Iterable[np.ndarray],
  n: int,
  length: int,
  chunk_len: int,
  batch_size: int,
  bucket_size: int,
  progress=True,
) -> np.ndarray:
  """Streams n prompts of `length` tokens in batches -> per-prompt loss sums per position bucket
  (n, ceil((length-1) / bucket_size)) float64 (positions 0 .. length-2, none dropped).

  Host memory: one batch of prompts plus the (n, K) sums; no per-position array is kept.
  """
  n_buckets = -(-(length - 1) // bucket_size)
  sums = np.zeros((n, n_buckets), np.float64)
  rows = iter(prompt_iter)
  with tqdm(
    total=n * (length - 1),
    desc="ppl_by_position",
    unit="tok",
    unit_scale=True,
    disable=not progress,
    mininterval=1.0,
  ) as bar:
    for lo in range(0, n, batch_size):
      batch = np.stack([next(rows) for _ in range(min(batch_size, n - lo))])
      for piece in streaming.iter_token_scores(model, batch, chunk_len):
        criteria.add_to_buckets(
          sums[lo : lo + batch.shape[0]], piece.start, piece.loss.astype(np.float64), bucket_size
        )
        bar.update(batch.shape[0] * piece.loss.shape[1])
  return sums


def run_ppl_by_position(model, tokenizer, cfg, out_dir, *, train_len=None) -> dict:
  """Loss/perplexity by position of `cfg.prompt` prompts; writes results.json, loss.png, ppl.png.

  Returns {"summary": {...key metrics...}, "forgetting": forgetting_test(...), "buckets": {start,
  end, loss, ppl}, ...}. Shapes: bucket arrays (K,), per-prompt bucket losses (n, K).
  """
  tok = get_tokenizer(tokenizer)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  train_len = resolve_train_len(train_len, cfg)
  L = int(cfg.max_len)
  if L < 2:
    raise ValueError(f"max_len must be >= 2, got {L}")
  bucket = criteria.resolve_bucket_size(cfg.bucket_size, train_len)
  chance = math.log(tok.vocab_size)
  n, prompt_iter = prompts.config_prompts(cfg, tok)
  log.info("ppl_by_position: %d prompt(s) of %d tokens (%s), bucket %d", n, L, cfg.prompt, bucket)
  t0 = time.perf_counter()
  sums = prompt_bucket_sums(
    model, prompt_iter, n, L, cfg.chunk_len, cfg.batch_size, bucket, cfg.progress
  )
  seconds = time.perf_counter() - t0
  kw = dict(drop_first=cfg.drop_first_bucket, drop_last=cfg.drop_last_bucket)
  prompt_buckets = criteria.buckets_from_sums(sums, L - 1, bucket, **kw).mean
  buckets = criteria.buckets_from_sums(sums.mean(axis=0), L - 1, bucket, **kw)
  test = criteria.forgetting_test(buckets, train_len, cfg.forget_factor, chance)
  criteria.advise_bucket_size(test, bucket, cfg.drop_first_bucket)
  within = buckets.end <= train_len if train_len else np.zeros(buckets.start.size, bool)
  summary = {
    "forget_verdict": test["verdict"],
    "forget_test_passed": test["passed"],
    "learned": test["learned"],
    "chance_loss": chance,
    "first_fail_position": test["first_fail_position"],
    "max_loss_within_train": test["reference_loss"],
    "max_loss": test["max_loss"],
    "mean_loss": float(sums.sum() / (n * (L - 1))),
    "mean_loss_within_train": float(np.mean(buckets.mean[within])) if within.any() else None,
    "mean_loss_beyond_train": (
      float(np.mean(buckets.mean[~within])) if train_len and (~within).any() else None
    ),
    "tokens_per_s": n * (L - 1) / seconds,
  }
  results = {
    "task": "ppl_by_position",
    "config": cfg,
    "train_len": train_len,
    "bucket_size": bucket,
    "num_prompts": n,
    "num_positions": L - 1,
    "seconds": seconds,
    "summary": summary,
    "forgetting": test,
    "buckets": {
      "start": buckets.start,
      "end": buckets.end,
      "loss": buckets.mean,
      "ppl": np.exp(np.minimum(buckets.mean, 700.0)),
    },
  }
  np.savez_compressed(
    out / "buckets.npz",
    start=buckets.start,
    end=buckets.end,
    loss=buckets.mean,
    per_prompt_loss=prompt_buckets,
  )
  if prompt_buckets.size <= 100_000:  # else only in buckets.npz
    results["per_prompt_bucket_loss"] = prompt_buckets
  results["plots"] = plot(results, out, cfg)
  io.write_json(out / "results.json", results)
  log.info(
    "ppl_by_position: forget test %s; %.0f tok/s", criteria.describe(test), summary["tokens_per_s"]
  )
  return results


def plot(results: dict, out: Path, cfg) -> list[str]:
  """loss.png and ppl.png: bucketed mean curve vs position, T_train marked, threshold dotted."""
  from mamba2_jax.eval.plotting import fmt_tokens, mark_train_len, plt, save

  b = results["buckets"]
  x = (np.asarray(b["start"]) + np.asarray(b["end"])) / 2.0
  test, train_len = results["forgetting"], results["train_len"]
  paths = []
  for name, y, ymax in (("loss", b["loss"], cfg.loss_ymax), ("ppl", b["ppl"], cfg.ppl_ymax)):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    per = results.get("per_prompt_bucket_loss", ())
    if 1 < len(per) <= 32:
      for row in per:
        ax.plot(
          x, row if name == "loss" else np.exp(np.minimum(row, 700.0)), color="0.8", linewidth=0.5
        )
    ax.plot(x, y, color="C0", linewidth=1.2, label=f"mean of {results['num_prompts']}")
    mark_train_len(ax, train_len)
    if test["threshold"] is not None:
      thr = test["threshold"] if name == "loss" else np.exp(min(test["threshold"], 700.0))
      ax.axhline(
        thr,
        color="0.4",
        linestyle=":",
        linewidth=1,
        label=f"{test['factor']:g}x max loss within train len",
      )
    if test["first_fail_position"] is not None:
      ax.axvline(
        test["first_fail_position"],
        color="black",
        linestyle=":",
        linewidth=1,
        label=f"first fail {fmt_tokens(test['first_fail_position'])}",
      )
    if cfg.log_x:
      ax.set_xscale("log")
    if ymax:
      ax.set_ylim(0, ymax)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("loss (nats)" if name == "loss" else "perplexity")
    ax.set_title(f"{name} by position, {cfg.prompt}, bucket {results['bucket_size']}")
    ax.legend(fontsize=7)
    paths.append(save(fig, out / f"{name}.png"))
  return paths
