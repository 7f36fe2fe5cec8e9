"""Pure-numpy criteria of the tasks: position bucketing, the forgetting test (docs/evaluation.md
§2.4), whether a model learned the task at all, and "largest length that passes" (T_recall,
memory lengths) under non-monotone curves.

"Learned" (the one definition, used by ppl_by_position, copy_task, the sweep report and the
T_forget fits): the mean loss within T_train is clearly below chance, i.e. at most
(1 - LEARNED_MARGIN) x chance. Chance is the loss of a uniform prediction over the values the
scored tokens take: ln(vocab - 2) for the copied halves of the copy task, ln(vocab_size) for
ppl_by_position (an untrained model scores about that; natural text has no better-defined
chance level, and a prompt's unigram entropy is 0 for the newlines prompt). A run that did not
learn has no forgetting verdict: its test says "not learned" (passed None), never a pass.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

RULES = ("prefix", "any")
LEARNED_MARGIN = 0.1  # learned iff mean loss within T_train <= (1 - LEARNED_MARGIN) x chance
DEFAULT_BUCKET_CAP = 512  # the paper's bucket size [§2.3 arguments.py]
VERDICTS = ("pass", "fail", "not learned", "n/a")


class Buckets(NamedTuple):
  """Bucket k covers positions [start[k], end[k]) of a per-position curve; `mean` its average."""

  start: np.ndarray  # (K,) int64
  end: np.ndarray  # (K,) int64
  mean: np.ndarray  # (..., K) float64

  @property
  def center(self) -> np.ndarray:
    return (self.start + self.end) / 2.0


def default_bucket_size(train_len: int | None, cap: int = DEFAULT_BUCKET_CAP) -> int:
  """The bucket size when none is set: the largest power of two <= T_train / 4, at most `cap`
  (`cap` without T_train). With the first bucket dropped that leaves >= 3 buckets within T."""
  if not train_len:
    return int(cap)
  return min(int(cap), 1 << max(0, (int(train_len) // 4).bit_length() - 1))


def resolve_bucket_size(bucket_size: int, train_len: int | None) -> int:
  """`bucket_size` when > 0, else `default_bucket_size(train_len)`."""
  return (
    int(bucket_size) if bucket_size and int(bucket_size) > 0 else default_bucket_size(train_len)
  )


def learned_threshold(chance: float, margin: float = LEARNED_MARGIN) -> float:
  return (1.0 - margin) * float(chance)


def is_learned(loss_within, chance, margin: float = LEARNED_MARGIN) -> bool | None:
  """True iff the loss within T_train is clearly below chance (see the module docstring); None
  when either is unknown. A NaN loss has not learned."""
  if loss_within is None or chance is None:
    return None
  return bool(float(loss_within) <= learned_threshold(chance, margin))


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


def forgetting_test(
  buckets: Buckets, train_len: int | None, factor: float = 2.0, chance: float | None = None
) -> dict:
  """The paper's "has it learned to forget" test on a bucketed mean loss curve (1-D `mean`).

  Reference = the maximum bucket loss over buckets lying entirely within the first `train_len`
  positions (end <= train_len). FAIL iff the loss of any bucket exceeds factor * reference (a
  NaN/inf loss counts as exceeding). With `chance` (the chance loss) the test first asks whether
  the model learned at all (`is_learned` on the mean loss of those buckets): if not, the verdict
  is "not learned" and passed is None. Returns verdict (one of VERDICTS), passed (bool, or None:
  not learned, no train_len, no bucket within it), learned (None without `chance`), reason
  (when passed is None), reference, threshold, first_fail_position (start of the first failing
  bucket, None if passed or undetermined), the number of reference buckets and their mean loss.
  """
  loss = np.asarray(buckets.mean, np.float64)
  if loss.ndim != 1:
    raise ValueError(f"forgetting_test needs a 1-D bucketed curve, got shape {loss.shape}")
  out = {
    "factor": float(factor),
    "train_len": train_len,
    "verdict": "n/a",
    "passed": None,
    "learned": None,
    "chance_loss": None if chance is None else float(chance),
    "learned_threshold": None if chance is None else learned_threshold(chance),
    "reference_loss": None,
    "threshold": None,
    "first_fail_position": None,
    "num_reference_buckets": 0,
    "loss_within_train": None,
    "max_loss": float(np.nanmax(loss)) if loss.size and np.isfinite(loss).any() else None,
  }
  if train_len is None:
    out["reason"] = "no training length given"
    return out
  ref = buckets.end <= train_len
  out["num_reference_buckets"] = int(ref.sum())
  if not ref.any():
    out["reason"] = (
      f"no bucket within T={train_len} (the bucket size, or the dropped first bucket, is too large)"
    )
    return out
  within = float(np.mean(loss[ref]))
  out["loss_within_train"] = within
  out["learned"] = is_learned(within, chance)
  if out["learned"] is False:
    out.update(
      verdict="not learned",
      reason=(
        f"the mean loss within T={train_len} is {within:.3g}, not clearly below chance "
        f"{chance:.3g} (learned: <= {out['learned_threshold']:.3g} = "
        f"{1 - LEARNED_MARGIN:g} x chance)"
      ),
    )
    return out
  reference = float(np.max(loss[ref]))
  threshold = factor * reference
  bad = ~(loss <= threshold)  # NaN fails
  out.update(reference_loss=reference, threshold=threshold, passed=not bad.any())
  out["verdict"] = "pass" if out["passed"] else "fail"
  if bad.any():
    out["first_fail_position"] = int(buckets.start[np.argmax(bad)])
  return out


def advise_bucket_size(test: dict, bucket_size: int, drop_first: bool) -> dict:
  """If `test` is undetermined for want of a bucket within T_train, its reason says which
  bucket_size to set. Returns `test`."""
  T = test.get("train_len")
  if test.get("verdict") == "n/a" and T and not test.get("num_reference_buckets"):
    test["reason"] = (
      f"no bucket within T={T} (bucket_size {bucket_size}"
      + (", the first bucket dropped" if drop_first else "")
      + f"); set --config.bucket_size={default_bucket_size(T)} (or 0: derived from T)"
    )
  return test


def describe(test: dict) -> str:
  """One console line for a `forgetting_test` result: "PASS ...", "FAIL at ...", "not learned:
  ...", "n/a: <why>"."""
  v, T = test.get("verdict"), test.get("train_len")
  if v == "pass":
    return (
      f"PASS (every bucket <= {test['factor']:g} x {test['reference_loss']:.3g}, the max loss "
      f"within T={T})"
    )
  if v == "fail":
    return (
      f"FAIL at position {test['first_fail_position']} (loss > {test['factor']:g} x "
      f"{test['reference_loss']:.3g}, the max loss within T={T})"
    )
  return f"{v}: {test.get('reason', 'undetermined')}"


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
