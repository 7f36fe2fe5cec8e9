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


# Speed settings: "auto" by platform, resolved at trace time --------------------------------


def test_speed_settings_default_to_auto_and_resolve_by_platform():
  c = Mamba2Config()  # the official defaults: 24 layers
  assert (c.chunk_size, c.scan_unroll) == ("auto", "auto")
  assert (c.resolved_chunk_size("cpu"), c.resolved_scan_unroll("cpu")) == (64, 1)  # > 8 layers
  for platform in ("tpu", "gpu", "cuda"):
    assert (c.resolved_chunk_size(platform), c.resolved_scan_unroll(platform)) == (256, 1)
  bench = Mamba2Config.preset("bench-cpu")
  assert (bench.resolved_chunk_size("cpu"), bench.resolved_scan_unroll("cpu")) == (64, 4)
  assert (bench.resolved_chunk_size(), bench.resolved_scan_unroll()) == (64, 4)  # this CPU host
  assert bench.resolved_scan_unroll("tpu") == 1
  explicit = bench.replace(chunk_size=128, scan_unroll=2)  # an int is honoured everywhere
  assert [explicit.resolved_chunk_size(p) for p in ("cpu", "tpu")] == [128, 128]
  assert [explicit.resolved_scan_unroll(p) for p in ("cpu", "tpu")] == [2, 2]
  # the FLOP count (MFU) uses the chunk the platform runs: one chunk of 128 on TPU, 2 on CPU
  from mamba2_jax.flops import ssd_flops_per_token

  h, p, n = bench.nheads, bench.headdim, bench.d_state
  assert ssd_flops_per_token(bench, 128, "tpu") == 2 * 128 * n + 2 * 128 * h * p
  assert ssd_flops_per_token(bench, 128, "cpu") == 2 * 64 * n + 2 * 64 * h * p + 4 * h * p * n


@pytest.mark.parametrize("field", ["chunk_size", "scan_unroll"])
@pytest.mark.parametrize("bad", [0, -64, "fast", 2.0, True, None])
def test_speed_settings_are_validated(field, bad):
  with pytest.raises(ConfigError) as e:
    Mamba2Config.preset("tiny", **{field: bad})
  assert f"Mamba2Config.{field}" in str(e.value)
  assert "positive integer or 'auto'" in str(e.value) and repr(bad) in str(e.value)


def test_speed_settings_from_command_lines_and_json():
  c = Mamba2Config.preset("tiny", chunk_size="64", scan_unroll=" 2")  # --config.model.x=64
  assert (c.chunk_size, c.scan_unroll) == (64, 2)
  for c in (Mamba2Config(), Mamba2Config.preset("tiny", chunk_size=16)):
    assert Mamba2Config.from_json(c.to_json()) == c


def test_training_configs_take_ints_and_auto():
  """configs/base.py: the fields accept both kinds (ml_collections otherwise locks the type),
  and a resumed run may change them (speed, not the function)."""
  from configs import base
  from mamba2_jax.train.config import model_config, resume_diff

  c = base.get_config()
  assert model_config(c).chunk_size == "auto"
  c.model.chunk_size, c.model.scan_unroll = 16, 1
  assert (model_config(c).chunk_size, model_config(c).scan_unroll) == (16, 1)
  c.model.chunk_size = "auto"
  assert model_config(c).chunk_size == "auto"
  saved = {"model": {"chunk_size": 256, "scan_unroll": 1, "d_model": 64}}
  now = {"model": {"chunk_size": "auto", "scan_unroll": "auto", "d_model": 64}}
  assert resume_diff(saved, now) == []


def test_model_resolves_for_the_platform_it_is_traced_for(monkeypatch):
  """The model reads the platform at trace time (what `jax.set_mesh` with TPU devices gives an
  AOT compile on a CPU host): the layer scan's unroll and the SSD's chunk follow it."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import mamba2_jax.mitigations.ssm as ssm_lib
  import mamba2_jax.ssd.platform as platform_lib
  from mamba2_jax import Mamba2LM

  chunks = []
  real_ssd = ssm_lib.ssd
  monkeypatch.setattr(
    ssm_lib, "ssd", lambda *a, chunk_size, **k: chunks.append(chunk_size) or real_ssd(*a, **k)
  )
  model = Mamba2LM(Mamba2Config.preset("tiny", ssd_impl="xla"), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 8), jnp.int32)

  def traced(platform):
    monkeypatch.setattr(platform_lib, "target_platform", lambda: platform)
    chunks.clear()
    jaxpr = jax.make_jaxpr(lambda t: Mamba2LM.__call__.uncompiled(model, t))(tokens)
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    return scan.params["unroll"], set(chunks)

  assert traced("cpu") == (2, {64})
  assert traced("tpu") == (1, {256})
