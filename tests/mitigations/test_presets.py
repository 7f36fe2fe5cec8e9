"""Presets ("off" = the config defaults), and validation: config fields name the field and rule,
unsupported combinations are rejected, the op checks its own mitigation arguments.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from mamba2_jax import ConfigError, Mamba2Config
from mamba2_jax.mitigations import MITIGATION_FIELDS, PRESETS, preset_fields
from mamba2_jax.ssd import ssd
from tests.mitigations.helpers import CFG, inputs


def test_presets_set_every_field_and_off_is_the_config_default():
  defaults = {f.name: f.default for f in dataclasses.fields(Mamba2Config)}
  assert preset_fields("off") == {f: defaults[f] for f in MITIGATION_FIELDS}
  for name in PRESETS:
    fields = preset_fields(name)
    assert set(fields) == set(MITIGATION_FIELDS)
    assert not Mamba2Config().replace(**fields).mitigations_on or name != "off"
  assert preset_fields("rri", dt_scale=0.5)["dt_scale"] == 0.5
  with pytest.raises(ValueError, match="unknown mitigation preset"):
    preset_fields("nope")


def test_op_argument_errors():
  v = inputs(0, dtype=np.float32)
  args = (v["x"], v["dt"], v["A"], v["B"], v["C"])
  for kw, msg in [
    (dict(dt_scale=0.0), "dt_scale"),
    (dict(log_decay_offset=0.1), "log_decay_offset"),
    (dict(window=0), "window"),
    (dict(window=True), "window"),
  ]:
    with pytest.raises(ValueError, match=msg):
      ssd(*args, impl="xla", **kw)


@pytest.mark.parametrize(
  "field,value",
  [
    ("rri_decay_scale", 0.0),
    ("rri_decay_scale", 1.01),
    ("rri_insert_scale", -1.0),
    ("dt_scale", 0.0),
    ("dt_scale", math.inf),
    ("ssd_window", -1),
    ("ssd_window", 1.5),
    ("state_norm", "layer"),
    ("state_norm_chunk", 0),
    ("state_norm_threshold", 0.0),
  ],
)
def test_config_validation_names_the_field(field, value):
  with pytest.raises(ConfigError, match=rf"Mamba2Config\.{field}:"):
    CFG.replace(**{field: value})


def test_config_rejects_unsupported_combinations():
  with pytest.raises(ConfigError, match=r"ssd_window.*ssd_impl"):
    CFG.replace(ssd_window=4, ssd_impl="pallas_tpu")
  with pytest.raises(ConfigError, match=r"ssd_window.*state_norm"):
    CFG.replace(ssd_window=4, state_norm="chunk")
  c = CFG.replace(state_norm="chunk")
  assert Mamba2Config.from_json(c.to_json()) == c  # inf threshold survives JSON
