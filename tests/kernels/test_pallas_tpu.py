"""impl="pallas_tpu" (Mosaic kernels, run here in interpret mode) against impl="reference".

Every case draws fresh random inputs, runs the public ``ssd(..., impl=...)`` with D, dt_bias,
initial_state (and segment ids where listed) and compares the output, the final state and
the gradients w.r.t. x, dt, A, B, C, D, dt_bias and initial_state of a random linear loss
in y and the final state. The oracle is the per-token scan in float64 (``jax.enable_x64``)
on the same (dtype-rounded) inputs.

Tolerances, max|a - b| / max|b| per tensor, every output and gradient alike:
  fp32 inputs: 2e-4 (the fp32 kernel differs from the fp64 oracle by rounding in the chunk
               sums and the fp32 decay cumsum; dA included, also under total decay: its
               gradient is cancellation-free, pallas_kernels/log_decay.py)
  bf16 inputs: 3e-2 (the MXU operands are bf16: the Q x Q decay-weighted CB, dt*x and the
               states are rounded to bf16 before each matmul, accumulation is fp32).
tests/ssd/test_ssd_production.py holds the kernels to tolerances derived from the xla path at the
production shapes; these cases cover the odd shapes and layouts.

Interpret mode is slow, so the shapes are small (P=8, 32 or 64, N=16, chunk 16) and each case
jits one ``value_and_grad`` per impl. Both x/y layouts are covered: head-major (b, H, L, P)
(P=8) and packed (b, L, H*P) with 128-lane head blocks (P=32, 64). A bigger grid is ``slow``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.ssd import ssd

Q = 16
TOL = {"float32": 2e-4, "bfloat16": 3e-2}


def _inputs(seed, b, L, H, P, G, N, *, a_range=(0.0, 1.5), dt_shift=-1.0):
  rng = np.random.default_rng(seed)
  return dict(
    x=rng.standard_normal((b, L, H, P)),
    dt=rng.standard_normal((b, L, H)) + dt_shift,
    A=-np.exp(rng.uniform(*a_range, size=(H,))),
    B=rng.standard_normal((b, L, G, N)),
    C=rng.standard_normal((b, L, G, N)),
    D=rng.standard_normal((H,)),
    dt_bias=rng.uniform(-1.0, 1.0, size=(H,)),
    h0=rng.standard_normal((b, H, P, N)),
    wy=rng.standard_normal((b, L, H, P)),
    wh=rng.standard_normal((b, H, P, N)),
  )


def _segments(kind, b, L, seed=0):
  if kind is None:
    return None
  rng = np.random.default_rng(seed)
  s = np.zeros((b, L), np.int32)
  if kind == "edges":  # boundaries exactly at chunk starts and one off the edge
    for t in range(L):
      s[:, t] = t // Q
    s[:, min(L - 1, Q + 5) :] += 7
  elif kind == "random":
    s = np.sort(rng.integers(0, max(2, L // 5), size=(b, L)), axis=1).astype(np.int32)
  elif kind == "pos1":
    s[:, 1:] = 1
  else:
    raise ValueError(kind)
  return s


DIFF = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")


@functools.lru_cache(maxsize=None)
def _vg(impl, chunk, softplus, limit, has_seg):
  def loss(diff, seg, wy, wh):
    x, dt, A, B, C, D, dt_bias, h0 = diff
    y, h = ssd(
      x,
      dt,
      A,
      B,
      C,
      D=D,
      dt_bias=dt_bias,
      dt_softplus=softplus,
      dt_limit=limit,
      chunk_size=chunk,
      initial_state=h0,
      segment_ids=seg if has_seg else None,
      return_final_state=True,
      impl=impl,
    )
    return jnp.sum(y.astype(wy.dtype) * wy) + jnp.sum(h.astype(wh.dtype) * wh), (y, h)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _run(impl, inp, dtype, seg, *, chunk=Q, softplus=True, limit=(0.0, float("inf"))):
  act = jnp.dtype(dtype)
  diff = tuple(
    jnp.asarray(
      inp[k], act if k in ("x", "B", "C") else (jnp.float64 if act == jnp.float64 else jnp.float32)
    )
    for k in DIFF
  )
  wdt = jnp.float64 if act == jnp.float64 else jnp.float32
  segj = None if seg is None else jnp.asarray(seg)
  (_, (y, h)), g = _vg(impl, chunk, softplus, tuple(limit), seg is not None)(
    diff, segj, jnp.asarray(inp["wy"], wdt), jnp.asarray(inp["wh"], wdt)
  )
  return [np.asarray(v, np.float64) for v in (y, h, *g)]


def _oracle(inp, dtype, seg, **kw):
  # round x, B, C to the tested dtype first, then run the per-token scan in float64
  rounded = dict(inp)
  for k in ("x", "B", "C"):
    rounded[k] = np.asarray(jnp.asarray(inp[k], jnp.dtype(dtype)).astype(jnp.float32), np.float64)
  if dtype != "float32":
    for k in ("dt", "A", "D", "dt_bias", "h0"):
      rounded[k] = np.asarray(np.asarray(inp[k], np.float32), np.float64)
  with jax.enable_x64(True):
    return _run("reference", rounded, "float64", seg, **kw)


def _check(inp, dtype, seg, **kw):
  want = _oracle(inp, dtype, seg, **kw)
  got = _run("pallas_tpu", inp, dtype, seg, **kw)
  names = ("y", "final_state") + tuple("d" + k for k in DIFF)
  errs = {}
  for n, a, b in zip(names, got, want):
    assert a.shape == b.shape, n
    assert np.all(np.isfinite(a)), f"{n}: non-finite values"
    scale = np.max(np.abs(b))
    errs[n] = float(np.max(np.abs(a - b)) / max(scale, 1e-30))
  bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
  assert not bad, f"rel errors above {TOL[dtype]}: {bad} (all: {errs})"


# (seed, b, L, H, P, G, N, dtype, segments, extra)
CASES = [
  # L = 1; H=3 heads (no block size divides into a power of two)
  (1, 2, 1, 3, 8, 1, 16, "float32", None, {}),
  # L not a multiple of the chunk, G = 2, R = 5 heads per group: forward head block 5,
  # backward head block 1 (5 partial dB/dC blocks summed)
  (2, 1, 45, 10, 8, 2, 16, "float32", None, {}),
  # segment boundaries at chunk edges and mid-chunk, h0 only for the first run
  (3, 2, 48, 4, 8, 1, 16, "float32", "edges", {}),
  # random short segments, G = 2, softplus off + finite dt_limit
  (4, 1, 37, 4, 8, 2, 16, "float32", "random", dict(softplus=False, limit=(0.05, 3.0))),
  # strong decays: exp(A dt Q) underflows to 0 in fp32 (A down to -e^4, dt ~ 3)
  (5, 1, 40, 4, 8, 2, 16, "float32", "pos1", dict(strong=True)),
  # bf16 x/B/C, G = 2, L not a multiple of the chunk
  (6, 1, 35, 4, 8, 2, 16, "bfloat16", "edges", {}),
  # packed (b, L, H*P) layout: 4 heads x 32 lanes = 128-lane head blocks, G = 2
  (9, 1, 40, 8, 32, 2, 16, "float32", "edges", {}),
  # packed with headdim 64 (the published headdim), bf16, head blocks of 4 x 64 lanes
  (10, 1, 29, 4, 64, 1, 16, "bfloat16", "random", {}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[2]}-H{c[3]}-G{c[5]}-{c[7]}-{c[8]}")
def test_pallas_tpu_matches_reference(case):
  seed, b, L, H, P, G, N, dtype, segk, extra = case
  extra = dict(extra)
  strong = extra.pop("strong", False)
  kw = dict(a_range=(2.0, 4.0), dt_shift=3.0) if strong else {}
  inp = _inputs(seed, b, L, H, P, G, N, **kw)
  if strong:  # exp(A dt Q) underflows fp32 for most heads
    dtp = np.logaddexp(inp["dt"] + inp["dt_bias"], 0.0)
    assert np.float32(np.exp(np.min(inp["A"]) * np.median(dtp) * Q)) == 0.0
  _check(inp, dtype, _segments(segk, b, L, seed), **extra)


def test_pallas_tpu_no_h0_no_final():
  """Plain call without optional inputs (initial_state None, y only) matches the oracle."""
  inp = _inputs(7, 1, 20, 2, 8, 1, 16)
  args = [jnp.asarray(inp[k], jnp.float32) for k in ("x", "dt", "A", "B", "C")]
  y = ssd(*args, chunk_size=Q, impl="pallas_tpu")
  yr = ssd(*args, chunk_size=Q, impl="reference")
  np.testing.assert_allclose(
    np.asarray(y), np.asarray(yr), rtol=0, atol=2e-4 * float(jnp.max(jnp.abs(yr)))
  )


def test_pallas_tpu_layouts_agree():
  """pick_layout: packed whenever head blocks fill 128 lanes; both layouts give equal results."""
  from types import SimpleNamespace

  from pallas_kernels.ssd_tpu.ops import pick_layout, ssd_tpu_core

  assert pick_layout(24, 1, 64) == (8, 4, True)  # 130m
  assert pick_layout(80, 1, 64) == (8, 4, True)  # 2.7b
  assert pick_layout(3, 1, 64) == (3, 3, False)  # odd heads per group: head-major
  assert pick_layout(4, 1, 8) == (4, 4, False)
  inp = _inputs(12, 1, 27, 4, 64, 2, 16)
  j = {k: jnp.asarray(v, jnp.float32) for k, v in inp.items()}
  seg = jnp.asarray(_segments("random", 1, 27, 3))

  def f(layout, x, dt, A, B, C, h0):
    prep = SimpleNamespace(
      x=x, dt=jax.nn.softplus(dt), A=A, B=B, C=C, initial_state=h0, seg=seg, acc=jnp.float32
    )
    y, h = ssd_tpu_core(prep, chunk_size=Q, layout=layout, max_hb=(2, 2), interpret=True)
    return jnp.sum(y * j["wy"]) + jnp.sum(h * j["wh"]), (y, h)

  args = [j[k] for k in ("x", "dt", "A", "B", "C", "h0")]
  outs = [
    jax.jit(jax.value_and_grad(functools.partial(f, lay), argnums=tuple(range(6)), has_aux=True))(
      *args
    )
    for lay in ("packed", "head_major")
  ]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b)))
    )


def test_pallas_tpu_chunk_invariance_and_rounding():
  """Chunk sizes that are not multiples of 8 are rounded up (Mosaic sublane rule)."""
  from pallas_kernels.ssd_tpu.ops import chunk_len, pick_head_block

  assert chunk_len(256, 2048) == 256 and chunk_len(12, 100) == 16 and chunk_len(256, 5) == 8
  assert pick_head_block(24, 8) == 8 and pick_head_block(5, 4) == 1 and pick_head_block(80, 4) == 4
  assert pick_head_block(3, 8, 64) is None and pick_head_block(6, 8, 64) == 6
  inp = _inputs(8, 1, 30, 2, 8, 1, 16)
  args = [jnp.asarray(inp[k], jnp.float32) for k in ("x", "dt", "A", "B", "C")]
  y1 = ssd(*args, chunk_size=12, impl="pallas_tpu")
  y2 = ssd(*args, chunk_size=32, impl="pallas_tpu")
  np.testing.assert_allclose(
    np.asarray(y1), np.asarray(y2), rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(y2)))
  )


SLOW_CASES = [
  (11, 2, 100, 6, 16, 2, 32, "float32", "random", {}),
  (12, 1, 130, 8, 16, 4, 32, "bfloat16", "edges", {}),
  (13, 2, 64, 8, 16, 1, 32, "float32", None, dict(strong=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: f"L{c[2]}-H{c[3]}-G{c[5]}-{c[7]}-{c[8]}")
def test_pallas_tpu_matches_reference_slow(case):
  test_pallas_tpu_matches_reference(case)


def test_pallas_tpu_core_split_in_tpu_interpret_mode():
  """The megacore split (two parallel units per group, dB/dC partials summed by XLA) run in TPU
  interpret mode with two simulated cores, randomised parallel order, race detection and
  NaN-poisoned uninitialised memory (``interpret=`` passes a pltpu.InterpretParams through),
  equals plain interpret mode without the split, outputs and gradients."""
  from types import SimpleNamespace

  from jax.experimental.pallas import tpu as pltpu

  from pallas_kernels.ssd_tpu.ops import core_split, ssd_tpu_core, tensorcores

  assert tensorcores("TPU v5") == 2 and tensorcores("TPU v4") == 2
  assert tensorcores("TPU v5 lite") == 1 and tensorcores("cpu") == 1 and tensorcores(None) == 1
  assert core_split(24, 4, 2) == 2 and core_split(20, 4, 2) == 1 and core_split(24, 4, 1) == 1
  params = pltpu.InterpretParams(
    detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2, random_seed=11
  )
  inp = _inputs(13, 1, 40, 8, 32, 2, 16)
  j = {k: jnp.asarray(v, jnp.float32) for k, v in inp.items()}
  seg = jnp.asarray(_segments("edges", 1, 40, 13))

  def f(split, interpret, x, dt, A, B, C, h0, D):
    prep = SimpleNamespace(
      x=x, dt=jax.nn.softplus(dt), A=A, B=B, C=C, initial_state=h0, seg=seg, acc=jnp.float32
    )
    y, h = ssd_tpu_core(
      prep,
      chunk_size=Q,
      max_hb=(4, 2),
      split=split,
      interpret=interpret,
      D=jnp.broadcast_to(D[:, None], x.shape[2:]),
    )
    return jnp.sum(y * j["wy"]) + jnp.sum(h * j["wh"]), (y, h)

  args = [j[k] for k in ("x", "dt", "A", "B", "C", "h0", "D")]
  outs = [
    jax.jit(
      jax.value_and_grad(functools.partial(f, sp, ip), argnums=tuple(range(7)), has_aux=True)
    )(*args)
    for sp, ip in ((2, params), (1, True))
  ]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b)))
    )


def test_pallas_tpu_head_block_fits_vmem_or_says_why():
  """The head block shrinks until a program fits the VMEM budget; when even one head does
  not fit, the error names the sizes and what to change."""
  from pallas_kernels.ssd_tpu.ops import VMEM_BUDGET, fit_head_block
  from pallas_kernels.ssd_tpu.kernel import vmem_bytes

  assert fit_head_block(8, 24, 256, 64, 128, 2, backward=False, packed=True) == 8  # 130m
  hb = fit_head_block(8, 16, 256, 256, 256, 2, backward=True, packed=True)
  assert hb < 8 and vmem_bytes(256, hb, 256, 256, 16 // hb, 2, backward=True) <= VMEM_BUDGET
  assert vmem_bytes(256, 2 * hb, 256, 256, 16 // (2 * hb), 2, backward=True) > VMEM_BUDGET
  with pytest.raises(
    ValueError,
    match=r"no head block fits the 16 MiB VMEM budget "
    r"\(backward: chunk 512, headdim 512, d_state 512.*smaller chunk_size",
  ):
    fit_head_block(4, 8, 512, 512, 512, 2, backward=True, packed=True)
