"""impl="pallas_gpu" (Pallas kernels lowered through Triton) in interpret mode vs impl="reference".

Forward output, final state and the gradients w.r.t. every input of the public op (x, dt, A,
B, C, D, dt_bias, initial_state) on fresh random inputs. The oracle is the per-token reference
scan run in float64 on the same (dtype-rounded) inputs. Shapes are small because interpret mode
runs every program of the grid on the CPU; each case is one jitted value-and-grad call.

Tolerances (max |error| / max |oracle| per output):
  fp32: y, final state 5e-5; gradients 1e-4 (measured: <= 2e-6 with chunks of 16-128 and
  <= 2.5e-5 with chunk 256, the same as the XLA chunked path there: it is the rounding of the
  fp32 decay cumsum over a chunk; d A <= 1e-5 even where exp(A dt Q) underflows, since the
  kernels' log-decay gradient has no cancelling terms).
  bf16 inputs (the kernels feed bf16 operands to the dots, fp32 accumulation): y, final state
  1.5e-2; gradients 3e-2 (measured: <= 6e-3).
The head-block cases (several heads of one group per program: C B^T once per block, dB/dC summed
in the kernel) run with the same tolerances (measured: fp32 <= 3e-6, bf16 <= 8e-3);
``pytest -s`` prints each case's errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.ssd import api as ssd_api
from mamba2_jax.ssd import ssd
from pallas_kernels.ssd_gpu import ops

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")


def make_inputs(
  seed, b, L, H, P, G, N, *, dtype=jnp.float32, a_range=(0.0, 1.5), dt_shift=-1.0, D_per_p=False
):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s)  # noqa: E731
  vals = dict(
    x=f(b, L, H, P),
    dt=f(b, L, H) + dt_shift,
    A=-np.exp(rng.uniform(*a_range, size=H)),
    B=f(b, L, G, N),
    C=f(b, L, G, N),
    D=f(H, P) if D_per_p else f(H),
    dt_bias=rng.uniform(-1.0, 1.0, size=H),
    h0=f(b, H, P, N),
  )
  out = {k: jnp.asarray(v, dtype if k in ("x", "B", "C") else jnp.float32) for k, v in vals.items()}
  return out


def seg_ids(kind, b, L, Q, seed=0):
  rng = np.random.default_rng(seed)
  if kind is None:
    return None
  if kind == "random":  # a few boundaries anywhere (most off chunk edges)
    s = np.sort(rng.integers(0, max(2, L // 6), size=(b, L)), axis=1)
  elif kind == "edges":  # boundaries exactly at chunk starts, one mid-chunk, one at position 1
    s = np.tile(np.arange(L) // Q, (b, 1))
    s[:, min(L - 1, Q + 3) :] += 10
    s[:, 1:] += 100
  else:
    raise ValueError(kind)
  return jnp.asarray(s, jnp.int32)


@functools.lru_cache(maxsize=None)
def _vg(impl, chunk_size, dt_softplus, dt_limit, with_seg):
  def loss(args, seg, wy, wh):
    x, dt, A, B, C, D, dt_bias, h0 = args
    y, h = ssd(
      x,
      dt,
      A,
      B,
      C,
      D=D,
      dt_bias=dt_bias,
      dt_softplus=dt_softplus,
      dt_limit=dt_limit,
      chunk_size=chunk_size,
      initial_state=h0,
      segment_ids=seg if with_seg else None,
      return_final_state=True,
      impl=impl,
    )
    return jnp.sum(y.astype(wy.dtype) * wy) + jnp.sum(h * wh), (y, h)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _run(impl, inp, seg, chunk, softplus, limit, wy, wh):
  args = tuple(inp[k] for k in NAMES)
  (_, (y, h)), g = _vg(impl, chunk, softplus, limit, seg is not None)(args, seg, wy, wh)
  return y, h, dict(zip(NAMES, g))


def _oracle(inp, seg, chunk, softplus, limit, wy, wh):
  with jax.enable_x64(True):
    inp64 = {k: jnp.asarray(np.asarray(v.astype(jnp.float32)), jnp.float64) for k, v in inp.items()}
    y, h, g = _run(
      "reference",
      inp64,
      seg,
      chunk,
      softplus,
      limit,
      jnp.asarray(np.asarray(wy), jnp.float64),
      jnp.asarray(np.asarray(wh), jnp.float64),
    )
    return np.asarray(y), np.asarray(h), {k: np.asarray(v) for k, v in g.items()}


def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check(
  inp,
  *,
  seg=None,
  chunk=16,
  softplus=True,
  limit=(0.0, float("inf")),
  bf16=False,
  impl="pallas_gpu",
  tol_grad_A=None,
):
  b, L, H, P = inp["x"].shape
  rng = np.random.default_rng(123)
  wy = jnp.asarray(rng.standard_normal((b, L, H, P)), jnp.float32)
  wh = jnp.asarray(rng.standard_normal((b, H, P, inp["B"].shape[-1])), jnp.float32)
  limit = tuple(float(v) for v in limit)
  y, h, g = _run(impl, inp, seg, chunk, softplus, limit, wy, wh)
  y0, h0, g0 = _oracle(inp, seg, chunk, softplus, limit, wy, wh)
  assert y.dtype == inp["x"].dtype and h.dtype == jnp.float32
  t_out, t_g, t_a = (1.5e-2, 3e-2, 3e-2) if bf16 else (5e-5, 1e-4, 1e-4)
  if tol_grad_A is not None:
    t_a = tol_grad_A
  errs = {"y": rel(y, y0), "final_state": rel(h, h0)}
  errs.update({f"d{k}": rel(g[k], g0[k]) for k in NAMES})
  for k, e in errs.items():
    tol = t_out if k in ("y", "final_state") else (t_a if k in ("dA", "ddt_bias") else t_g)
    assert np.isfinite(e) and e <= tol, f"{k}: rel err {e:.3g} > {tol} (all: {errs})"
  print("rel errors (pytest -s):", " ".join(f"{k}={e:.2g}" for k, e in errs.items()))
  return errs


def _impl_with(name, **cfg_kw):
  """Register impl ``name``: the pallas_gpu core (interpret mode) with make_config overrides."""
  core = functools.partial(ops.ssd_gpu_core, interpret=True, **cfg_kw)
  ssd_api.register_impl(
    name,
    lambda prep, *, chunk_size, D=None: core(prep, chunk_size=chunk_size, D=D),
    overwrite=True,
    fuses_skip=True,
  )
  return name


# (seed, b, L, H, P, G, N, chunk, segments, options)
# H = 3 or 5 is a multiple of no block; P = 12 / N = 20 exercise the power-of-two padding;
# L = 37, 50, 150 are not multiples of the chunk; L = 1 is a single (padded) chunk.
CASES = [
  pytest.param(0, 1, 1, 3, 16, 1, 16, 16, None, {}, id="L1"),
  pytest.param(1, 2, 37, 4, 16, 2, 16, 16, "random", dict(D_per_p=True), id="L37-G2-seg"),
  pytest.param(2, 1, 64, 3, 12, 1, 20, 16, "edges", {}, id="L64-P12-N20-seg-edges"),
  pytest.param(
    3,
    1,
    50,
    2,
    16,
    2,
    16,
    32,
    "random",
    dict(a_range=(2.5, 3.5), dt_shift=1.0),
    id="strong-decay-G2",
  ),
  pytest.param(4, 1, 150, 5, 16, 1, 16, 128, "edges", {}, id="L150-Q128-2blocks"),
]


@pytest.mark.parametrize("seed,b,L,H,P,G,N,chunk,seg,opts", CASES)
def test_pallas_gpu_fp32_matches_reference(seed, b, L, H, P, G, N, chunk, seg, opts):
  inp = make_inputs(seed, b, L, H, P, G, N, **opts)
  check(inp, seg=seg_ids(seg, b, L, chunk, seed), chunk=chunk)


def test_strong_decay_underflows():
  """exp(A dt Q) underflows to 0 (A dt ~ -30 per token): no inf/NaN, still exact."""
  inp = make_inputs(7, 1, 40, 2, 16, 1, 16, a_range=(3.0, 3.5), dt_shift=2.0)
  dtv = jax.nn.softplus(inp["dt"] + inp["dt_bias"])
  assert float(jnp.max(jnp.exp(dtv * inp["A"] * 16))) == 0.0
  check(inp, seg=seg_ids("random", 1, 40, 16), chunk=16)


def test_dt_limit_no_softplus():
  inp = make_inputs(5, 1, 33, 3, 16, 1, 16, dt_shift=0.5)
  check(inp, chunk=16, softplus=False, limit=(0.05, 0.6))


def test_multiple_row_blocks_in_chunk():
  """block_l < Q: row/column blocks within a chunk, causal skipping of the column loop."""
  name = _impl_with("pallas_gpu_test_bl16", block_l=16, block_p=16, block_n=16)
  inp = make_inputs(6, 1, 70, 3, 16, 1, 32)
  check(inp, seg=seg_ids("random", 1, 70, 32, 6), chunk=32, impl=name)


def test_bf16_inputs():
  inp = make_inputs(8, 2, 45, 4, 16, 2, 16, dtype=jnp.bfloat16)
  check(inp, seg=seg_ids("random", 2, 45, 16), chunk=16, bf16=True)


def test_chunk_size_rounding():
  """A non-power-of-two chunk size runs with the power of two below it; same results."""
  cfg = ops.make_config(100, 16, 16, jnp.float32, 48, has_seg=False, interpret=True)
  assert cfg.Q == 32 and cfg.BL == 32
  assert ops.make_config(1, 64, 128, jnp.bfloat16, 256, has_seg=True, interpret=True).Q == 16
  inp = make_inputs(9, 1, 30, 2, 16, 1, 16)
  check(inp, chunk=24)


# Head blocks (several heads of one group per program; C B^T once per block, dB/dC reduced
# over the block in the kernel): (seed, b, L, H, G, chunk, head_block, block_l, segments, dtype)
HEAD_BLOCK_CASES = [
  # 2 head blocks per group (fp32 partials summed by XLA), G = 2
  pytest.param(20, 2, 45, 8, 2, 16, 2, 64, "random", "float32", id="G2-hb2-of4-seg"),
  # one block = the whole group of 3 heads (not a power of two; dB/dC written by the kernel)
  pytest.param(21, 1, 70, 6, 2, 32, 3, 64, "edges", "float32", id="G2-hb3-whole-seg-edges"),
  # several row blocks per chunk (causal skipping) with 2 blocks of 2 heads, no segments
  pytest.param(22, 1, 70, 4, 1, 32, 2, 16, None, "float32", id="G1-hb2-of4-bl16"),
  # bf16 inputs, hb = whole group: dB/dC and dx leave the kernels in bf16
  pytest.param(23, 2, 45, 4, 2, 16, 2, 64, "random", "bfloat16", id="G2-hb2-whole-bf16-seg"),
  # bf16, 2 head blocks per group, several row blocks
  pytest.param(24, 1, 70, 8, 2, 32, 2, 16, "random", "bfloat16", id="G2-hb2-of4-bf16-bl16-seg"),
]


@pytest.mark.parametrize("seed,b,L,H,G,chunk,hb,bl,seg,dtype", HEAD_BLOCK_CASES)
def test_head_blocks(seed, b, L, H, G, chunk, hb, bl, seg, dtype):
  dt_ = jnp.dtype(dtype)
  name = _impl_with(
    f"pallas_gpu_test_hb{hb}_bl{bl}", head_block=hb, block_l=bl, block_p=16, block_n=16
  )
  inp = make_inputs(seed, b, L, H, 16, G, 16, dtype=dt_, a_range=(0.0, 2.5))
  check(inp, seg=seg_ids(seg, b, L, chunk, seed), chunk=chunk, impl=name, bf16=dt_ == jnp.bfloat16)


def test_head_block_rule():
  """HB: the largest divisor of H/G <= max_heads (2) that keeps >= 264 programs
  b*T*nL*(H/HB); 8 warps for the chunk-local kernels when HB > 1."""
  mk = functools.partial(
    ops.make_config, P=64, N=128, dtype=jnp.bfloat16, chunk_size=256, has_seg=False, interpret=True
  )
  cfg = mk(2048, H=24, G=1)  # 1*8*4 = 32 row blocks x 24/2 head blocks = 384 programs
  assert (cfg.HB, cfg.chunk_warps, cfg.num_warps) == (2, 8, 4)
  assert mk(2048, H=24, G=1, max_heads=4).HB == 2  # 4 heads: 192 programs < 264
  assert mk(4096, H=24, G=1, max_heads=4).HB == 4
  assert mk(8192, H=80, G=1).HB == 2
  assert mk(8192, H=80, G=8, max_heads=8).HB == 5  # groups of 10 heads: divisors 1, 2, 5, 10
  assert mk(8192, H=5, G=1).HB == 1
  cfg = mk(64, H=3, G=1)  # 4 programs at most: parallelism first
  assert (cfg.HB, cfg.chunk_warps) == (1, 4)
  assert mk(64, H=6, G=2, head_block=3).HB == 3
  with pytest.raises(ValueError):
    mk(64, H=6, G=2, head_block=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_published_head_shapes(dtype):
  """headdim 64, d_state 128, chunk 256 (4 row blocks per chunk), 2 chunks, segments."""
  dt_ = jnp.dtype(dtype)
  inp = make_inputs(10, 1, 300, 2, 64, 1, 128, dtype=dt_)
  check(inp, seg=seg_ids("random", 1, 300, 256), chunk=256, bf16=dt_ == jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("G,seg", [(1, "random"), (5, "edges"), (1, None)])
def test_published_shapes_longer(G, seg):
  """Bigger grid: 5 heads, 1100 tokens (5 chunks of 256, ragged), G in {1, 5}, strong decays."""
  inp = make_inputs(11 + G, 2, 1100, 5, 64, G, 128, a_range=(0.0, 3.0))
  check(inp, seg=seg_ids(seg, 2, 1100, 256, G), chunk=256)


@pytest.mark.slow
def test_published_shapes_default_head_blocks():
  """A grid big enough for the default rule to pick HB = 2 (2*5*4 row blocks x 16/2 head
  blocks = 320 programs): 16 heads in 2 groups, so 4 head blocks (fp32 dB/dC partials) per
  group, 8 warps; ragged L, segments, strong decays."""
  b, L, H, G, chunk = 2, 1100, 16, 2, 256
  cfg = ops.make_config(
    L, 64, 128, jnp.float32, chunk, has_seg=True, interpret=True, H=H, G=G, batch=b
  )
  assert (cfg.HB, cfg.chunk_warps) == (2, 8)
  inp = make_inputs(31, b, L, H, 64, G, 128, a_range=(0.0, 3.0))
  check(inp, seg=seg_ids("random", b, L, chunk, 31), chunk=chunk)
