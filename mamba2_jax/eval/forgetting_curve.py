"""Forgetting curve (docs/evaluation.md §6): copy vs LM accuracy by dependency length L.

For each L and repeat, with S = L tokens and R = L irrelevant tokens:
  copy = [BOS] S [BOS] S [EOS]        LM = [BOS] R [BOS] S [EOS]        (2L + 3 tokens)
Teacher forced in one streaming pass; the score is the argmax next-token accuracy on the LAST
ceil(L/2) tokens of the second S (positions 2L + 2 - ceil(L/2) .. 2L + 1; the first half is an
in-context copy demonstration). copy accuracy = memory + language modelling, LM accuracy = the
language model alone. S is "order" (a contiguous span of a corpus stream at an offset uniform in
[0, len - 3L]; R = the stream's last L tokens, as the reference) or "random" (ids uniform in
[random_low, random_high]; R fresh random).

Per L: mean +- std (population std, as the reference) over repeats and the paired t-test
scipy.stats.ttest_rel(lm, copy) (NaN, e.g. identical samples, => p = 1).
  fine-grained memory length   = largest L with mean copy accuracy >= fine_threshold
  coarse-grained memory length = largest L with copy mean > LM mean and p < p_threshold
both under `rule` (criteria.largest_passing: "prefix" = every shorter evaluated L passes too).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mamba2_jax.data import get_tokenizer
from mamba2_jax.eval import criteria, io, prompts, streaming
from mamba2_jax.eval.tasks import resolve_train_len

log = logging.getLogger(__name__)


def build_pair(S: np.ndarray, R: np.ndarray, bos: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
  """(copy, lm) int32 sequences of length 2L + 3 for S, R of length L."""
  S, R = np.asarray(S, np.int32), np.asarray(R, np.int32)
  if S.shape != R.shape or S.ndim != 1:
    raise ValueError(f"S and R must be 1-D of equal length, got {S.shape} and {R.shape}")
  b, e = np.int32([bos]), np.int32([eos])
  return np.concatenate([b, S, b, S, e]), np.concatenate([b, R, b, S, e])


def scored_positions(L: int) -> np.ndarray:
  """Token positions scored in a length-(2L+3) sequence: the last ceil(L/2) of the second S."""
  end = 2 * L + 2  # one past the second S (positions L+2 .. 2L+1)
  return np.arange(end - (L + 1) // 2, end)


def accuracy(seqs: np.ndarray, preds: np.ndarray, L: int) -> np.ndarray:
  """Per-row accuracy (b,) of argmax predictions preds (b, 2L+2) (preds[:, i] predicts token
  i+1) on the scored positions of seqs (b, 2L+3)."""
  pos = scored_positions(L)
  return (preds[:, pos - 1] == seqs[:, pos]).mean(axis=1)


def dependency_lengths(cfg) -> list[int]:
  if cfg.spacing == "linear":
    ls = np.linspace(cfg.min_dep_len, cfg.max_dep_len, cfg.num_lengths, dtype=int)
  elif cfg.spacing == "log":
    ls = np.geomspace(cfg.min_dep_len, cfg.max_dep_len, cfg.num_lengths, dtype=int)
  else:
    raise ValueError(f"spacing must be linear or log, got {cfg.spacing!r}")
  return sorted(set(int(x) for x in ls if x >= 1))


def random_range(tok, low: int, high: int) -> tuple[int, int]:
  """[low, high] of random ids; high -1 = min(31999, the last id before the first special id
  above low, or vocab_size - 1)."""
  if high >= 0:
    return int(low), int(high)
  specials = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None and i > low]
  top = (min(specials) - 1) if specials else tok.vocab_size - 1
  return int(low), int(min(31999, top))


class Sampler:
  """Draws (S, R) pairs of a length; deterministic given the seed."""

  def __init__(self, cfg, tok, max_len: int):
    self.rng = np.random.default_rng(cfg.seed)
    self.kind = cfg.data_type
    self.filler = (
      cfg.filler if cfg.filler != "auto" else ("corpus" if cfg.data_type == "order" else "random")
    )
    self.low, self.high = random_range(tok, cfg.random_low, cfg.random_high)
    self.stream = None
    if self.kind == "order" or self.filler == "corpus":
      self.stream = prompts.corpus_stream(
        cfg.data,
        tok,
        3 * max_len,
        tfds_data_dir=cfg.get("tfds_data_dir") or None,
        tfds_text_key=cfg.get("tfds_text_key") or None,
      )
      if self.stream.size < 3 * max_len:
        raise ValueError(
          f"{cfg.data}: {self.stream.size} tokens, the order protocol needs "
          f">= 3 * max_dep_len = {3 * max_len}"
        )
    if self.kind not in ("order", "random") or self.filler not in ("corpus", "random"):
      raise ValueError(
        f"data_type must be order|random and filler auto|corpus|random, got "
        f"{self.kind!r}, {self.filler!r}"
      )

  def _random(self, L):
    return self.rng.integers(self.low, self.high + 1, size=L, dtype=np.int64).astype(np.int32)

  def draw(self, L: int) -> tuple[np.ndarray, np.ndarray]:
    if self.kind == "order":
      off = int(self.rng.integers(0, self.stream.size - 3 * L + 1))
      S = self.stream[off : off + L]
    else:
      S = self._random(L)
    R = self.stream[-L:] if self.filler == "corpus" else self._random(L)
    return S, R


def paired_p_value(lm: np.ndarray, copy: np.ndarray) -> float:
  from scipy import stats  # pylint: disable=g-import-not-at-top

  if len(lm) < 2:
    return 1.0
  with np.errstate(all="ignore"):
    p = stats.ttest_rel(lm, copy).pvalue
  return 1.0 if p is None or not np.isfinite(p) else float(p)


def memory_lengths(rows: list[dict], fine_threshold: float, p_threshold: float, rule: str) -> dict:
  """Fine/coarse-grained memory lengths from per-length rows {length, copy_mean, lm_mean, p}."""
  lengths = [r["length"] for r in rows]
  fine = [r["copy_mean"] >= fine_threshold for r in rows]
  coarse = [r["copy_mean"] > r["lm_mean"] and r["p_value"] < p_threshold for r in rows]
  return {
    "fine_memory_length": criteria.largest_passing(lengths, fine, rule),
    "coarse_memory_length": criteria.largest_passing(lengths, coarse, rule),
    "fine_memory_length_any": criteria.largest_passing(lengths, fine, "any"),
    "coarse_memory_length_any": criteria.largest_passing(lengths, coarse, "any"),
    "rule": rule,
  }


def run_forgetting_curve(model, tokenizer, cfg, out_dir, *, train_len=None) -> dict:
  """Copy/LM accuracy by dependency length; writes results.json and forgetting_curve.png.
  Returns {"summary", "rows": [{length, copy_mean, copy_std, lm_mean, lm_std, p_value,
  copy_accs, lm_accs}], fine/coarse memory lengths}."""
  tok = get_tokenizer(tokenizer)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  train_len = resolve_train_len(train_len, cfg)
  bos, eos = prompts.special_ids(tok, cfg.bos_id, cfg.eos_id)
  lengths = dependency_lengths(cfg)
  sampler = Sampler(cfg, tok, max(lengths))
  n = cfg.repeats
  batch = cfg.batch_size or 2 * n
  rows, t0 = [], time.perf_counter()
  total = sum(2 * n * (2 * L + 2) for L in lengths)
  with tqdm(
    total=total,
    desc="forgetting_curve",
    unit="tok",
    unit_scale=True,
    disable=not cfg.progress,
    mininterval=1.0,
  ) as bar:
    for L in lengths:
      pairs = [build_pair(*sampler.draw(L), bos, eos) for _ in range(n)]
      seqs = np.stack([p[0] for p in pairs] + [p[1] for p in pairs])  # copy rows, then LM rows
      acc = np.zeros(2 * n)
      for lo in range(0, 2 * n, batch):
        part = seqs[lo : lo + batch]
        if part.shape[0] < batch:  # one batch shape per length
          part = np.concatenate([part, np.repeat(part[-1:], batch - part.shape[0], axis=0)])
        _, pred = streaming.token_scores(model, part, cfg.chunk_len)
        k = min(batch, 2 * n - lo)
        acc[lo : lo + k] = accuracy(part[:k], pred[:k], L)
        bar.update(k * (2 * L + 2))
      copy, lm = acc[:n], acc[n:]
      rows.append(
        {
          "length": L,
          "copy_mean": float(copy.mean()),
          "copy_std": float(copy.std()),
          "lm_mean": float(lm.mean()),
          "lm_std": float(lm.std()),
          "p_value": paired_p_value(lm, copy),
          "copy_accs": copy,
          "lm_accs": lm,
        }
      )
  mem = memory_lengths(rows, cfg.fine_threshold, cfg.p_threshold, cfg.rule)
  summary = {k: mem[k] for k in ("fine_memory_length", "coarse_memory_length")}
  summary["mean_copy_minus_lm"] = float(np.mean([r["copy_mean"] - r["lm_mean"] for r in rows]))
  results = {
    "task": "forgetting_curve",
    "config": cfg,
    "train_len": train_len,
    "seconds": time.perf_counter() - t0,
    "bos_id": bos,
    "eos_id": eos,
    "random_range": [sampler.low, sampler.high],
    "filler": sampler.filler,
    "summary": summary,
    **mem,
    "rows": rows,
  }
  results["plots"] = [plot(results, out, log_x=cfg.spacing == "log")]
  io.write_json(out / "results.json", results)
  log.info(
    "forgetting_curve: fine-grained memory %s, coarse-grained %s tokens",
    mem["fine_memory_length"],
    mem["coarse_memory_length"],
  )
  return results


def plot(results: dict, out: Path, log_x: bool = False) -> str:
  from mamba2_jax.eval.plotting import mark_train_len, plt, save

  rows = results["rows"]
  x = np.array([r["length"] for r in rows])
  fig, ax = plt.subplots(figsize=(7, 3.8))
  for key, color, label in (
    ("copy", "tab:orange", "copy accuracy"),
    ("lm", "tab:blue", "LM accuracy"),
  ):
    m = np.array([r[f"{key}_mean"] for r in rows])
    s = np.array([r[f"{key}_std"] for r in rows])
    ax.plot(x, m, color=color, label=label)
    ax.fill_between(x, m - s, m + s, color=color, alpha=0.15)
  mark_train_len(ax, results["train_len"], half=True)
  for key, style in (("fine_memory_length", ":"), ("coarse_memory_length", "-.")):
    if results[key]:
      ax.axvline(
        results[key],
        color="0.3",
        linestyle=style,
        linewidth=1,
        label=f"{key.split('_')[0]}-grained memory {results[key]}",
      )
  if log_x:
    ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("dependency length L (tokens)")
  ax.set_ylabel("accuracy")
  ax.set_title("forgetting curve", fontsize=10)
  ax.legend(fontsize=7)
  ax.grid(True, alpha=0.3)
  return save(fig, out / "forgetting_curve.png")
