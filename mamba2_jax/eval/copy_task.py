"""The synthetic copy task far beyond the training length (docs/demo.md).

Input: BOS then a long stream of fresh pairs [S S] of `span` random ids (2..vocab-1), built by
`mamba2_jax.data.synthetic.copy_stream`; the model was trained on `synthetic:copy` data. Only
the copied halves are predictable from the context, so the loss and the argmax accuracy are
measured on them (chance loss ln(vocab - 2)). A model that never had to forget during training
(one pair per training sequence) copies inside T_train and fails right after it; one trained on
several pairs per sequence keeps copying. Per bucket of positions: the mean copied-half loss
and accuracy over prompts; the paper's forgetting test (§2.4) on the copied-half loss curve,
whose verdict is "not learned" when the copied-half loss within T_train is not clearly below
chance (`criteria.is_learned`). bucket_size 0 derives it from T_train.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mamba2_jax.data import get_tokenizer
from mamba2_jax.data.synthetic import copy_stream, pairs_for
from mamba2_jax.eval import criteria, io, streaming
from mamba2_jax.eval.tasks import resolve_train_len

log = logging.getLogger(__name__)


def copied_half_scores(
  model,
  vocab: int,
  span: int,
  length: int,
  num_prompts: int,
  batch_size: int,
  chunk_len: int,
  seed: int,
  bucket_size: int,
  progress: bool = True,
):
  """Per-bucket sums over prompts of (loss, correct, count) on copied positions.

  Returns three (ceil((length-1)/bucket_size),) float64 arrays. Positions index the predicting
  token (loss[i] scores token i+1).
  """
  n_pairs = pairs_for(length, span)
  K = -(-(2 * span * n_pairs) // bucket_size)
  loss_s, corr_s, cnt_s = (np.zeros((1, K)) for _ in range(3))
  with tqdm(total=num_prompts, desc="copy_task", unit="prompt", disable=not progress) as bar:
    for lo in range(0, num_prompts, batch_size):
      rows = [
        copy_stream(vocab, span, n_pairs, seed + i)
        for i in range(lo, min(num_prompts, lo + batch_size))
      ]
      tokens = np.stack([t for t, _ in rows])
      masks = np.stack([m for _, m in rows])[:, :-1]
      for piece in streaming.iter_token_scores(model, tokens, chunk_len):
        sl = slice(piece.start, piece.start + piece.loss.shape[1])
        m = masks[:, sl]
        right = piece.pred == tokens[:, 1:][:, sl]
        for arr, vals in ((loss_s, np.where(m, piece.loss, 0.0)), (corr_s, m & right), (cnt_s, m)):
          criteria.add_to_buckets(
            arr, piece.start, np.sum(vals, axis=0, keepdims=True, dtype=np.float64), bucket_size
          )
      bar.update(len(rows))
  return loss_s[0], corr_s[0], cnt_s[0]


def run_copy_task(model, tokenizer, cfg, out_dir, *, train_len=None) -> dict:
  """Copied-half loss/accuracy by position; writes results.json and copy_task.png."""
  tok = get_tokenizer(tokenizer)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  train_len = resolve_train_len(train_len, cfg)
  vocab = int(cfg.vocab or tok.vocab_size)
  bucket = criteria.resolve_bucket_size(cfg.bucket_size, train_len)
  t0 = time.perf_counter()
  loss_s, corr_s, cnt_s = copied_half_scores(
    model,
    vocab,
    int(cfg.span),
    int(cfg.max_len),
    int(cfg.num_prompts),
    int(cfg.batch_size),
    int(cfg.chunk_len),
    int(cfg.seed),
    bucket,
    cfg.progress,
  )
  seconds = time.perf_counter() - t0
  n = loss_s.size * bucket
  start, end = criteria.bucket_edges(n, bucket)
  start, end = start[: loss_s.size], end[: loss_s.size]
  has = cnt_s > 0
  loss = np.where(has, loss_s / np.maximum(cnt_s, 1), np.nan)
  acc = np.where(has, corr_s / np.maximum(cnt_s, 1), np.nan)
  b = criteria.Buckets(start[has], end[has], loss[has])
  chance = math.log(vocab - 2)
  test = criteria.forgetting_test(b, train_len, cfg.forget_factor, chance)
  criteria.advise_bucket_size(test, bucket, False)
  within = b.end <= train_len if train_len else np.zeros(b.start.size, bool)
  a = acc[has]
  summary = {
    "forget_verdict": test["verdict"],
    "forget_test_passed": test["passed"],
    "learned": test["learned"],
    "first_fail_position": test["first_fail_position"],
    "chance_loss": chance,
    "copy_loss_within_train": float(np.mean(b.mean[within])) if within.any() else None,
    "copy_loss_beyond_train": float(np.mean(b.mean[~within])) if (~within).any() else None,
    "copy_acc_within_train": float(np.mean(a[within])) if within.any() else None,
    "copy_acc_beyond_train": float(np.mean(a[~within])) if (~within).any() else None,
    "copy_loss_last_bucket": float(b.mean[-1]),
    "tokens_per_s": int(cfg.num_prompts) * (int(cfg.max_len) - 1) / seconds,
  }
  results = {
    "task": "copy_task",
    "config": cfg,
    "train_len": train_len,
    "bucket_size": bucket,
    "vocab": vocab,
    "seconds": seconds,
    "summary": summary,
    "forgetting": test,
    "buckets": {"start": b.start, "end": b.end, "loss": b.mean, "accuracy": a},
  }
  results["plots"] = [plot(results, out)]
  io.write_json(out / "results.json", results)
  log.info(
    "copy_task: copied-half loss within T_train %s, beyond %s (chance %.2f); forget test %s",
    summary["copy_loss_within_train"],
    summary["copy_loss_beyond_train"],
    chance,
    criteria.describe(test),
  )
  return results


def plot(results: dict, out: Path) -> str:
  from mamba2_jax.eval.plotting import mark_train_len, plt, save

  b = results["buckets"]
  x = (np.asarray(b["start"]) + np.asarray(b["end"])) / 2.0
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
  ax1.plot(x, b["loss"], marker=".", label="copied-half loss")
  ax1.axhline(results["summary"]["chance_loss"], color="0.5", linestyle=":", label="chance")
  ax2.plot(x, b["accuracy"], marker=".", color="C2", label="copied-half accuracy")
  for ax in (ax1, ax2):
    mark_train_len(ax, results["train_len"])
    ax.set_xscale("log")
    ax.set_xlabel("position (tokens)")
    ax.legend(fontsize=7)
  ax1.set_ylabel("loss (nats)")
  ax2.set_ylabel("accuracy")
  ax2.set_ylim(-0.02, 1.02)
  fig.suptitle("copy task: fresh pairs far beyond the training length", fontsize=9)
  return save(fig, out / "copy_task.png")
