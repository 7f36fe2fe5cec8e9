"""Passkey: prompt construction in tokens, depth bins, scoring, resume, T_recall, the task."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2LM
from configs.evaluate import get_config
from mamba2_jax.eval import passkey, run_passkey
from configs.evaluate import (
  PASSKEY_BLOCK,
  PASSKEY_NEEDLE,
  PASSKEY_PREFIX,
  PASSKEY_SUFFIX,
)


def _builder(**kw):
  return passkey.PasskeyBuilder(
    "byte",
    prefix=PASSKEY_PREFIX,
    block=PASSKEY_BLOCK,
    needle=PASSKEY_NEEDLE,
    suffix=PASSKEY_SUFFIX,
    **kw,
  )


def _cfg(**over):
  cfg = get_config("passkey")
  with cfg.unlocked():
    cfg.update(progress=False, **over)
  return cfg


@pytest.mark.parametrize("length,depth", [(1024, 0.0), (1024, 0.5), (2048, 0.999), (4096, 0.3)])
def test_prompt_length_needle_block_and_key(length, depth):
  b = _builder()
  key = passkey.sample_key(0, length, 3)
  p = b.build(length, depth, key)
  lp, lb, ls = len(PASSKEY_PREFIX), len(PASSKEY_BLOCK), len(PASSKEY_SUFFIX)  # bytes = tokens
  nb = (length - lp - ls) // lb
  needle = PASSKEY_NEEDLE.replace("{K}", key)
  assert p.num_blocks == nb and p.needle_block == int(depth * (nb - 1))
  assert p.ids.size == lp + ls + (nb - 1) * lb + len(needle) <= length
  text = bytes(p.ids.astype(np.uint8)).decode()
  assert text.startswith(PASSKEY_PREFIX) and text.endswith(PASSKEY_SUFFIX)
  assert text.count(key) == 2 and text.count(needle) == 1
  start = text.index(needle) - lp  # the needle sits exactly at its block
  assert start == p.needle_block * lb
  assert len(key) == 5 and key.isdigit()


def test_keys_are_deterministic_and_zero_padded():
  keys = [passkey.sample_key(0, 1024, i) for i in range(300)]
  assert keys == [passkey.sample_key(0, 1024, i) for i in range(300)]
  assert all(len(k) == 5 for k in keys) and len(set(keys)) > 250
  assert any(k.startswith("0") for k in keys)


def test_bos_and_add_prefix_blocks():
  b = _builder(use_bos=True, add_prefix_blocks=2)
  p = b.build(1024, 0.5, "01234")
  assert p.ids[0] == 256
  assert bytes(p.ids[1:].astype(np.uint8)).decode().startswith(PASSKEY_BLOCK * 2 + PASSKEY_PREFIX)
  with pytest.raises(ValueError, match="too short"):
    _builder().num_blocks(100)


def test_depths_and_depth_bins():
  assert [passkey.sample_depth(i, 4) for i in range(4)] == [0.125, 0.375, 0.625, 0.875]
  assert passkey.depth_bin(0.0) == 0 and passkey.depth_bin(0.1) == 0
  assert passkey.depth_bin(0.1001) == 1 and passkey.depth_bin(0.55) == 5
  assert passkey.depth_bin(1.0) == 9 and passkey.depth_bin(0.95, 10) == 9
  depths = [passkey.sample_depth(i, 200) for i in range(200)]
  counts = np.bincount([passkey.depth_bin(d) for d in depths], minlength=10)
  assert list(counts) == [20] * 10


def test_substring_scoring():
  assert passkey.is_correct(" 12345. Rem", "12345")
  assert passkey.is_correct("0012345", "12345")
  assert not passkey.is_correct(" 1234", "12345")
  assert not passkey.is_correct(" 12 345", "12345")


def _rows(length, accs, n=10):
  rows = []
  for i in range(n):
    key = f"{i:05d}"
    ok = i < round(accs * n)
    rows.append(
      {
        "idx": i,
        "prediction": f" {key}." if ok else " 99999",
        "ground_truth": key,
        "relative_position": passkey.sample_depth(i, n),
      }
    )
  return rows


def test_aggregate_grid_and_t_recall_non_monotone():
  per = {
    1024: _rows(1024, 1.0),
    2048: _rows(2048, 1.0),
    4096: _rows(4096, 0.5),
    8192: _rows(8192, 1.0),
    16384: _rows(16384, 0.0),
  }
  agg = passkey.aggregate(per, 10, 0.95, "prefix")
  assert agg["accuracy"] == [1.0, 1.0, 0.5, 1.0, 0.0]
  assert agg["t_recall"] == agg["t_recall_prefix"] == 2048
  assert agg["t_recall_any"] == 8192
  assert passkey.aggregate(per, 10, 0.95, "any")["t_recall"] == 8192
  grid = agg["grid"]
  assert grid.shape == (10, 5)
  np.testing.assert_array_equal(grid[:, 2], [1] * 5 + [0] * 5)  # first 5 depths were correct
  # exactly 0.95 is not > 0.95
  assert passkey.aggregate({1024: _rows(1024, 0.95, 20)}, 10, 0.95, "any")["t_recall"] == 0
  # the paper's misspelled field is read too
  old = [{**r, "relative_postion": r.pop("relative_position")} for r in _rows(1024, 1.0)]
  assert np.isfinite(passkey.aggregate({1024: old}, 10, 0.95, "prefix")["grid"]).all()


def test_last_r_accuracy():
  grid = np.tile(np.linspace(0, 0.9, 10)[:, None], (1, 3))  # row i has accuracy i/10
  out = passkey.last_r_accuracy(grid, [1024, 2048, 8192], 1024)
  assert out[0] == pytest.approx(grid[:, 0].mean())  # r = T: all 10 rows
  assert out[1] == pytest.approx(grid[-5:, 1].mean())
  assert out[2] == pytest.approx(0.9)  # int(1024 / 8192 * 10) = 1 row: the deepest bin
  assert passkey.last_r_accuracy(grid, [512], 1024) == [None]  # r > T


def test_resume_from_partial_jsonl(tmp_path, monkeypatch):
  calls = []

  def fake_answer(model, tok, prompts, batch_size, chunk_len, max_new_tokens):
    calls.append(len(prompts))
    assert all(p.ids.size == prompts[0].ids.size for p in prompts)
    return [f" {p.key}." if int(p.key) % 2 else " nope" for p in prompts]

  monkeypatch.setattr(passkey, "_answer", fake_answer)
  cfg = _cfg(num_samples=6, batch_size=4)
  rows = passkey.evaluate_length(None, _builder(), 1024, cfg, tmp_path)
  assert [r["idx"] for r in rows] == list(range(6)) and sum(calls) == 6
  path = tmp_path / "preds_1024.jsonl"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])  # crash while appending
  calls.clear()
  again = passkey.evaluate_length(None, _builder(), 1024, cfg, tmp_path)
  assert sum(calls) == 3  # only the missing samples are run
  assert again == rows
  assert len(path.read_text().splitlines()) == 6
  assert all(json.loads(l) for l in path.read_text().splitlines())
  for r in rows:
    assert r["correct"] == (int(r["ground_truth"]) % 2 == 1)
  with pytest.raises(ValueError, match="another seed"):  # refuse to mix results
    passkey.evaluate_length(None, _builder(), 1024, _cfg(num_samples=6, seed=1), tmp_path)
  with pytest.raises(ValueError, match="num_samples"):  # other depths
    passkey.evaluate_length(None, _builder(), 1024, _cfg(num_samples=12), tmp_path)


@pytest.mark.slow
def test_run_passkey_tiny_model(tmp_path):
  model = Mamba2LM(Mamba2Config.preset("tiny"), rngs=nnx.Rngs(0))
  cfg = _cfg(lengths=(256, 512), num_samples=5, batch_size=2, chunk_len=128)
  res = run_passkey(model, "byte", cfg, tmp_path, train_len=256)
  assert res["lengths"] == [256, 512] and len(res["accuracy"]) == 2
  for L in (256, 512):
    rows = [json.loads(l) for l in (tmp_path / f"preds_{L}.jsonl").read_text().splitlines()]
    assert sorted(r["idx"] for r in rows) == list(range(5))
  for name in ("heatmap.png", "accuracy.png", "results.json"):
    assert (tmp_path / name).stat().st_size > 500


@pytest.mark.slow
def test_greedy_answer_matches_one_shot_generation():
  from mamba2_jax.generate import generate

  model = Mamba2LM(Mamba2Config.preset("tiny", chunk_size=16), rngs=nnx.Rngs(1))
  b = _builder()
  ps = [b.build(300, d, "12345") for d in (0.2, 0.7)]
  got = passkey._answer(model, b.tok, ps, 3, 64, 5)  # pylint: disable=protected-access
  want = np.asarray(generate(model, np.stack([p.ids for p in ps]), 5))
  assert got == [b.tok.decode(w) for w in want]


def test_heatmap_has_a_colour_bar(tmp_path, monkeypatch):
  from mamba2_jax.eval import plotting

  figs = {}
  real_save = plotting.save

  def keep(fig, path, **kw):
    figs[Path(path).name] = [(a.get_ylabel(), a.get_ylim()) for a in fig.axes]
    return real_save(fig, path, **kw)

  monkeypatch.setattr(plotting, "save", keep)
  results = {
    "lengths": [256, 512, 1024],
    "grid": [[1.0, 0.5, 0.0], [1.0, float("nan"), 0.0]],
    "accuracy": [1.0, 0.5, 0.0],
    "last_r": {},
    "threshold": 0.95,
    "train_len": 512,
    "t_recall": 256,
  }
  passkey.plot(results, tmp_path)
  axes = figs["heatmap.png"]
  assert len(axes) == 2 and axes[1][0] == "accuracy"  # the heatmap and its colour bar
  assert axes[1][1] == pytest.approx((-0.2, 1.2))  # the paper's colour range
  assert (tmp_path / "heatmap.png").stat().st_size > 500
