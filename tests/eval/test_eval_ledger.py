"""The evaluation ledger: keyed by the settings that change results; other settings are refused
(naming the differences) or, with overwrite, evaluated afresh with the old results moved aside."""

import json

import pytest

from configs.evaluate import get_config
from mamba2_jax.eval import io
from mamba2_jax.eval.ledger import (
  LEDGER,
  METRICS,
  SUPERSEDED,
  Ledger,
  SettingsMismatch,
  result_settings,
  settings_diff,
  settings_key,
)


def _cfg(**over):
  cfg = get_config("ppl_by_position")
  with cfg.unlocked():
    cfg.update(over)
  return cfg


def _settings(source="runs/t512", tokenizer="", **over):
  return result_settings(_cfg(**over), source, tokenizer)


def _evaluate(out, ledger, step, max_len):
  """What jobs.evaluate_step leaves behind, without a model."""
  io.write_json(out / f"step_{step}" / "results.json", {"config": {"max_len": max_len}})
  io.append_jsonl(out / METRICS, [{"step": step}])
  ledger.record_done(step, {"step": step})


def test_settings_ignore_cosmetic_fields_only():
  base = _settings()
  for cosmetic in (
    dict(progress=False),
    dict(ppl_ymax=0.0),
    dict(log_x=True),
    dict(chunk_len=512),
    dict(batch_size=1),
  ):
    assert settings_key(_settings(**cosmetic)) == settings_key(base), cosmetic
  for changed in (
    dict(max_len=4096),
    dict(mitigation="rri"),
    dict(bucket_size=64),
    dict(train_len=1024),
    dict(model_dtype="bfloat16"),
    dict(tokenizer="neox"),
    dict(source="runs/t1k"),
  ):
    assert settings_key(_settings(**changed)) != settings_key(base), changed
  assert _settings(source="random:tiny")["checkpoint"] == "random:tiny"
  assert _settings(source="gs://b/run")["checkpoint"] == "gs://b/run"
  assert _settings(source="runs/x")["checkpoint"].endswith("/runs/x")  # made absolute
  assert settings_diff(base, _settings(max_len=4096)) == ["config.max_len: 1048576 -> 4096"]


def test_other_settings_are_refused_naming_the_differences(tmp_path):
  """The issue: a 16K evaluation in OUT, then the same workdir with max_len=4096 into the same
  OUT must not report "already evaluated" with the 16K results."""
  old = _settings(max_len=16384)
  ledger = Ledger(tmp_path, "ppl_by_position", old)
  _evaluate(tmp_path, ledger, 20, 16384)
  assert Ledger(tmp_path, "ppl_by_position", _settings(max_len=16384, progress=False)).done(20)
  with pytest.raises(SettingsMismatch) as e:
    Ledger(tmp_path, "ppl_by_position", _settings(max_len=4096, mitigation="rri"))
  msg = str(e.value)
  assert "config.max_len: 16384 -> 4096" in msg and "config.mitigation: '' -> 'rri'" in msg
  assert "--out" in msg and "--overwrite" in msg
  with pytest.raises(SettingsMismatch, match="one output directory per task"):
    Ledger(tmp_path, "passkey", result_settings(get_config("passkey"), "runs/t512"))
  assert json.loads((tmp_path / LEDGER).read_text())["settings"] == old  # untouched


def test_overwrite_moves_the_old_results_aside(tmp_path):
  old = _settings(max_len=16384)
  ledger = Ledger(tmp_path, "ppl_by_position", old)
  _evaluate(tmp_path, ledger, 10, 16384)
  _evaluate(tmp_path, ledger, 20, 16384)
  new = _settings(max_len=4096)
  ledger = Ledger(tmp_path, "ppl_by_position", new, overwrite=True)
  assert not ledger.done(20) and ledger.data["settings"] == new
  aside = tmp_path / SUPERSEDED / settings_key(old)
  assert sorted(p.name for p in aside.iterdir()) == [LEDGER, METRICS, "step_10", "step_20"]
  assert not list(tmp_path.glob("step_*")) and not (tmp_path / METRICS).exists()
  saved = json.loads((tmp_path / LEDGER).read_text())
  assert saved["settings_key"] == settings_key(new) and saved["evaluated"] == {}


def test_results_of_unknown_settings_are_refused(tmp_path):
  # a ledger written before settings were recorded
  io.write_json(
    tmp_path / LEDGER, {"task": "ppl_by_position", "evaluated": {"5": {}}, "failed": {}}
  )
  with pytest.raises(SettingsMismatch, match="do not record their settings"):
    Ledger(tmp_path, "ppl_by_position", _settings())
  # no ledger, but a resumable partial file of some earlier passkey run
  other = tmp_path / "pk"
  io.append_jsonl(other / "preds_1024.jsonl", [{"idx": 0}])
  pk = result_settings(get_config("passkey"), "random:tiny")
  with pytest.raises(SettingsMismatch, match="do not record their settings"):
    Ledger(other, "passkey", pk)
  Ledger(other, "passkey", pk, overwrite=True)
  assert (other / SUPERSEDED / "unknown" / "preds_1024.jsonl").exists()


def test_nothing_evaluated_yet_is_taken_over(tmp_path):
  ledger = Ledger(tmp_path, "ppl_by_position", _settings(max_len=16384))
  ledger.record_failure(30, OSError("partial step"))
  ledger = Ledger(tmp_path, "ppl_by_position", _settings(max_len=4096))  # no results: adopted
  assert ledger.data["settings"]["config"]["max_len"] == 4096 and ledger.attempts(30) == 0
