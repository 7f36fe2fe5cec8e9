"""Forgetting curve: sequence construction, the scoring mask, statistics, memory lengths."""

import json

import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.data import get_tokenizer
from mamba2_jax.eval import forgetting_curve as fc
from configs.evaluate import get_config
from mamba2_jax.eval import prompts, run_forgetting_curve


def _cfg(**over):
  cfg = get_config("forgetting_curve")
  with cfg.unlocked():
    cfg.update(progress=False, **over)
  return cfg


def test_build_pair_hand_checked():
  copy, lm = fc.build_pair([5, 6, 7], [1, 2, 3], bos=9, eos=8)
  np.testing.assert_array_equal(copy, [9, 5, 6, 7, 9, 5, 6, 7, 8])
  np.testing.assert_array_equal(lm, [9, 1, 2, 3, 9, 5, 6, 7, 8])
  assert copy.dtype == np.int32 and copy.size == 2 * 3 + 3


@pytest.mark.parametrize("L,want", [(1, [3]), (3, [6, 7]), (4, [8, 9]), (5, [9, 10, 11])])
def test_scored_positions_are_the_last_half_of_the_second_S(L, want):
  # second S occupies L+2 .. 2L+1; ceil(L/2) of its last tokens are scored
  np.testing.assert_array_equal(fc.scored_positions(L), want)


def test_accuracy_uses_predictions_shifted_by_one():
  copy, _ = fc.build_pair([5, 6, 7, 4], [0] * 4, bos=9, eos=8)  # L=4: scored positions 8, 9
  seqs = copy[None]
  perfect = np.roll(copy, -1)[None, :-1]  # preds[i] = token i+1
  assert fc.accuracy(seqs, perfect, 4)[0] == 1.0
  half = perfect.copy()
  half[0, 8] = 0  # wrong prediction of token 9 (the last S token)
  assert fc.accuracy(seqs, half, 4)[0] == 0.5
  outside = perfect.copy()
  outside[0, :7] = 0  # errors on the first S and the first half of the second don't count
  assert fc.accuracy(seqs, outside, 4)[0] == 1.0


def test_lengths_ranges_and_special_ids():
  assert fc.dependency_lengths(_cfg(min_dep_len=8, max_dep_len=20, num_lengths=3)) == [8, 14, 20]
  log = fc.dependency_lengths(_cfg(min_dep_len=8, max_dep_len=800, num_lengths=3, spacing="log"))
  assert log == [8, 79, 800]  # geomspace(dtype=int) truncates, as the reference draw.py
  tok = get_tokenizer("byte")
  assert fc.random_range(tok, 10, -1) == (10, 255)  # below BOS 256
  assert fc.random_range(tok, 10, 99) == (10, 99)
  assert prompts.special_ids(tok) == (256, 257)
  assert prompts.special_ids(tok, 1, 2) == (1, 2)

  class NeoxLike:
    bos_id, eos_id, pad_id, vocab_size = None, 0, 1, 50277

  assert prompts.special_ids(NeoxLike()) == (0, 0)
  assert fc.random_range(NeoxLike(), 10, -1) == (10, 31999)


def test_sampler_order_and_random(tmp_path):
  (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(400)))
  s = fc.Sampler(_cfg(data=str(tmp_path / "a.txt"), seed=3), get_tokenizer("byte"), 100)
  stream = s.stream
  for _ in range(20):
    S, R = s.draw(100)
    off = next(i for i in range(stream.size - 99) if np.array_equal(stream[i : i + 100], S))
    assert 0 <= off <= stream.size - 300
    np.testing.assert_array_equal(R, stream[-100:])
  with pytest.raises(ValueError, match="3 \\* max_dep_len"):
    fc.Sampler(_cfg(data=str(tmp_path / "a.txt")), get_tokenizer("byte"), 200)
  r = fc.Sampler(_cfg(data_type="random", random_low=10, random_high=20), get_tokenizer("byte"), 50)
  S, R = r.draw(50)
  assert S.min() >= 10 and S.max() <= 20 and not np.array_equal(S, R) and r.stream is None


def test_p_value_and_memory_lengths():
  assert fc.paired_p_value(np.zeros(5), np.zeros(5)) == 1.0  # NaN => 1
  assert fc.paired_p_value(np.array([0.1, 0.2, 0.1, 0.15]), np.array([0.9, 1.0, 0.95, 1.0])) < 0.01
  rows = [
    {"length": L, "copy_mean": c, "lm_mean": m, "p_value": p}
    for L, c, m, p in [
      (8, 1.0, 0.1, 1e-6),
      (16, 0.995, 0.1, 1e-6),
      (32, 0.9, 0.1, 1e-4),
      (64, 0.3, 0.1, 0.2),
      (128, 0.99, 0.1, 0.01),
      (256, 0.1, 0.1, 1.0),
    ]
  ]
  m = fc.memory_lengths(rows, 0.99, 0.05, "prefix")
  assert m["fine_memory_length"] == 16 and m["coarse_memory_length"] == 32
  assert m["fine_memory_length_any"] == 128 and m["coarse_memory_length_any"] == 128


@pytest.mark.slow
def test_run_forgetting_curve_tiny(tmp_path):
  model = Mamba2LM(Mamba2Config.preset("tiny"), rngs=nnx.Rngs(0))
  cfg = _cfg(min_dep_len=8, max_dep_len=100, num_lengths=3, repeats=3, chunk_len=64, batch_size=4)
  res = run_forgetting_curve(model, "byte", cfg, tmp_path, train_len=64)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["length"] for r in saved["rows"]] == [8, 54, 100]
  assert all(len(r["copy_accs"]) == 3 for r in saved["rows"])
  assert res["bos_id"] == 256 and res["filler"] == "corpus"
  assert (tmp_path / "forgetting_curve.png").stat().st_size > 1000
