import math

import pytest

from mamba2_jax import ConfigError, Mamba2Config
from mamba2_jax.config import PRESETS


def test_defaults_are_official_130m_shapes():
  c = Mamba2Config.preset("mamba2-130m")
  assert (c.d_inner, c.nheads, c.conv_dim, c.d_in_proj) == (1536, 24, 1792, 3352)
  assert c.padded_vocab_size == 50288
  assert c.dt_limit == (0.0, math.inf)


@pytest.mark.parametrize(
  "name,d_in_proj,conv_dim,params_m",
  [
    ("mamba2-130m", 3352, 1792, 129.0),
    ("mamba2-370m", 4384, 2304, 368.3),
    ("mamba2-780m", 6448, 3328, 780.2),
    ("mamba2-1.3b", 8512, 4352, 1343.8),
    ("mamba2-2.7b", 10576, 5376, 2702.6),
  ],
)
def test_published_presets(name, d_in_proj, conv_dim, params_m):
  c = Mamba2Config.preset(name)
  assert c.d_in_proj == d_in_proj and c.conv_dim == conv_dim
  assert abs(c.num_params() / 1e6 - params_m) < 0.15


@pytest.mark.parametrize(
  "name,ns_m", [("mamba2-130m", 4.848), ("mamba2-370m", 12.915), ("mamba2-780m", 19.354)]
)
def test_state_size_matches_paper(name, ns_m):
  assert abs(Mamba2Config.preset(name).state_size / 1e6 - ns_m) < 1e-3


@pytest.mark.parametrize(
  "changes,field,fragment",
  [
    (dict(headdim=100), "headdim", "d_model*expand % headdim != 0"),
    (dict(ngroups=5), "ngroups", "nheads % ngroups != 0"),
    (dict(d_state=0), "d_state", "positive integer"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min", "dt_min <= dt_max"),
    (dict(A_init_range=(0.0, 16.0)), "A_init_range", "0 < lo <= hi"),
    (dict(dt_limit=(0.5, 0.1)), "dt_limit", "lo < hi"),
    (dict(dtype="float8"), "dtype", "must be one of"),
    (dict(remat_policy="sometimes"), "remat_policy", "must be one of"),
    (dict(ssd_impl="cuda"), "ssd_impl", "must be one of"),
  ],
)
def test_validation_names_field_and_rule(changes, field, fragment):
  with pytest.raises(ConfigError) as e:
    Mamba2Config.preset("tiny", **changes)
  assert f"Mamba2Config.{field}" in str(e.value) and fragment in str(e.value)


def test_unknown_field_and_preset():
  with pytest.raises(ConfigError, match="unknown field"):
    Mamba2Config.preset("tiny").replace(dmodel=3)
  with pytest.raises(ConfigError, match="allowed"):
    Mamba2Config.preset("mamba2-7b")


def test_json_round_trip_with_infinity():
  c = Mamba2Config.preset("tiny", dt_limit=(0.0, math.inf), A_init_range=[2, 8])
  assert Mamba2Config.from_json(c.to_json()) == c
  assert set(PRESETS) >= {"mamba2-130m", "mamba2-2.7b", "tiny"}
