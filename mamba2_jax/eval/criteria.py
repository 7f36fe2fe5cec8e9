"""Pure-numpy criteria of the tasks: position bucketing, the forgetting test (docs/evaluation.md
§2.4) and "largest length that passes" (T_recall, memory lengths) under non-monotone curves.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

RULES = ("prefix", "any")


class Buckets(NamedTuple):
  """Bucket k covers positions [start[k], end[k]) of a per-position curve; `mean` its average."""

  start: np.ndarray  # (K,) int64
  end: np.ndarray  # (K,) int64
  mean: np.ndarray  # (..., K) float64

  @property
  def center(self) -> np.ndarray:
    return (self.start + self.end) / 2.0


def bucket_edges(n: int, bucket_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(start, end) of the ceil(n / bucket_size) buckets of n positions; the last may be short."""
  if bucket_size < 1:
    raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
  start = np.arange(0, n, bucket_size, dtype=np.int64)
  return start, np.minimum(start + bucket_size, n)


def buckets_from_sums(
  sums, n: int, bucket_size: int, *, drop_first: bool = True, drop_last: bool = True
) -> Buckets:
  """Buckets of per-bucket sums (..., ceil(n / bucket_size)) over n positions (see
  `bucket_means`)."""
  start, end = bucket_edges(n, bucket_size)
  mean = np.asarray(sums, np.float64) / (end - start)
  keep = np.ones(start.size, bool)
  if drop_first and keep.size:
    keep[0] = False
  if drop_last and keep.size:
    keep[-1] = False
  return Buckets(start[keep], end[keep], mean[..., keep])


def bucket_means(
  values, bucket_size: int, *, drop_first: bool = True, drop_last: bool = True
) -> Buckets:
  """Means of values (..., n) over consecutive position buckets of `bucket_size`.

  The last bucket may be shorter than the others. `drop_first` / `drop_last` drop the first and
  last bucket, as the paper's plotting script does (the first holds the high losses of the
  first tokens, the last is often partial). Positions are indices into the last axis.
  """
  v = np.asarray(values, np.float64)
  n = v.shape[-1]
  start, _ = bucket_edges(n, bucket_size)
  sums = np.add.reduceat(v, start, axis=-1) if n else np.zeros(v.shape[:-1] + (0,))
  return buckets_from_sums(sums, n, bucket_size, drop_first=drop_first, drop_last=drop_last)


def add_to_buckets(sums: np.ndarray, start: int, values: np.ndarray, bucket_size: int) -> None:
  """Adds values (b, k) of positions [start, start + k) into per-bucket sums (b, K) in place."""
  idx = np.arange(start, start + values.shape[1]) // bucket_size
  firsts = np.concatenate([[0], np.flatnonzero(np.diff(idx)) + 1])
  sums[:, idx[firsts]] += np.add.reduceat(values, firsts, axis=1)


def forgetting_test(buckets: Buckets, train_len: int | None, factor: float = 2.0) -> dict:
  """The paper's "has it learned to forget" test on a bucketed mean loss curve (1-D `mean`).

  Reference = the maximum bucket loss over buckets lying entirely within the first `train_len`
  positions (end <= train_len). FAIL iff the loss of any bucket exceeds factor * reference (a
  NaN/inf loss counts as exceeding). Returns passed (bool, or None when undetermined: no
  train_len or no bucket within it), reference, threshold, first_fail_position (start of the
  first failing bucket, None if passed) and the number of reference buckets.
  """
  loss = np.asarray(buckets.mean, np.float64)
  if loss.ndim != 1:
    raise ValueError(f"forgetting_test needs a 1-D bucketed curve, got shape {loss.shape}")
  out = {
    "factor": float(factor),
    "train_len": train_len,
    "passed": None,
    "reference_loss": None,
    "threshold": None,
    "first_fail_position": None,
    "num_reference_buckets": 0,
    "max_loss": float(np.nanmax(loss)) if loss.size and np.isfinite(loss).any() else None,
  }
  if train_len is None:
    out["reason"] = "no training length given"
    return out
  ref = buckets.end <= train_len
  out["num_reference_buckets"] = int(ref.sum())
  if not ref.any():
    out["reason"] = (
      f"no bucket lies within the first {train_len} positions (bucket size or "
      "dropped first bucket too large)"
    )
    return out
  reference = float(np.max(loss[ref]))
  threshold = factor * reference
  bad = ~(loss <= threshold)  # NaN fails
  out.update(reference_loss=reference, threshold=threshold, passed=not bad.any())
  if bad.any():
    out["first_fail_position"] = int(buckets.start[np.argmax(bad)])
  return out


def largest_passing(lengths: Sequence[float], ok: Sequence[bool], rule: str = "prefix"):
  """The largest length that passes a criterion, given results at several lengths.

  rule "prefix": the largest L such that every evaluated length <= L passes (a failure stops the
    count even if a longer length passes again by chance); 0 if the shortest length fails.
  rule "any":    the largest passing length anywhere (the literal reading of "largest length with
    accuracy > 95%"); 0 if none passes.
  Lengths are sorted first; duplicates must not occur.
  """
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
  order = np.argsort(np.asarray(lengths, np.float64))
  ls = [lengths[i] for i in order]
  oks = [bool(ok[i]) for i in order]
  best = 0
  for length, passed in zip(ls, oks):
    if passed:
      best = length
    elif rule == "prefix":
      break
  return best
