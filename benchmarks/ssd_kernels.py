"""Benchmark the SSD implementations (forward and forward+backward) on one layer.

Times every registered implementation of ``mamba2_jax.ssd.ssd`` ("reference" only
up to ``--ref-max-len`` tokens since the per-token scan is slow) on fp32 layer
shapes, batch 1:

  130m   H=24, P=64, N=128, G=1   L in {2048, 8192}, chunk 256
  2.7b   H=80, P=64, N=128, G=1   L in {2048, 8192}, chunk 256
  bench  H=8,  P=64, N=128, G=1   L=2048, chunk 64 / 128 / 256 (the CPU model shape)

fwd = jitted ``ssd(...)``; fwd+bwd = jitted gradient w.r.t. (x, dt, A, B, C) of
sum(y * w) with a fixed random cotangent w passed as an argument (a plain sum(y)
would let XLA constant-fold dy = 1). Each entry is the median (and min) of
``--reps`` runs after a compile/warm-up call, timed with ``block_until_ready``.

Usage:
  python benchmarks/ssd_kernels.py --out results.json
  python benchmarks/ssd_kernels.py --quick                 # bench shape only
  python benchmarks/ssd_kernels.py --shapes bench --chunks 32,64,128 --no-tune-malloc

Pallas implementations need their accelerator: ``pallas_gpu`` is timed only on a GPU
backend and ``pallas_tpu`` only on a TPU backend (on CPU they would run in interpret
mode, which is for tests only); elsewhere they are reported as skipped. On a GPU,
``pallas_gpu_tf32`` (the same kernels with TF32 instead of IEEE fp32 dots) is timed
too, and so is the mamba_ssm Triton kernel ``mamba_chunk_scan_combined`` (torch, same
shapes, fp32) when it is importable (impl name ``mamba_ssm``).
On CPU hosts glibc's malloc is tuned before JAX loads (``mamba2_jax.runtime.tune_for_this_host``;
``--no-tune-malloc`` keeps the defaults): XLA:CPU temp buffers above glibc's mmap threshold
(max 32 MiB) are otherwise mmap'ed fresh on every call and every page written
pays a page fault, which on this 2-core CPU made fwd+bwd ~1.5x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # allow `python benchmarks/ssd_kernels.py` from anywhere
  sys.path.insert(0, str(_ROOT))

from mamba2_jax.runtime import tune_for_this_host  # noqa: E402  (imports no numpy / jax)

# before numpy and jax start threads (see mamba2_jax/runtime.py)
_MALLOC_TUNED = "--no-tune-malloc" not in sys.argv and tune_for_this_host()

SHAPES = {
  "130m": dict(H=24, P=64, N=128, G=1),
  "2.7b": dict(H=80, P=64, N=128, G=1),
  "bench": dict(H=8, P=64, N=128, G=1),
}
DEFAULT_PLAN = [
  # (shape, L, chunk)
  ("bench", 2048, 64),
  ("bench", 2048, 128),
  ("bench", 2048, 256),
  ("130m", 2048, 256),
  ("130m", 8192, 256),
  ("2.7b", 2048, 256),
  ("2.7b", 8192, 256),
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", default=None, help="write results as JSON to this path")
  p.add_argument("--impls", default=None, help="comma list (default: every registered impl)")
  p.add_argument(
    "--shapes", default=None, help="comma list of shape names (default: the full plan)"
  )
  p.add_argument(
    "--lens", default=None, help="comma list of sequence lengths (overrides the plan's)"
  )
  p.add_argument("--chunks", default=None, help="comma list of chunk sizes (overrides the plan's)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--reps", type=int, default=5, help="timed runs per entry (median reported)")
  p.add_argument(
    "--ref-max-len",
    type=int,
    default=2048,
    help="run the per-token reference only up to this many tokens",
  )
  p.add_argument("--ref-shapes", default="bench,130m", help="shapes on which the reference runs")
  p.add_argument("--no-bwd", action="store_true", help="forward only")
  p.add_argument("--quick", action="store_true", help="bench shape, L=2048, chunks 64/128/256 only")
  p.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's default malloc")
  return p.parse_args(argv)


def build_plan(args):
  plan = list(DEFAULT_PLAN)
  if args.quick:
    plan = [e for e in plan if e[0] == "bench"]
  if args.shapes:
    names = args.shapes.split(",")
    for n in names:
      if n not in SHAPES:
        raise SystemExit(f"unknown shape {n!r}; known: {sorted(SHAPES)}")
    plan = [e for e in plan if e[0] in names] or [(n, 2048, 256) for n in names]
  if args.lens:
    lens = [int(v) for v in args.lens.split(",")]
    plan = sorted({(s, L, q) for (s, _, q) in plan for L in lens}, key=plan_key)
  if args.chunks:
    chunks = [int(v) for v in args.chunks.split(",")]
    plan = sorted({(s, L, q) for (s, L, _) in plan for q in chunks}, key=plan_key)
  return plan


_ACCEL = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}


def accel_skip(impl, backend):
  """Why ``impl`` is not timed on ``backend`` (None = time it)."""
  need = _ACCEL.get(impl)
  if need is not None and backend != need:
    return f"needs a {need.upper()} backend (Pallas; interpret mode on {backend} is for tests only)"
  return None


def mamba_ssm_timer(backend):
  """A timer for mamba_ssm's Triton SSD on the GPU (torch), or None when unavailable."""
  if backend != "gpu":
    return None
  try:
    import torch
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
  except Exception:  # noqa: BLE001 - not installed / no CUDA build
    return None
  if not torch.cuda.is_available():
    return None

  def run(b, L, H, P, N, G, Q, reps, bwd):
    dev, f32 = "cuda", torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=f32, generator=g)  # noqa: E731
    x, dt, Bm, Cm = rnd(b, L, H, P), rnd(b, L, H) - 2.0, rnd(b, L, G, N), rnd(b, L, G, N)
    A = -torch.exp(torch.rand(H, device=dev, generator=g) * torch.log(torch.tensor(16.0)))
    D, dt_bias, w = (
      torch.ones(H, device=dev),
      torch.rand(H, device=dev, generator=g) * 2 - 4,
      rnd(b, L, H, P),
    )

    def fwd():
      return mamba_chunk_scan_combined(x, dt, A, Bm, Cm, Q, D=D, dt_bias=dt_bias, dt_softplus=True)

    def fwd_bwd():
      args = [t.detach().requires_grad_() for t in (x, dt, A, Bm, Cm)]
      y = mamba_chunk_scan_combined(*args, Q, D=D, dt_bias=dt_bias, dt_softplus=True)
      return torch.autograd.grad((y * w).sum(), args)

    def timeit(fn):
      fn(), fn()
      torch.cuda.synchronize()
      ts = []
      for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
      return statistics.median(ts) * 1e3, min(ts) * 1e3

    out = dict(zip(("fwd_ms", "fwd_min_ms"), timeit(fwd)))
    if bwd:
      out.update(zip(("fwd_bwd_ms", "fwd_bwd_min_ms"), timeit(fwd_bwd)))
    return out

  return run


def plan_key(e):
  return (list(SHAPES).index(e[0]), e[1], e[2])


def main(argv=None):
  args = parse_args(argv)
  malloc_tuned = _MALLOC_TUNED

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mamba2_jax.ssd import api as ssd_api

  backend = jax.default_backend()
  impls = (
    args.impls.split(",") if args.impls else [i for i in ssd_api.available_impls() if i != "auto"]
  )
  plan = build_plan(args)
  ref_shapes = set(args.ref_shapes.split(","))
  if backend == "gpu" and (not args.impls or "pallas_gpu_tf32" in impls):
    import functools

    from pallas_kernels.ssd_gpu.ops import ssd_gpu_core

    # fp32 inputs with TF32 dots (the default pallas_gpu runs IEEE fp32 dots)
    ssd_api.register_impl(
      "pallas_gpu_tf32", functools.partial(ssd_gpu_core, tf32=True), overwrite=True, fuses_skip=True
    )
    impls = [i for i in impls if i != "pallas_gpu_tf32"] + ["pallas_gpu_tf32"]
  peer = mamba_ssm_timer(backend) if not args.impls or "mamba_ssm" in impls else None
  impls = [i for i in impls if i != "mamba_ssm"] + (["mamba_ssm"] if peer else [])

  def timeit(fn, *a):
    jax.block_until_ready(fn(*a))  # compile + warm-up
    jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*a))
      ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3

  env = dict(
    jax=jax.__version__,
    backend=backend,
    devices=[str(d) for d in jax.devices()],
    cpu_count=os.cpu_count(),
    python=platform.python_version(),
    machine=platform.machine(),
    malloc_tuned=malloc_tuned,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    reps=args.reps,
    batch=args.batch,
    dtype="float32",
    fwd_bwd="grad wrt (x, dt, A, B, C) of sum(y * w), w fixed random",
  )
  print(
    f"# jax {jax.__version__} backend={backend} devices={env['devices']} cpus={os.cpu_count()} "
    f"malloc_tuned={malloc_tuned}"
  )
  if backend == "cpu":
    print(
      "# note: Pallas timings need an accelerator (pallas_gpu on a GPU, pallas_tpu on a TPU); "
      "on CPU only the XLA paths are timed."
    )
    if not malloc_tuned:
      print(
        "# note: malloc not tuned (--no-tune-malloc or MAMBA2_JAX_TUNE_MALLOC=0): glibc mmaps "
        "XLA:CPU temp buffers afresh on every call (page faults); see the module docstring."
      )

  results = []
  header = f"{'impl':<12}{'shape':<7}{'L':>6}{'chunk':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd tok/s':>12}{'f+b tok/s':>12}"
  print(header)
  print("-" * len(header))
  b = args.batch
  for shape, L, Q in plan:
    cfg = SHAPES[shape]
    H, P, N, G = cfg["H"], cfg["P"], cfg["N"], cfg["G"]
    ks = jax.random.split(jax.random.PRNGKey(0), 7)
    x = jax.random.normal(ks[0], (b, L, H, P), jnp.float32)
    dt = jax.random.normal(ks[1], (b, L, H), jnp.float32) - 2.0
    A = -jnp.exp(jax.random.uniform(ks[2], (H,), jnp.float32, 0.0, np.log(16.0)))
    Bm = jax.random.normal(ks[3], (b, L, G, N), jnp.float32)
    Cm = jax.random.normal(ks[4], (b, L, G, N), jnp.float32)
    D = jnp.ones((H,), jnp.float32)
    dt_bias = jax.random.uniform(ks[5], (H,), jnp.float32, -4.0, -2.0)
    w = jax.random.normal(ks[6], (b, L, H, P), jnp.float32)
    for impl in impls:
      entry = dict(impl=impl, shape=shape, L=L, chunk=Q, batch=b, H=H, P=P, N=N, G=G)
      if impl == "reference" and (L > args.ref_max_len or shape not in ref_shapes):
        continue
      if impl == "reference" and any(
        r["impl"] == "reference" and r["shape"] == shape and r["L"] == L for r in results
      ):
        continue  # chunk size is irrelevant to the reference

      def fwd(x, dt, A, B, C, impl=impl, Q=Q):
        return ssd_api.ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, chunk_size=Q, impl=impl)

      def loss(x, dt, A, B, C, w, impl=impl, Q=Q):
        return jnp.sum(fwd(x, dt, A, B, C, impl=impl, Q=Q) * w)

      try:
        if accel_skip(impl, backend):
          raise RuntimeError(accel_skip(impl, backend))
        if impl == "mamba_ssm":
          entry.update(peer(b, L, H, P, N, G, Q, args.reps, not args.no_bwd))
          entry.update(fwd_tokens_per_s=b * L / entry["fwd_ms"] * 1e3)
          if "fwd_bwd_ms" in entry:
            entry.update(fwd_bwd_tokens_per_s=b * L / entry["fwd_bwd_ms"] * 1e3)
        else:
          f_med, f_min = timeit(jax.jit(fwd), x, dt, A, Bm, Cm)
          entry.update(fwd_ms=f_med, fwd_min_ms=f_min, fwd_tokens_per_s=b * L / f_med * 1e3)
          if not args.no_bwd:
            g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            g_med, g_min = timeit(g, x, dt, A, Bm, Cm, w)
            entry.update(
              fwd_bwd_ms=g_med, fwd_bwd_min_ms=g_min, fwd_bwd_tokens_per_s=b * L / g_med * 1e3
            )
      except Exception as e:  # e.g. a Pallas impl without its accelerator
        entry.update(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
      results.append(entry)
      if "skipped" in entry:
        print(f"{impl:<12}{shape:<7}{L:>6}{Q:>6}  skipped ({entry['skipped']})")
      else:
        fb = entry.get("fwd_bwd_ms")
        fbt = entry.get("fwd_bwd_tokens_per_s")
        print(
          f"{impl:<12}{shape:<7}{L:>6}{Q:>6}{entry['fwd_ms']:>10.2f}"
          f"{(f'{fb:.2f}' if fb else '-'):>12}{entry['fwd_tokens_per_s']:>12.0f}"
          f"{(f'{fbt:.0f}' if fbt else '-'):>12}",
          flush=True,
        )

  if args.out:
    with open(args.out, "w") as fh:
      json.dump(dict(env=env, results=results), fh, indent=2)
    print(f"# wrote {args.out}")
  return results


if __name__ == "__main__":
  sys.exit(0 if main() is not None else 1)
