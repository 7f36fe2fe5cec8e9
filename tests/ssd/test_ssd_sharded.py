"""mamba2_jax.ssd.sharded.sharded_ssd on the 8 simulated CPU devices (tests/conftest.py).

Meshes over ("data", "fsdp", "tensor"): (2, 1, 4) (batch over data, heads over tensor) and
(8, 1, 1) (tensor axis of size 1). impl="xla", "pallas_tpu" and "pallas_gpu" (interpret mode) must
equal the unsharded op, outputs and gradients (x, dt, A, B, C, D, dt_bias, initial_state),
for the three B/C placements: groups split over tensor (G % tp == 0), one group per shard
(replicated, sliced) and one group per local head (replicated, gathered).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mamba2_jax.ssd import ssd
from mamba2_jax.ssd.sharded import sharded_ssd

AXES = ("data", "fsdp", "tensor")
DIFF = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")


def _mesh(shape):
  devs = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  return Mesh(devs, AXES)


def _inputs(seed, b, L, H, P, G, N):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  inp = dict(
    x=f(b, L, H, P),
    dt=f(b, L, H) - 1.0,
    A=-jnp.exp(jnp.asarray(rng.uniform(0, 1.5, (H,)), jnp.float32)),
    B=f(b, L, G, N),
    C=f(b, L, G, N),
    D=f(H),
    dt_bias=f(H) * 0.5,
    h0=f(b, H, P, N),
  )
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, L)), axis=1), jnp.int32)
  w = (f(b, L, H, P), f(b, H, P, N))
  return inp, seg, w


def _loss(fn, diff, seg, w):
  x, dt, A, B, C, D, dt_bias, h0 = diff
  y, h = fn(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=h0, segment_ids=seg)
  return jnp.sum(y * w[0]) + jnp.sum(h * w[1]), (y, h)


@functools.lru_cache(maxsize=None)
def _vg(mesh_shape, impl):
  kw = dict(impl=impl, chunk_size=8, return_final_state=True)
  if mesh_shape is None:
    fn = functools.partial(ssd, **kw)
  else:
    fn = sharded_ssd(_mesh(mesh_shape), ssd, batch_axes=("data", "fsdp"), head_axis="tensor", **kw)
  return jax.jit(jax.value_and_grad(functools.partial(_loss, fn), has_aux=True))


CASES = [
  # mesh, impl, (b, L, H, P, G, N)
  ((2, 1, 4), "xla", (2, 19, 8, 4, 4, 8)),  # groups split over tensor
  ((2, 1, 4), "xla", (2, 19, 8, 4, 2, 8)),  # G=2 < tp=4: one group per shard
  ((2, 1, 4), "xla", (2, 19, 12, 4, 3, 8)),  # G=3, 3 heads/shard across groups: gather
  ((8, 1, 1), "xla", (8, 11, 4, 4, 2, 8)),  # tensor axis of size 1
  ((2, 1, 4), "pallas_tpu", (2, 19, 8, 4, 2, 8)),
  ((2, 1, 4), "pallas_tpu", (2, 13, 12, 4, 3, 8)),
  ((8, 1, 1), "pallas_tpu", (8, 11, 4, 4, 1, 8)),
  # headdim 32, 4 heads per shard: the kernel's packed (b, L, H*P) layout inside shard_map
  ((2, 1, 4), "pallas_tpu", (2, 13, 16, 32, 2, 8)),
  ((2, 1, 4), "pallas_gpu", (2, 13, 8, 4, 2, 8)),
]


@pytest.mark.parametrize(
  "case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}-H{c[2][2]}G{c[2][4]}"
)
def test_sharded_matches_unsharded(case):
  mesh_shape, impl, (b, L, H, P, G, N) = case
  inp, seg, w = _inputs(sum(mesh_shape) + H + G, b, L, H, P, G, N)
  diff = tuple(inp[k] for k in DIFF)
  (_, (y0, h0)), g0 = _vg(None, impl)(diff, seg, w)
  (_, (y1, h1)), g1 = _vg(mesh_shape, impl)(diff, seg, w)
  tol = dict(rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), **tol)
  np.testing.assert_allclose(np.asarray(h1), np.asarray(h0), **tol)
  for n, a, r in zip(DIFF, g1, g0):
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(r), rtol=0, atol=2e-5 * max(scale, 1.0), err_msg=f"d{n}"
    )


def test_sharded_output_is_sharded_and_y_only():
  mesh = _mesh((2, 1, 4))
  inp, _, _ = _inputs(0, 2, 9, 8, 4, 4, 8)
  f = jax.jit(
    lambda x, dt, A, B, C: sharded_ssd(mesh, ssd, impl="xla", chunk_size=8)(x, dt, A, B, C)
  )
  y = f(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
  yr = ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=8, impl="xla")
  np.testing.assert_allclose(np.asarray(y), np.asarray(yr), rtol=2e-5, atol=2e-5)
  assert y.sharding.spec[2] == "tensor"


def test_sharded_errors():
  mesh = _mesh((2, 1, 4))
  inp, _, _ = _inputs(0, 2, 9, 6, 4, 2, 8)  # 6 heads over tensor=4
  f = sharded_ssd(mesh, ssd, impl="xla")
  with pytest.raises(
    ValueError, match="nheads 6 is not divisible by the size 4 of head axis 'tensor'"
  ):
    f(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
  inp, _, _ = _inputs(0, 3, 9, 8, 4, 2, 8)  # batch 3 over data=2
  with pytest.raises(ValueError, match="batch 3 is not divisible"):
    f(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])


def test_ssd_routes_pallas_per_shard_under_a_mesh():
  """`ssd` itself, under jax.set_mesh with a Pallas impl, runs per shard (shard_map) and equals
  the unsharded call, outputs and final state."""
  inp, seg, _ = _inputs(3, 2, 13, 8, 4, 2, 8)
  mesh = jax.make_mesh((2, 1, 4), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def f(x, dt, A, B, C, D, dt_bias, h0, seg):
    return ssd(
      x,
      dt,
      A,
      B,
      C,
      D=D,
      dt_bias=dt_bias,
      initial_state=h0,
      segment_ids=seg,
      impl="pallas_tpu",
      chunk_size=8,
      return_final_state=True,
    )

  args = [inp[k] for k in DIFF] + [seg]
  want = jax.jit(f)(*args)
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(f)(*args))
    got = jax.jit(f)(*args)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_model_runs_pallas_per_shard_under_a_mesh(impl):
  """Under jax.set_mesh, the model's `ssd` call runs a Pallas impl through sharded_ssd, and
  the model's logits equal the unsharded XLA-path model's."""
  from flax import nnx

  from mamba2_jax import Mamba2Config, Mamba2LM

  cfg = Mamba2Config.preset(
    "tiny", d_model=32, headdim=8, d_state=16, chunk_size=16, ngroups=2, ssd_impl=impl
  )
  model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
  ref = Mamba2LM(cfg.replace(ssd_impl="xla"), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, cfg.vocab_size)
  mesh = jax.make_mesh((2, 1, 4), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(fwd)(state, tokens))
    got = fwd(state, tokens)
  want = ref(tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
