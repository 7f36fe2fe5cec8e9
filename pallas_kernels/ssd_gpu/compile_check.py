"""Ahead-of-time (deviceless) H100 compile check of the Pallas/Triton SSD kernels, on a CPU host.

    scripts/setup_cuda_venv.sh
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .venv-cuda/bin/python -m pallas_kernels.ssd_gpu.compile_check \
        [--cases tiny,130m-L2048-fp32] [--negative] [--no-ptxas]

Builds an H100 device description with ``jax.experimental.topologies.get_topology_desc(
platform="cuda", target_config=<GpuTargetConfig text>, topology="1x1x1")`` (the CUDA 13 plugin;
no GPU needed), lowers the core (forward, and forward + backward through the custom VJP)
inside ``jax.sharding.use_abstract_mesh`` so Pallas sees the H100's compute capability, and
runs ``.compile()``: XLA's GPU pipeline including Triton's compiler for sm_90, so a kernel the
GPU would reject (e.g. over the 227 KiB shared-memory limit) fails here. Prints a table with
the head block HB the core picks (ops.make_config), XLA's memory_analysis / cost_analysis and,
per Triton kernel, the launch grid, threads and shared memory from XLA's thunk sequence, and
the registers per thread and spills: XLA does not report them, so the compile also dumps the
PTX (``xla_gpu_dump_llvmir=True`` with ``xla_dump_emitter_re="ptx"``) and ``ptxas -v`` of this
venv's CUDA wheels (nvidia/cu13/bin/ptxas, new enough for the PTX ISA XLA emits) assembles each
kernel's PTX for its target ("255r SPILL 400/380B" = 255 registers, 400 bytes of spill stores
and 380 of spill loads per thread). Exit status 1 if any case fails. ``--no-ptxas`` skips that.
Cases may carry make_config overrides (e.g. tiny-hb3 forces a 3-head block: the rule picks
HB = 1 for tiny shapes).

``--negative``: compiles the forward scan kernel with an oversized block (BL = Q = 512 rows,
so the C B^T dot alone needs 2 x 512 x 128 x 4 B of shared memory) and exits 0 only if the
compiler rejects it with RESOURCE_EXHAUSTED (proves the check is real).

Imports only jax and pallas_kernels (no flax), so the venv needs just jax[cuda13].
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

from .ops import make_config, pow2_at_least, ssd_gpu_core  # noqa: E402

TARGET = Path(__file__).with_name("h100_target.txtpb")

# name, b, L, H, P, G, N, chunk, dtype, segments, initial_state[, make_config overrides]
CASES = [
  ("tiny", 1, 64, 3, 16, 1, 16, 16, "float32", True, True),
  ("tiny-g2-bf16", 2, 100, 4, 16, 2, 32, 32, "bfloat16", True, True),
  # head blocks forced on tiny shapes (the rule picks HB = 1 there): a 3-head block (not a
  # power of two) covering the group, and 2 blocks of 2 heads per group with G = 2
  ("tiny-hb3", 1, 64, 3, 16, 1, 16, 16, "float32", True, True, {"head_block": 3}),
  ("tiny-g2-hb2-bf16", 2, 100, 8, 16, 2, 32, 32, "bfloat16", True, True, {"head_block": 2}),
  ("130m-L2048-fp32", 1, 2048, 24, 64, 1, 128, 256, "float32", False, False),
  ("130m-L2048-fp32-tf32", 1, 2048, 24, 64, 1, 128, 256, "float32", False, False, {"tf32": True}),
  ("130m-L2048-bf16", 1, 2048, 24, 64, 1, 128, 256, "bfloat16", False, False),
  ("130m-L4096-bf16-seg", 1, 4096, 24, 64, 1, 128, 256, "bfloat16", True, True),
  ("2.7b-L2048-bf16", 1, 2048, 80, 64, 1, 128, 256, "bfloat16", False, False),
  ("2.7b-L8192-bf16", 1, 8192, 80, 64, 1, 128, 256, "bfloat16", False, False),
]


def case_kw(case):
  return dict(case[11]) if len(case) > 11 else {}


def case_config(case):
  """The kernel Config the core builds for a case (for the HB column)."""
  _, b, L, H, P, G, N, chunk, dtype, seg = case[:10]
  return make_config(
    L,
    pow2_at_least(P),
    pow2_at_least(N),
    jnp.dtype(dtype),
    chunk,
    has_seg=seg,
    interpret=False,
    H=H,
    G=G,
    batch=b,
    **case_kw(case),
  )


def h100_mesh():
  topo = topologies.get_topology_desc(
    platform="cuda", target_config=TARGET.read_text(), topology="1x1x1"
  )
  return topologies.make_mesh(topo, (1,), ("x",))


def _abstract(mesh, case):
  _, b, L, H, P, G, N, _, dtype, seg, h0 = case[:11]
  rep = NamedSharding(mesh, PS())
  dt_ = jnp.dtype(dtype)
  s = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=rep)  # noqa: E731
  return (
    s((b, L, H, P), dt_),
    s((b, L, H), jnp.float32),
    s((H,), jnp.float32),
    s((b, L, G, N), dt_),
    s((b, L, G, N), dt_),
    s((b, H, P, N), jnp.float32) if h0 else None,
    s((b, L), jnp.int32) if seg else None,
  )


def _fns(chunk, **cfg_kw):
  def core(x, dt, A, B, C, h0, seg):
    prep = SimpleNamespace(
      x=x, dt=dt, A=A, B=B, C=C, initial_state=h0, seg=seg, acc=jnp.dtype(jnp.float32)
    )
    return ssd_gpu_core(prep, chunk_size=chunk, interpret=False, **cfg_kw)

  def fwd(*args):
    return core(*args)

  def fwd_bwd(*args):
    x, dt, A, B, C, h0, seg = args

    def loss(x, dt, A, B, C, h0):
      y, h = core(x, dt, A, B, C, h0, seg)
      return jnp.sum(y * y) + jnp.sum(h)  # dy depends on y: the forward kernels stay

    argnums = (0, 1, 2, 3, 4) + ((5,) if h0 is not None else ())
    return jax.grad(loss, argnums=argnums)(x, dt, A, B, C, h0)

  return fwd, fwd_bwd


_THUNK = re.compile(
  r"(ssd_\w+) grid: \[([\d, ]+)\] threads: \[(\d+)[\d, ]*\]\s+shared_memory: (\d+) bytes"
)
_PTXAS = re.compile(
  r"Function properties for (ssd_\w+)\s+(\d+) bytes stack frame, "
  r"(\d+) bytes spill stores, (\d+) bytes spill loads\s+"
  r"ptxas info\s+: Used (\d+) registers"
)


def find_ptxas():
  """ptxas of this venv's CUDA wheels (new enough for the PTX ISA XLA emits), else PATH."""
  site = Path(jax.__file__).resolve().parent.parent
  for cand in sorted(site.glob("nvidia/*/bin/ptxas")):
    if os.access(cand, os.X_OK):
      return str(cand)
  return shutil.which("ptxas")


def ptx_resources(dump_dir, ptxas):
  """Per Triton kernel (name -> (registers, spill store bytes, spill load bytes, stack bytes))
  from ``ptxas -v`` on the PTX XLA dumped (the kernel's own PTX, assembled for its target)."""
  out = {}
  for f in sorted(Path(dump_dir).glob("*.ptx")):
    text = f.read_text()
    if ".entry ssd_" not in text:
      continue
    m = re.search(r"^\.target\s+(\w+)", text, re.M)
    arch = m.group(1) if m else "sm_90a"
    p = subprocess.run(
      [ptxas, "-v", f"-arch={arch}", str(f), "-o", os.devnull],
      capture_output=True,
      text=True,
      timeout=600,
    )
    for m in _PTXAS.finditer(p.stdout + p.stderr):
      out[m.group(1)] = (int(m.group(5)), int(m.group(3)), int(m.group(4)), int(m.group(2)))
  return out


def compile_case(mesh, case, which, *, kernels=None, ptxas=None, **cfg_kw):
  """Compile one case; if ``kernels`` is a dict, fill it with the Triton kernels' launch
  parameters from XLA's thunk sequence: name -> dict(grid, threads, smem) and, with
  ``ptxas`` (a path), regs / spill_st / spill_ld / stack from ``ptxas -v`` on the dumped PTX
  (``xla_gpu_dump_llvmir`` with ``xla_dump_emitter_re="ptx"`` makes XLA dump the PTX)."""
  fwd, fwd_bwd = _fns(case[7], **{**case_kw(case), **cfg_kw})
  f = fwd if which == "fwd" else fwd_bwd
  args = _abstract(mesh, case)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = jax.jit(f).lower(*args)
  if kernels is None:
    return lowered.compile()
  with tempfile.TemporaryDirectory() as d:
    opts = {"xla_dump_to": d}
    if ptxas:
      opts.update(xla_gpu_dump_llvmir=True, xla_dump_emitter_re="ptx")
    compiled = lowered.compile(compiler_options=opts)
    for fn in os.listdir(d):
      if fn.endswith("thunk_sequence.txt"):
        for m in _THUNK.finditer(Path(d, fn).read_text()):
          grid = "x".join(v.strip() for v in m.group(2).split(","))
          kernels[m.group(1)] = dict(grid=grid, threads=int(m.group(3)), smem=int(m.group(4)))
    if ptxas:
      for name, (regs, sst, sld, stack) in ptx_resources(d, ptxas).items():
        kernels.setdefault(name, {}).update(regs=regs, spill_st=sst, spill_ld=sld, stack=stack)
  return compiled


def _fmt_kernel(name, k):
  s = f"{name[4:]} {k.get('grid', '?')} {k.get('threads', '?')} {k.get('smem', 0) / 1024:.1f}KiB"
  if "regs" in k:
    s += f" {k['regs']}r"
    if k["spill_st"] or k["spill_ld"]:
      s += f" SPILL {k['spill_st']}/{k['spill_ld']}B"
  return s


def _fmt_bytes(n):
  return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _info(compiled):
  mem = flops = None
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      mem = (ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    pass
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, list):
      ca = ca[0] if ca else None
    if ca:
      flops = ca.get("flops")
  except Exception:  # noqa: BLE001
    pass
  text = compiled.as_text() or ""
  n_kernels = text.count("__gpu$xla.gpu.triton")
  return mem, flops, n_kernels


def negative(mesh):
  case = ("negative", 1, 512, 2, 64, 1, 128, 512, "float32", False, False)
  try:
    compile_case(mesh, case, "fwd", block_l=512)
  except Exception as e:  # noqa: BLE001
    msg = str(e)
    ok = "RESOURCE_EXHAUSTED" in msg or "Shared memory" in msg
    first = next((ln for ln in msg.splitlines() if "hared memory" in ln), msg.splitlines()[0])
    print(f"negative control (BL=Q=512): rejected as expected: {first.strip()[:200]}")
    return ok
  print("negative control (BL=Q=512): compiled although it should exceed shared memory: FAIL")
  return False


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  ap.add_argument("--negative", action="store_true", help="only run the negative control")
  ap.add_argument(
    "--no-ptxas",
    action="store_true",
    help="skip the registers / spills column (ptxas -v on the dumped PTX)",
  )
  a = ap.parse_args(argv)
  mesh = h100_mesh()
  dev = mesh.devices.flat[0]
  print(f"jax {jax.__version__}; target: {getattr(dev, 'device_kind', dev)} (deviceless, 1x1x1)")
  if a.negative:
    return 0 if negative(mesh) else 1
  names = [n for n in a.cases.split(",") if n]
  cases = [c for c in CASES if not names or c[0] in names]
  ptxas = None if a.no_ptxas else find_ptxas()
  if not a.no_ptxas and ptxas is None:
    print("no ptxas found: registers / spills not reported")
  hdr = f"{'case':22} {'b':>2} {'L':>5} {'H':>3} {'P':>3} {'G':>2} {'N':>4} {'Q':>4} {'HB':>2} {'pass':8} {'ok':3} {'s':>5}  {'args/out/temp':28} {'GFLOP':>8} {'kernels':>7}  Triton kernels: grid threads shared-memory registers [SPILL store/load]"
  print(hdr)
  print("-" * len(hdr))
  failed = 0
  for case in cases:
    name, b, L, H, P, G, N, Q = case[:8]
    hb = case_config(case).HB
    for which in ("fwd", "fwd+bwd"):
      t0 = time.time()
      kernels = {}
      try:
        compiled = compile_case(mesh, case, which, kernels=kernels, ptxas=ptxas)
        ok, (mem, flops, nk) = "yes", _info(compiled)
      except Exception as e:  # noqa: BLE001
        ok, mem, flops, nk = "NO", None, None, 0
        failed += 1
        print(f"  {name} {which} failed:\n" + "".join(traceback.format_exception_only(e))[-3000:])
      dt = time.time() - t0
      m = "-" if mem is None else "/".join(_fmt_bytes(v) for v in mem)
      fl = "-" if flops is None else f"{flops / 1e9:.2f}"
      ks = "; ".join(_fmt_kernel(k, v) for k, v in sorted(kernels.items()))
      print(
        f"{name:22} {b:>2} {L:>5} {H:>3} {P:>3} {G:>2} {N:>4} {Q:>4} {hb:>2} {which:8} {ok:3} {dt:5.1f}  {m:28} {fl:>8} {nk:>7}  {ks}",
        flush=True,
      )
  ok_neg = negative(mesh)
  if not ok_neg:
    failed += 1
  print("FAILED" if failed else "all compiled for H100 (sm_90); negative control rejected")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
