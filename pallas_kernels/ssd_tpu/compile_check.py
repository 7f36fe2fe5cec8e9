"""Ahead-of-time TPU compile check of the Mosaic SSD kernels, on a CPU host.

    scripts/setup_tpu_venv.sh
    .venv-tpu/bin/python -m pallas_kernels.ssd_tpu.compile_check [--topology v5e:2x2] [--negative]

Builds TPU device descriptions with ``jax.experimental.topologies.get_topology_desc`` (libtpu
from PyPI; no TPU needed), wraps the core (forward, and forward + backward through the
custom VJP) in ``jax.shard_map`` over a ("data",) mesh of those devices (one sequence per
device), and runs ``jax.jit(...).lower(...).compile()``: Mosaic's real compiler, so a block
layout or VMEM use the TPU would reject fails here. Prints a table with XLA's
memory_analysis / cost_analysis per device. Exit status 1 if any case fails.

``--negative``: compiles the forward kernel with a misaligned chunk (Q = 12 rows, not a
multiple of 8 sublanes) and exits 0 only if Mosaic rejects it (proves the check is real).

Imports only jax and pallas_kernels (no flax). The core split comes from the topology's device
kind (``ops.tensorcores``), as the SSD layer derives it from the target device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

from .ops import chunk_len, ssd_tpu_core, tensorcores  # noqa: E402

# name, L, H, P, G, N, chunk, dtype, segments
CASES = [
  ("tiny", 64, 4, 16, 2, 16, 32, "float32", True),
  ("130m-L2048-bf16", 2048, 24, 64, 1, 128, 256, "bfloat16", False),
  ("130m-L2048-fp32", 2048, 24, 64, 1, 128, 256, "float32", False),
  ("130m-L4096-bf16-seg", 4096, 24, 64, 1, 128, 256, "bfloat16", True),
  ("2.7b-L2048-bf16", 2048, 80, 64, 1, 128, 256, "bfloat16", False),
  # bf16 with a chunk of 8 (mod 16) rows (chunk 256 rounds to 104 for L = 100): bf16 tiles
  # are (16, 128)
  ("bf16-Q104", 100, 4, 64, 1, 128, 256, "bfloat16", True),
  # packed headdim 32: four heads per 128-lane tile, lane offsets of 32
  ("hd32-packed", 512, 8, 32, 2, 64, 128, "bfloat16", True),
  # larger headdim and d_state (the head block shrinks to fit the VMEM budget)
  ("hd128-N256", 1024, 16, 128, 1, 256, 256, "bfloat16", False),
]


def _mesh(topology):
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  devs = np.array(topo.devices)
  return Mesh(devs.reshape(-1), ("data",)), devs.reshape(-1)[0]


def _abstract(mesh, case):
  _, L, H, P, G, N, _, dtype, seg = case
  nd = mesh.shape["data"]
  dt_ = jnp.dtype(dtype)

  def s(shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

  b = nd  # one sequence per device
  args = dict(
    x=s((b, L, H, P), dt_, PS("data")),
    dt=s((b, L, H), jnp.float32, PS("data")),
    A=s((H,), jnp.float32, PS()),
    B=s((b, L, G, N), dt_, PS("data")),
    C=s((b, L, G, N), dt_, PS("data")),
    h0=s((b, H, P, N), jnp.float32, PS("data")),
  )
  if seg:
    args["seg"] = s((b, L), jnp.int32, PS("data"))
  return args


def _core(chunk, split, x, dt, A, B, C, h0, seg=None):
  prep = SimpleNamespace(x=x, dt=dt, A=A, B=B, C=C, initial_state=h0, seg=seg, acc=jnp.float32)
  return ssd_tpu_core(prep, chunk_size=chunk, interpret=False, split=split)


def _build(mesh, case, mode):
  chunk = case[6]
  split = tensorcores(mesh.devices.flat[0].device_kind)
  keys = ["x", "dt", "A", "B", "C", "h0"] + (["seg"] if case[8] else [])
  specs = {
    "x": PS("data"),
    "dt": PS("data"),
    "A": PS(),
    "B": PS("data"),
    "C": PS("data"),
    "h0": PS("data"),
    "seg": PS("data"),
  }

  if mode == "fwd":

    def local(*a):
      return _core(chunk, split, *a)

    out_specs = (PS("data"), PS("data"))
  else:

    def local(*a):
      diff, rest = a[:6], a[6:]
      (y, h), vjp = jax.vjp(lambda *d: _core(chunk, split, *d, *rest), *diff)
      grads = vjp((jnp.ones_like(y), jnp.ones_like(h)))
      dA = jax.lax.psum(grads[2], "data")
      return grads[:2] + (dA,) + grads[3:]

    out_specs = (PS("data"), PS("data"), PS(), PS("data"), PS("data"), PS("data"))
  fn = jax.shard_map(
    local, mesh=mesh, in_specs=tuple(specs[k] for k in keys), out_specs=out_specs, check_vma=False
  )
  return jax.jit(fn), keys


def _fmt_bytes(n):
  return "-" if n is None else f"{n / 2**20:.1f}MiB"


def run_case(mesh, case, mode):
  t0 = time.time()
  fn, keys = _build(mesh, case, mode)
  args = _abstract(mesh, case)
  compiled = fn.lower(*(args[k] for k in keys)).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  info = dict(
    arg=getattr(mem, "argument_size_in_bytes", None),
    out=getattr(mem, "output_size_in_bytes", None),
    temp=getattr(mem, "temp_size_in_bytes", None),
    flops=(cost or {}).get("flops"),
    bytes=(cost or {}).get("bytes accessed"),
    secs=time.time() - t0,
  )
  return info


def negative(mesh):
  """A misaligned chunk (12 rows) must be rejected by Mosaic."""
  from .kernel import NCOLS, Grid, ssd_fwd_call

  b, H, P, G, N, Q, T = 1, 2, 64, 1, 128, 12, 4
  Lp = Q * T

  def local(x, C, Bm, rows, h0):
    g = Grid(b=b, G=G, R=H, hb=2, split=1, T=T, Q=Q, P=P, N=N, packed=False)
    return ssd_fwd_call(
      x,
      C,
      Bm,
      rows,
      h0,
      None,
      g=g,
      out_dtype=jnp.float32,
      cd=jnp.float32,
      save_states=False,
      interpret=False,
    )

  nd = mesh.shape["data"]
  f32 = jnp.float32
  shapes = [
    (b * nd, H, Lp, P),
    (b * nd, G, Lp, N),
    (b * nd, G, Lp, N),
    (b * nd, H, T, NCOLS, Q),
    (b * nd, H, P, N),
  ]
  args = [jax.ShapeDtypeStruct(s, f32, sharding=NamedSharding(mesh, PS("data"))) for s in shapes]
  fn = jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(PS("data"),) * 5,
      out_specs=(PS("data"), PS("data")),
      check_vma=False,
    )
  )
  rc = 0
  try:
    fn.lower(*args).compile()
    print("negative control: misaligned block (Q=12) COMPILED: the check is not real!")
    rc = 1
  except Exception as e:  # noqa: BLE001
    msg = str(e).strip().splitlines()
    print(f"negative control: misaligned block (Q={Q}) REJECTED as expected:")
    print("  " + " | ".join(m for m in msg[:2])[:400])

  # aligned blocks, but 8 heads x (256 x 4096) fp32 = 32 MiB per x/y buffer (double-buffered)
  # + a 16 MiB state scratch: over the 128 MiB of VMEM, which only the TPU backend compiler
  # (Mosaic + libtpu), not the Python-side Pallas checks, can see
  H, P, Q, T = 8, 4096, 256, 2
  Lp = Q * T
  shapes = [(nd, H, Lp, P), (nd, G, Lp, N), (nd, G, Lp, N), (nd, H, T, NCOLS, Q), (nd, H, P, N)]
  args = [jax.ShapeDtypeStruct(s, f32, sharding=NamedSharding(mesh, PS("data"))) for s in shapes]

  def local2(x, C, Bm, rows, h0):
    g = Grid(b=1, G=G, R=H, hb=8, split=1, T=T, Q=Q, P=P, N=N, packed=False)
    return ssd_fwd_call(
      x,
      C,
      Bm,
      rows,
      h0,
      None,
      g=g,
      out_dtype=jnp.float32,
      cd=jnp.float32,
      save_states=False,
      interpret=False,
    )

  fn = jax.jit(
    jax.shard_map(
      local2,
      mesh=mesh,
      in_specs=(PS("data"),) * 5,
      out_specs=(PS("data"), PS("data")),
      check_vma=False,
    )
  )
  try:
    fn.lower(*args).compile()
    print("negative control: 64 MiB VMEM blocks COMPILED: the check is not real!")
    rc = 1
  except Exception as e:  # noqa: BLE001
    msg = [m for m in str(e).strip().splitlines() if m.strip()]
    print("negative control: blocks over VMEM REJECTED as expected (backend compiler):")
    print("  " + " | ".join(m for m in msg[:2])[:400])
  return rc


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--topology", default="v5e:2x2")
  ap.add_argument("--negative", action="store_true", help="only run the negative control")
  ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  ap.add_argument("--modes", default="fwd,fwd+bwd")
  a = ap.parse_args(argv)
  mesh, dev0 = _mesh(a.topology)
  print(f"jax {jax.__version__}; topology {a.topology}: {mesh.devices.size} x {dev0.device_kind}")
  if a.negative:
    return negative(mesh)
  cases = [c for c in CASES if not a.cases or c[0] in a.cases.split(",")]
  rows, failed = [], 0
  for case in cases:
    name, L, H, P, G, N, chunk, dtype, seg = case
    for mode in a.modes.split(","):
      shape = f"b=1/dev L={L} H={H} P={P} G={G} N={N} Q={chunk_len(chunk, L)} {dtype}{' seg' if seg else ''}"
      try:
        info = run_case(mesh, case, mode)
        ok = "yes"
      except Exception as e:  # noqa: BLE001
        failed += 1
        ok = "NO"
        info = {}
        print(f"FAILED {name} {mode}: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr)
        traceback.print_exc(limit=3)
      rows.append(
        (
          name,
          shape,
          mode,
          ok,
          _fmt_bytes(info.get("arg")),
          _fmt_bytes(info.get("out")),
          _fmt_bytes(info.get("temp")),
          "-" if info.get("flops") is None else f"{info['flops'] / 1e9:.2f}",
          "-" if info.get("bytes") is None else f"{info['bytes'] / 2**20:.1f}",
          f"{info.get('secs', 0):.1f}",
        )
      )
  hdr = (
    "case",
    "shape",
    "pass",
    "compiled",
    "args/dev",
    "out/dev",
    "temp/dev",
    "GFLOP/dev",
    "MiB accessed",
    "compile s",
  )
  widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
  line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"
  print(line(hdr))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in rows:
    print(line(r))
  print("ALL COMPILED" if not failed else f"{failed} FAILED")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
