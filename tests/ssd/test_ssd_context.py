"""Context parallelism (mamba2_jax/ssd/context.py) on the 8 simulated CPU devices.

The sequence is split over the "context" axis of a ("data", "fsdp", "context", "tensor") mesh;
outputs, the final state and every gradient (x, dt, A, B, C, D, dt_bias, initial_state) are
compared with the float64 per-token reference on the whole sequence. Tolerance, per output and
per gradient: 3x the error of the plain unsharded `xla` path on the same inputs (what fp32
chunked arithmetic achieves there), plus a 1e-5 floor relative to the largest reference value
(fp32 sums over one shard's tokens; the summaries are scanned in fp32 too).

Cases: shard lengths that are not a multiple of the chunk, strong decays (exp underflows to 0
within a shard), and segment ids with documents that cross shard edges, span several shards,
start exactly on a shard edge, and several documents inside one shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.ssd import ssd
from mamba2_jax.ssd.sharded import sharded_ssd

AXES = ("data", "fsdp", "context", "tensor")
DIFF = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")


def _mesh(shape):
  devs = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  return jax.sharding.Mesh(devs, AXES)


def _inputs(seed, b, L, H, P, G, N, *, a_range=(0.0, 1.5)):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  inp = dict(
    x=f(b, L, H, P),
    dt=f(b, L, H) - 1.0,
    A=-np.exp(rng.uniform(*a_range, (H,))).astype(np.float32),
    B=f(b, L, G, N),
    C=f(b, L, G, N),
    D=f(H),
    dt_bias=f(H) * 0.5,
    h0=f(b, H, P, N),
  )
  w = (f(b, L, H, P), f(b, H, P, N))
  return inp, w


def _segments(b, L, n):
  """Per row: a boundary inside shard 0, one exactly on the edge of shard 1, three inside
  shard 2, none over shards 3..n-2 (one document spans them), one inside the last shard."""
  Lc = L // n
  edges = [Lc // 2, Lc, 2 * Lc + 1, 2 * Lc + 3, 2 * Lc + Lc // 2, (n - 1) * Lc + 2]
  seg = np.zeros((b, L), np.int32)
  for r in range(b):
    for e in edges:
      seg[r, e + r :] += 1  # row r shifted by r: edges land differently per row
  return seg


def _loss(fn, diff, seg, w):
  x, dt, A, B, C, D, dt_bias, h0 = diff
  y, h = fn(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=h0, segment_ids=seg)
  return jnp.sum(y * w[0]) + jnp.sum(h * w[1]), (y, h)


def _run(fn, diff, seg, w):
  (_, (y, h)), g = jax.jit(jax.value_and_grad(functools.partial(_loss, fn), has_aux=True))(
    diff, seg, w
  )
  return [np.asarray(a, np.float64) for a in (y, h, *g)]


CASES = [
  # mesh (data, fsdp, context, tensor), impl, (b, L, H, P, G, N), chunk, strong decays
  ((1, 1, 8, 1), "xla", (1, 88, 4, 4, 2, 8), 8, False),  # 11 tokens per shard, chunk 8
  ((1, 1, 8, 1), "xla", (1, 88, 4, 4, 2, 8), 8, True),
  ((2, 1, 2, 2), "xla", (2, 48, 4, 4, 2, 8), 16, False),  # with data and tensor axes
  ((1, 1, 4, 1), "reference", (1, 44, 2, 4, 1, 8), 8, False),
  ((1, 1, 4, 2), "pallas_tpu", (1, 52, 4, 4, 2, 8), 8, False),
  ((2, 1, 4, 1), "pallas_gpu", (2, 52, 4, 4, 2, 8), 8, True),
]


@pytest.mark.parametrize(
  "case",
  CASES,
  ids=lambda c: (
    f"{'x'.join(map(str, c[0]))}-{c[1]}-L{c[2][1]}-Q{c[3]}" + ("-strong" if c[4] else "")
  ),
)
@pytest.mark.parametrize("segments", [False, True], ids=["noseg", "seg"])
def test_context_sharded_matches_float64_reference(case, segments):
  mesh_shape, impl, (b, L, H, P, G, N), chunk, strong = case
  n = mesh_shape[2]
  inp, w = _inputs(L + H + n, b, L, H, P, G, N, a_range=(1.5, 3.0) if strong else (0.0, 1.5))
  seg = jnp.asarray(_segments(b, L, n)) if segments else None
  diff32 = tuple(jnp.asarray(inp[k]) for k in DIFF)
  kw = dict(chunk_size=chunk, return_final_state=True)
  sharded = sharded_ssd(_mesh(mesh_shape), ssd, impl=impl, **kw)
  got = _run(sharded, diff32, seg, w)
  xla = _run(functools.partial(ssd, impl="xla", **kw), diff32, seg, w)
  with jax.enable_x64(True):
    diff64 = tuple(jnp.asarray(inp[k], jnp.float64) for k in DIFF)
    w64 = tuple(jnp.asarray(a, jnp.float64) for a in w)
    ref = _run(functools.partial(ssd, impl="reference", **kw), diff64, seg, w64)
  for name, a, x, r in zip(("y", "final_state", *(f"d{k}" for k in DIFF)), got, xla, ref):
    scale = max(float(np.max(np.abs(r))), 1.0)
    tol = 3 * float(np.max(np.abs(x - r))) + 1e-5 * scale
    err = float(np.max(np.abs(a - r)))
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (xla's {np.max(np.abs(x - r)):.3g})"


def test_context_output_stays_sequence_sharded():
  mesh = _mesh((1, 1, 4, 2))
  inp, _ = _inputs(0, 1, 32, 4, 4, 2, 8)
  args = [jnp.asarray(inp[k]) for k in ("x", "dt", "A", "B", "C")]
  y = jax.jit(sharded_ssd(mesh, ssd, impl="xla", chunk_size=8))(*args)
  assert y.sharding.spec[1] == "context" and y.sharding.spec[2] == "tensor"


def test_ssd_routes_every_impl_per_shard_under_a_context_mesh():
  """`ssd` under jax.set_mesh with a context axis > 1 runs the xla impl per shard too (XLA
  alone would not pass the state between sequence shards in order)."""
  inp, _ = _inputs(1, 1, 32, 4, 4, 2, 8)
  args = [jnp.asarray(inp[k]) for k in ("x", "dt", "A", "B", "C")]
  mesh = jax.make_mesh((1, 1, 4, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  f = lambda *a: ssd(*a, chunk_size=8, impl="xla", return_final_state=True)
  with jax.set_mesh(mesh):
    y, h = jax.jit(f)(*args)
    text = jax.jit(f).lower(*args).as_text()
  y0, h0 = f(*args)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(h), np.asarray(h0), rtol=2e-5, atol=2e-5)
  assert "all-gather" in text or "all_gather" in text


def test_context_errors():
  mesh = _mesh((1, 1, 4, 1))
  inp, _ = _inputs(0, 1, 30, 4, 4, 2, 8)  # 30 tokens over context 4
  args = [jnp.asarray(inp[k]) for k in ("x", "dt", "A", "B", "C")]
  with pytest.raises(ValueError, match="sequence length 30 is not divisible by the size 4"):
    sharded_ssd(mesh, ssd, impl="xla")(*args)
  inp, _ = _inputs(0, 1, 32, 4, 4, 2, 8)
  args = [jnp.asarray(inp[k]) for k in ("x", "dt", "A", "B", "C")]
  with pytest.raises(ValueError, match="window= and state_hook= are not supported"):
    sharded_ssd(mesh, ssd, impl="xla", window=4)(*args)
