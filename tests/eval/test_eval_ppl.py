"""ppl_by_position: bucketing, the forgetting criterion on known curves, prompts, the task."""

import json

import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.data import get_tokenizer
from configs.evaluate import get_config
from mamba2_jax.eval import criteria, prompts, run_ppl_by_position, streaming
from mamba2_jax.eval.ppl_by_position import prompt_bucket_sums


def test_bucket_means_and_dropping():
  v = np.arange(10, dtype=float)  # buckets of 4: [0..3], [4..7], [8, 9]
  b = criteria.bucket_means(v, 4, drop_first=False, drop_last=False)
  np.testing.assert_array_equal(b.start, [0, 4, 8])
  np.testing.assert_array_equal(b.end, [4, 8, 10])
  np.testing.assert_allclose(b.mean, [1.5, 5.5, 8.5])
  b = criteria.bucket_means(v, 4)
  np.testing.assert_array_equal(b.start, [4])
  np.testing.assert_allclose(b.mean, [5.5])
  b2 = criteria.bucket_means(np.stack([v, 2 * v]), 4, drop_first=False, drop_last=False)
  np.testing.assert_allclose(b2.mean[1], [3.0, 11.0, 17.0])


def _curve(n=4096, train=1024, bump_at=None, bump=3.0):
  loss = np.full(n, 2.0)
  loss[:64] = 8.0  # high first-token losses: inside the dropped first bucket
  loss[500:510] = 2.5  # max within train
  if bump_at is not None:
    loss[bump_at:] = bump
  return criteria.bucket_means(loss, 64), train


def test_forgetting_test_pass_and_fail():
  b, t = _curve()
  r = criteria.forgetting_test(b, t, 2.0)
  assert r["passed"] is True and r["first_fail_position"] is None
  # reference: bucket [448, 512) holds 10 tokens of 2.5 and 54 of 2.0
  assert r["reference_loss"] == pytest.approx((10 * 2.5 + 54 * 2.0) / 64)
  assert r["num_reference_buckets"] == 15  # buckets 1..15 end <= 1024 (bucket 0 dropped)
  b, t = _curve(bump_at=3000, bump=5.0)  # 5.0 > 2 * 2.078
  r = criteria.forgetting_test(b, t, 2.0)
  # the bucket [2944, 3008) holds only 8 tokens of 5.0 (mean 2.375): the first full one fails
  assert r["passed"] is False and r["first_fail_position"] == 3008
  assert criteria.forgetting_test(b, t, 2.5)["passed"] is True  # 5.0 < 2.5 * 2.078
  b, t = _curve(bump_at=3000, bump=4.0)
  assert criteria.forgetting_test(b, t, 2.0)["passed"] is True  # 4.0 < 4.156


def test_forgetting_test_nan_fails_and_undetermined_cases():
  loss = np.full(1024, 1.0)
  loss[900:] = np.nan
  b = criteria.bucket_means(loss, 64)
  r = criteria.forgetting_test(b, 256, 2.0)
  assert r["passed"] is False and r["first_fail_position"] == 896
  assert criteria.forgetting_test(b, None)["passed"] is None
  assert criteria.forgetting_test(b, 64)["passed"] is None  # only the dropped first bucket fits


def test_largest_passing_rules():
  lengths, ok = [1, 2, 4, 8, 16], [True, True, False, True, False]
  assert criteria.largest_passing(lengths, ok, "prefix") == 2
  assert criteria.largest_passing(lengths, ok, "any") == 8
  assert criteria.largest_passing([4, 1, 2], [True, True, True]) == 4  # unsorted input
  assert criteria.largest_passing(lengths, [False] * 5) == 0
  with pytest.raises(ValueError):
    criteria.largest_passing(lengths, ok, "median")


def test_newline_prompt_is_exactly_repeated_ids():
  tok = get_tokenizer("byte")
  p = prompts.newline_prompt(tok, 1000)
  assert p.dtype == np.int32 and p.shape == (1000,) and np.all(p == 10)
  np.testing.assert_array_equal(prompts.build_prompts("newlines", tok, length=7), [[10] * 7])
  np.testing.assert_array_equal(prompts.text_prompt(tok, "ab", 5), [97, 98, 97, 98, 97])


class _FakeTok:
  eos_id = 0

  def encode(self, s):
    return np.asarray([ord(c) for c in s], np.int32)


def test_newline_prompt_never_tokenizes_a_newline_run():
  class MergingTok(_FakeTok):  # a BPE that merges newline runs: "\n\n" -> id 500
    def encode(self, s):
      return np.asarray([500] * (len(s) // 2) + [10] * (len(s) % 2), np.int32)

  np.testing.assert_array_equal(prompts.newline_prompt(MergingTok(), 6), [10] * 6)


def test_document_prompts_concatenate_and_cycle(tmp_path):
  for i, n in enumerate([5, 30, 12, 3]):
    (tmp_path / f"d{i}.txt").write_text(chr(ord("a") + i) * n)
  glob = str(tmp_path / "*.txt")
  out = prompts.document_prompts(
    glob, "byte", num_prompts=3, length=20, min_doc_len=10, separator=257
  )
  a, c = ord("b"), ord("c")
  np.testing.assert_array_equal(out[0], [a] * 20)  # the 30-token doc, truncated
  np.testing.assert_array_equal(out[1], [c] * 12 + [257] + [a] * 7)  # next docs, separator
  np.testing.assert_array_equal(out[2], out[1])  # the corpus is reused from the start
  with pytest.raises(ValueError, match="no document"):
    prompts.document_prompts(glob, "byte", num_prompts=1, length=5, min_doc_len=100)


def test_not_learned_is_never_a_pass():
  """A curve at (or just below) chance within T has no forgetting verdict, whatever its shape;
  "clearly below" is (1 - LEARNED_MARGIN) x chance, one definition for every task."""
  chance = np.log(259)
  flat = criteria.bucket_means(np.full(2048, chance + 0.2), 64)  # the 5.75 vs 5.55
  r = criteria.forgetting_test(flat, 512, 2.0, chance)
  assert r["verdict"] == "not learned" and r["passed"] is None and r["learned"] is False
  assert r["loss_within_train"] == pytest.approx(chance + 0.2)
  assert criteria.describe(r).startswith("not learned: the mean loss within T=512 is 5.76")
  edge = (1 - criteria.LEARNED_MARGIN) * chance
  for loss, want in ((edge + 1e-6, "not learned"), (edge - 1e-6, "pass"), (2.0, "pass")):
    b = criteria.bucket_means(np.full(2048, loss), 64)
    assert criteria.forgetting_test(b, 512, 2.0, chance)["verdict"] == want, loss
  b, t = _curve(bump_at=3000, bump=5.0)  # learned (2.0 << 0.9 x 5.56) and then collapses
  r = criteria.forgetting_test(b, t, 2.0, chance)
  assert (r["verdict"], r["passed"], r["learned"]) == ("fail", False, True)
  assert criteria.describe(r).startswith("FAIL at position 3008")
  assert criteria.forgetting_test(b, t, 2.0)["learned"] is None  # no chance given: not asked
  assert criteria.is_learned(None, chance) is None and criteria.is_learned(np.nan, chance) is False


def test_default_buckets_leave_at_least_two_within_train_len():
  assert criteria.default_bucket_size(None) == 512  # the paper's, without T_train
  assert criteria.default_bucket_size(512) == 128  # the README's run: T = 512
  assert criteria.default_bucket_size(8192) == criteria.default_bucket_size(1 << 20) == 512
  assert criteria.resolve_bucket_size(32, 512) == 32 and criteria.resolve_bucket_size(0, 64) == 16
  for T in (1, 4, 5, 32, 100, 384, 512, 1000, 4096, 8192, 65536):
    size = criteria.default_bucket_size(T)
    b = criteria.bucket_means(np.zeros(4 * T + 7), size)  # first and last bucket dropped
    assert int(np.sum(b.end <= T)) >= (2 if T >= 4 else 0), (T, size)


def test_undetermined_test_says_why():
  b = criteria.bucket_means(np.full(4096, 1.0), 512)  # 512-token buckets, the first dropped
  r = criteria.advise_bucket_size(criteria.forgetting_test(b, 512, 2.0, 5.0), 512, True)
  assert r["verdict"] == "n/a" and r["passed"] is None
  assert criteria.describe(r) == (
    "n/a: no bucket within T=512 (bucket_size 512, the first bucket dropped); set "
    "--config.bucket_size=128 (or 0: derived from T)"
  )
  assert criteria.describe(criteria.forgetting_test(b, None)) == "n/a: no training length given"


@pytest.fixture(scope="module")
def model():
  return Mamba2LM(Mamba2Config.preset("tiny", chunk_size=16), rngs=nnx.Rngs(0))


def test_prompt_bucket_sums(model):
  toks = np.random.default_rng(0).integers(0, 256, (3, 150)).astype(np.int32)
  sums = prompt_bucket_sums(model, iter(toks), 3, 150, 32, 2, 40, progress=False)
  loss, _ = streaming.token_scores(model, toks, 64)
  want = criteria.bucket_means(loss, 40, drop_first=False, drop_last=False)
  np.testing.assert_allclose(sums / (want.end - want.start), want.mean, atol=1e-5)
  mean = criteria.buckets_from_sums(sums.mean(0), 149, 40)
  np.testing.assert_allclose(mean.mean, criteria.bucket_means(loss.mean(0), 40).mean, atol=1e-5)


def test_run_ppl_by_position_docs(model, tmp_path):
  cfg = get_config("ppl_by_position")
  with cfg.unlocked():
    cfg.update(
      prompt="docs",
      data="builtin:shakespeare",
      min_doc_len=1000,
      num_prompts=3,
      batch_size=2,
      max_len=700,
      chunk_len=128,
      bucket_size=64,
      progress=False,
    )
  res = run_ppl_by_position(model, "byte", cfg, tmp_path, train_len=256)
  saved = json.loads((tmp_path / "results.json").read_text())
  # an untrained model's loss within T is about chance, ln(259): no verdict, never a pass
  assert (
    saved["summary"]["forget_verdict"] == "not learned" and saved["summary"]["learned"] is False
  )
  assert saved["summary"]["forget_test_passed"] is None
  assert saved["summary"]["chance_loss"] == pytest.approx(np.log(259))
  assert saved["num_prompts"] == 3 and saved["num_positions"] == 699
  assert len(saved["buckets"]["loss"]) == 9  # 11 buckets, first and last dropped
  assert np.asarray(saved["per_prompt_bucket_loss"]).shape == (3, 9)
  for name in ("loss.png", "ppl.png"):
    assert (tmp_path / name).stat().st_size > 1000
  assert res["forgetting"]["num_reference_buckets"] == 3  # [64, 128) .. [192, 256)


def test_default_config_gives_a_verdict_at_the_readme_length(model, tmp_path, caplog):
  """The README's run (T = 512, default buckets) gets a verdict; the paper's 512-token bucket
  at T = 512 cannot, and the console line says why and what to set."""
  cfg = get_config("ppl_by_position")
  with cfg.unlocked():
    cfg.update(max_len=1100, chunk_len=1100, batch_size=1, progress=False)
  res = run_ppl_by_position(model, "byte", cfg, tmp_path / "a", train_len=512)
  assert res["bucket_size"] == 128 and res["forgetting"]["num_reference_buckets"] == 3
  assert res["summary"]["forget_verdict"] != "n/a"
  with cfg.unlocked():
    cfg.bucket_size = 512
  with caplog.at_level("INFO", logger="mamba2_jax.eval.ppl_by_position"):
    res = run_ppl_by_position(model, "byte", cfg, tmp_path / "b", train_len=512)
  assert res["summary"]["forget_verdict"] == "n/a" and res["summary"]["forget_test_passed"] is None
  assert (
    "forget test n/a: no bucket within T=512 (bucket_size 512, the first bucket dropped); "
    "set --config.bucket_size=128" in caplog.text
  )
