"""Traffic and work audit of the SSD kernels from the compiled programs (no hardware needed).

    .venv/bin/python benchmarks/ssd_audit.py [--targets tpu,gpu] [--cases 130m-L2048,...]
        [--modes fwd,fwd+bwd] [--out benchmarks/results/ssd_audit.json]
        [--md benchmarks/ssd_audit.md]

The parent process (any Python) runs one worker per target in its venv and merges their JSON:
``.venv-tpu/bin/python benchmarks/ssd_audit.py --worker tpu`` (libtpu, TPU v5e:2x2 topology, the
core ``pallas_kernels.ssd_tpu.ops.ssd_tpu_core`` inside ``jax.shard_map``, one sequence per
device) and ``.venv-cuda/bin/python ... --worker gpu`` (CUDA plugin, deviceless H100, the core
``pallas_kernels.ssd_gpu.ops.ssd_gpu_core`` lowered under ``use_abstract_mesh``). Workers import
only jax and pallas_kernels (+ mamba2_jax.ssd through it). The repository measured is the one
holding this file (its parent directory goes on the workers' PYTHONPATH).

Program audited, per case (b = 1 sequence per device, P = 64, N = 128, G = 1, chunk 256; x, B, C
bf16, dt fp32, A fp32 (H,), no initial state, no segment ids; x, y, dy, dx as (b, L, H*P), the
mixer's layout; y and the final state in the dtypes the core returns):
  fwd      (x, dt, A, B, C) -> (y, final state)
  fwd+bwd  (x, dt, A, B, C, dy, dfinal) -> (y, final, dx, ddt, dA, dB, dC) by ``jax.vjp``; the
           cotangents are program inputs (fp32, the dtype of y), so they are read from HBM.

What is counted, from the optimized HLO (``compiled.as_text()``) of the entry computation:
  kernel bytes  per custom call (tpu_custom_call / __gpu$xla.gpu.triton): the bytes of every
                operand + every result, each counted once, padded as the HLO layout's first tile
                says (TPU T(8,128) etc.: the two minor physical dims rounded up). A lower bound of
                the launch's traffic: an operand block a kernel fetches more than once (e.g. B/C
                per head block) counts once. "vmem" = the part XLA placed in TPU VMEM (S(1)).
  XLA bytes     every other entry instruction that moves data (fusions, copies, reductions,
                all-reduce ...): operands + results the same way; parameter, constant,
                bitcast, tuple, get-tuple-element and the async copies between memory spaces
                (copy-start / copy-done: XLA prefetching an operand into TPU VMEM; its bytes
                are counted where it is read, as if it stayed in HBM) are free. Whole operands
                count even where a fusion reads a slice (an upper bound for those).
  xla_cost      XLA's own ``cost_analysis()["bytes accessed"]`` / ``["flops"]`` for the program
                (TPU; includes the kernels' CostEstimate) -- the GPU AOT client returns none.
  dot FLOPs     per launch, counted from the kernel's jaxpr: 2*M*N*K of every dot_general of
                the kernel body, run at every grid point with the loop trip counts and pl.when
                branches evaluated from the program ids (causal block skipping counts as the
                kernel executes it). Elementwise work (exp, masks) is not counted.
  declared      TPU: the kernel's pl.CostEstimate flops as carried in the custom call.
  temp          ``memory_analysis().temp_size_in_bytes``.
  GPU launch    grid, threads and shared memory from XLA's thunk sequence dump; registers,
                spill stores/loads and stack frame from ptxas -v as XLA runs it on the
                kernel's PTX (libnvptxcompiler, -arch sm_90a; the option
                --extensible-whole-program only forces ptxas to log its info for every kernel).

Roofline (benchmarks/ssd_roofline.py, per token, bf16 inputs s = 2 B, dt/states fp32):
  minimum bytes fwd = read x, dt, B, C + write y + write the chunk-entry states (P*N*4/Q per
                head) for the backward; fwd+bwd adds read x, dt, B, C, dy, states and write dx,
                ddt, dB, dC (ssd_roofline.bytes_per_token(H, 2)).
  algorithmic FLOPs: fwd G*Q*N (C B^T once per group) + H*(Q*P + 4PN); bwd G*3QN +
                H*(2QP + 8PN): the causal half of every Q x Q product (flops_per_token(H)).
  ratios        (kernel + XLA bytes) / L / minimum and (kernel dot FLOPs) / L / algorithmic;
                the issue's goal for fwd+bwd: bytes <= 1.5x, FLOPs <= 1.25x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
P, N, G, CHUNK = 64, 128, 1, 256
MODELS = {"130m": 24, "2.7b": 80}  # heads H = 2 * d_model / P
CASES = {f"{m}-L{L}": (H, L) for m, H in MODELS.items() for L in (2048, 8192)}
MODES = ("fwd", "fwd+bwd")
VENVS = {"tpu": ".venv-tpu", "gpu": ".venv-cuda"}
GOAL_BYTES, GOAL_FLOPS = 1.5, 1.25
if str(ROOT) not in sys.path:  # python benchmarks/ssd_audit.py from anywhere
  sys.path.insert(0, str(ROOT))

import mamba2_jax.host_tuning  # noqa: E402,F401  (first: malloc for XLA on CPU hosts)
from benchmarks.audit_count import hlo_traffic, kernel_work, pallas_calls  # noqa: E402


# ----------------------------------------------------------------------------- workers


def _program(core_fn, mode, psum_axis=None):
  """The audited function of ``mode`` around ``core_fn(x, dt, A, B, C) -> (y, final)``."""
  import jax

  if mode == "fwd":
    return core_fn

  def fwd_bwd(x, dt, A, B, C, dy, dh):
    (y, h), vjp = jax.vjp(core_fn, x, dt, A, B, C)
    dx, ddt, dA, dB, dC = vjp((dy, dh))
    if psum_axis is not None:
      dA = jax.lax.psum(dA, psum_axis)
    return y, h, dx, ddt, dA, dB, dC

  return fwd_bwd


def _core(target, device_kind=None):
  """The kernel core of ``target``; on TPU split over the TensorCores of ``device_kind`` (as
  ``mamba2_jax.ssd.ssd`` does for its target)."""
  import functools
  from types import SimpleNamespace

  import jax.numpy as jnp

  if target == "tpu":
    from pallas_kernels.ssd_tpu.ops import ssd_tpu_core, tensorcores

    impl = functools.partial(ssd_tpu_core, split=tensorcores(device_kind))
  else:
    from pallas_kernels.ssd_gpu.ops import ssd_gpu_core as impl

  def core(x, dt, A, B, C):
    # x arrives as (b, L, H*P), as the mixer's in_proj produces it (a parameter of shape
    # (b, L, H, 64) would get a TPU entry layout with L minor and cost relayout copies that
    # no model pays); y leaves the same way
    b, L, H = dt.shape
    prep = SimpleNamespace(
      x=x.reshape(b, L, H, -1),
      dt=dt,
      A=A,
      B=B,
      C=C,
      initial_state=None,
      seg=None,
      acc=jnp.dtype(jnp.float32),
    )
    y, h = impl(prep, chunk_size=CHUNK, interpret=False)
    return y.reshape(x.shape), h

  return core


def _shapes(H, L, b, mode, core):
  """(name, shape, dtype, per-sequence) of the program's inputs; the cotangents dy, dh take
  the dtypes of the core's outputs y, final state (from jax.eval_shape of one sequence)."""
  import jax

  bf, f32 = "bfloat16", "float32"
  arrs = [
    ("x", (b, L, H * P), bf, True),
    ("dt", (b, L, H), f32, True),
    ("A", (H,), f32, False),
    ("B", (b, L, G, N), bf, True),
    ("C", (b, L, G, N), bf, True),
  ]
  if mode != "fwd":
    one = [jax.ShapeDtypeStruct((1,) + s[1:] if seq else s, d) for _, s, d, seq in arrs]
    y, h = jax.eval_shape(core, *one)
    arrs += [("dy", (b, L, H * P), y.dtype, True), ("dh", (b, H, P, N), h.dtype, True)]
  return arrs


def build_tpu(H, L, mode, topology="v5e:2x2"):
  import jax
  import numpy as np
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as PS

  devs = np.array(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  mesh = Mesh(devs.reshape(-1), ("data",))
  core = _core("tpu", devs.flat[0].device_kind)
  arrs = _shapes(H, L, devs.size, mode, core)
  specs = [PS("data") if per_seq else PS() for _, _, _, per_seq in arrs]
  args = [
    jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, sp))
    for (_, s, d, _), sp in zip(arrs, specs)
  ]
  out_specs = (
    (PS("data"),) * 2 if mode == "fwd" else (PS("data"),) * 4 + (PS(),) + (PS("data"),) * 2
  )
  fn = jax.shard_map(
    _program(core, mode, "data"),
    mesh=mesh,
    in_specs=tuple(specs),
    out_specs=out_specs,
    check_vma=False,
  )
  return jax.jit(fn), args, lambda f: f()


def build_gpu(H, L, mode):
  import jax
  from jax.experimental import topologies
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as PS

  target = (ROOT / "pallas_kernels" / "ssd_gpu" / "h100_target.txtpb").read_text()
  topo = topologies.get_topology_desc(platform="cuda", target_config=target, topology="1x1x1")
  mesh = topologies.make_mesh(topo, (1,), ("x",))
  rep = NamedSharding(mesh, PS())
  arrs = _shapes(H, L, 1, mode, _core("gpu"))
  args = [jax.ShapeDtypeStruct(s, d, sharding=rep) for _, s, d, _ in arrs]

  def in_mesh(f):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return f()

  return jax.jit(_program(_core("gpu"), mode)), args, in_mesh


_THUNK = re.compile(
  r"\] (\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+"
  r"shared_memory: (\d+) bytes"
)
_PTXAS = re.compile(
  r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes "
  r"spill stores, (\d+) bytes spill loads.*?Used (\d+) registers",
  re.S,
)
GPU_OPTIONS = {"xla_gpu_ptx_compiler_extra_flags": "-v,--extensible-whole-program"}


def _captured(fn):
  """Run fn() with file descriptor 2 (XLA's C++ log) going to a temporary file."""
  with tempfile.TemporaryFile() as tmp:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    try:
      out = fn()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    tmp.seek(0)
    return out, tmp.read().decode(errors="replace")


def _compile(lowered, target):
  if target == "tpu":
    return lowered.compile(), {}
  with tempfile.TemporaryDirectory() as d:
    compiled, log = _captured(
      lambda: lowered.compile(compiler_options={"xla_dump_to": d, **GPU_OPTIONS})
    )
    launch = {}
    for fn in os.listdir(d):
      if fn.endswith("thunk_sequence.txt"):
        for m in _THUNK.finditer(Path(d, fn).read_text()):
          grid = "x".join(v.strip() for v in m.group(2).split(","))
          threads = int(m.group(3).split(",")[0])
          launch[m.group(1)] = dict(launch_grid=grid, threads=threads, smem=int(m.group(4)))
  for m in _PTXAS.finditer(log):
    if m.group(1) in launch:
      launch[m.group(1)].update(
        stack=int(m.group(2)),
        spill_st=int(m.group(3)),
        spill_ld=int(m.group(4)),
        regs=int(m.group(5)),
      )
  return compiled, launch


def _join(hlo_kernels, works):
  """Attach each HLO kernel's jaxpr-level work (matched by result shapes, else by order)."""
  free = list(works)
  for i, k in enumerate(hlo_kernels):
    w = next((w for w in free if w["sig"] == k["sig"]), free[0] if free else None)
    if w is not None:
      free.remove(w)
      k.update(kernel=w["name"], grid=w["grid"], dot_flops=w["dot_flops"])
    k.pop("sig")
  return hlo_kernels


def _cost(compiled):
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    ca = None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return (ca or {}).get("bytes accessed"), (ca or {}).get("flops")


def measure(target, case, mode):
  import jax

  H, L = CASES[case]
  fn, args, ctx = (build_tpu if target == "tpu" else build_gpu)(H, L, mode)
  t0 = time.time()
  lowered = ctx(lambda: fn.lower(*args))
  compiled, launch = _compile(lowered, target)
  secs = time.time() - t0
  jaxpr = ctx(lambda: jax.make_jaxpr(fn)(*args))
  works = [kernel_work(e) for e in pallas_calls(jaxpr.jaxpr)]
  kernels, xla = hlo_traffic(compiled.as_text())
  kernels = _join(kernels, works)
  for k in kernels:
    k.update(launch.get(k.get("kernel"), {}))
  mem = compiled.memory_analysis()
  cost_bytes, cost_flops = _cost(compiled)
  return dict(
    target=target,
    case=case,
    mode=mode,
    H=H,
    L=L,
    compile_s=round(secs, 1),
    temp_bytes=getattr(mem, "temp_size_in_bytes", None),
    kernels=kernels,
    xla=xla,
    xla_cost_bytes=cost_bytes,
    xla_cost_flops=cost_flops,
  )


def worker(target, cases, modes):
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  import jax

  results = []
  for case in cases:
    for mode in modes:
      t0 = time.time()
      try:
        results.append(measure(target, case, mode))
        status = "ok"
      except Exception as e:  # noqa: BLE001
        results.append(
          dict(target=target, case=case, mode=mode, error=f"{type(e).__name__}: {str(e)[:2000]}")
        )
        status = "FAILED: " + results[-1]["error"][:300]
      print(
        f"[{target}] {case} {mode}: {status} ({time.time() - t0:.1f} s)",
        file=sys.stderr,
        flush=True,
      )
  json.dump(dict(target=target, jax=jax.__version__, results=results), sys.stdout)
  return 0


# ----------------------------------------------------------------------------- parent


def run_worker(target, cases, modes):
  """Run the worker of ``target`` in its venv; None (with a message) if the venv is missing."""
  py = ROOT / VENVS[target] / "bin" / "python"
  if not py.exists():
    print(f"[{target}] skipped: no {py} (scripts/setup_*_venv.sh)", file=sys.stderr)
    return None
  env = dict(
    os.environ,
    PYTHONPATH=str(ROOT),
    JAX_PLATFORMS="",
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1",
    ALLOW_MULTIPLE_LIBTPU_LOAD="1",
    TF_CPP_MIN_LOG_LEVEL="0" if target == "gpu" else "3",
  )
  env.pop("XLA_FLAGS", None)
  cmd = [
    str(py),
    str(Path(__file__).resolve()),
    "--worker",
    target,
    "--cases",
    ",".join(cases),
    "--modes",
    ",".join(modes),
  ]
  p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
  if p.returncode != 0:
    raise RuntimeError(f"{target} worker exited {p.returncode}")
  return json.loads(p.stdout)


def roofline(H, mode):
  """(minimum bytes, algorithmic FLOPs) per token from benchmarks/ssd_roofline.py."""
  here = str(Path(__file__).resolve().parent)
  if here not in sys.path:
    sys.path.insert(0, here)
  import ssd_roofline as rl

  assert (rl.P, rl.N, rl.G, rl.Q) == (P, N, G, CHUNK)
  fb, bb = rl.bytes_per_token(H, 2)
  ff, fl = rl.flops_per_token(H)
  return (fb, ff) if mode == "fwd" else (fb + bb, ff + fl)


def summarize(r):
  """Per-token totals and roofline ratios of one worker result (in place)."""
  if "error" in r:
    return r
  ks = r["kernels"]
  kbytes = sum(k["read"] + k["written"] for k in ks)
  flops = sum(k.get("dot_flops") or 0 for k in ks)
  min_b, alg_f = roofline(r["H"], r["mode"])
  L = r["L"]
  r.update(
    kernel_bytes=kbytes,
    total_bytes=kbytes + r["xla"]["bytes"],
    dot_flops=flops,
    bytes_per_token=(kbytes + r["xla"]["bytes"]) / L,
    kernel_bytes_per_token=kbytes / L,
    flops_per_token=flops / L,
    min_bytes_per_token=min_b,
    alg_flops_per_token=alg_f,
  )
  r["bytes_ratio"] = r["bytes_per_token"] / min_b
  r["kernel_bytes_ratio"] = r["kernel_bytes_per_token"] / min_b
  r["flops_ratio"] = r["flops_per_token"] / alg_f
  if r["mode"] == "fwd+bwd":
    r["goal_met"] = r["bytes_ratio"] <= GOAL_BYTES and r["flops_ratio"] <= GOAL_FLOPS
  return r


def _mib(n):
  return "-" if n is None else f"{n / 2**20:.1f}"


def summary_table(results):
  out = [
    "| target | case | pass | kernel MiB | XLA MiB (ops) | B/token | min B/token | "
    "ratio (kernels only) | dot FLOP/token | alg FLOP/token | ratio | goal | temp MiB | "
    "compile s |",
    "|" + "---|" * 14,
  ]
  for r in results:
    head = f"| {r['target']} | {r['case']} | {r['mode']} |"
    if "error" in r:
      out.append(head + f" FAILED: {r['error'][:80]} |" + " |" * 10)
      continue
    goal = {True: "met", False: "NOT met"}.get(r.get("goal_met"), "-")
    out.append(
      head + f" {_mib(r['kernel_bytes'])} | {_mib(r['xla']['bytes'])} ({r['xla']['count']}) "
      f"| {r['bytes_per_token']:.0f} | {r['min_bytes_per_token']:.0f} "
      f"| {r['bytes_ratio']:.2f} ({r['kernel_bytes_ratio']:.2f}) "
      f"| {r['flops_per_token'] / 1e6:.2f} M | {r['alg_flops_per_token'] / 1e6:.2f} M "
      f"| {r['flops_ratio']:.2f} | {goal} | {_mib(r['temp_bytes'])} | {r['compile_s']} |"
    )
  return out


def kernel_table(results):
  out = [
    "| target | case | pass | kernel | grid | read MiB | written MiB | in VMEM MiB | "
    "dot GFLOP | declared GFLOP | threads | smem KiB | regs | spill st/ld B | stack B |",
    "|" + "---|" * 15,
  ]
  for r in results:
    for k in r.get("kernels", []):
      g = lambda key: "-" if k.get(key) is None else k[key]  # noqa: E731
      dec = k.get("declared_flops")
      dec = "-" if dec is None else f"{dec / 1e9:.2f}"
      smem = "-" if k.get("smem") is None else f"{k['smem'] / 1024:.1f}"
      out.append(
        f"| {r['target']} | {r['case']} | {r['mode']} | {k.get('kernel', k['name'])} "
        f"| {g('grid')} | {_mib(k['read'])} | {_mib(k['written'])} | {_mib(k['vmem'])} "
        f"| {(k.get('dot_flops') or 0) / 1e9:.2f} | {dec} | {g('threads')} | {smem} "
        f"| {g('regs')} | {g('spill_st')}/{g('spill_ld')} | {g('stack')} |"
      )
  return out


def markdown(results, meta):
  lines = [
    f"# SSD kernel audit ({meta})",
    "",
    "Generated by `benchmarks/ssd_audit.py` (see its docstring for what is counted). "
    "B/token = (kernel + XLA bytes) / L; ratio = B/token / minimum (kernels only in "
    "brackets); goal (fwd+bwd): bytes <= 1.5x, FLOPs <= 1.25x.",
    "",
  ]
  lines += summary_table(results) + ["", "Per kernel launch:", ""] + kernel_table(results)
  return "\n".join(lines) + "\n"


def _git_state():
  try:
    rev = subprocess.run(
      ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "-C", str(ROOT), "status", "--porcelain", "--", "pallas_kernels", "mamba2_jax/ssd"],
      capture_output=True,
      text=True,
    ).stdout.strip()
    return rev + (" + uncommitted kernel changes" if dirty else "")
  except OSError:
    return "unknown"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--targets", default="tpu,gpu")
  ap.add_argument("--cases", default=",".join(CASES), help="of " + ", ".join(CASES))
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--out", default=str(ROOT / "benchmarks/results/ssd_audit.json"))
  ap.add_argument(
    "--md", default=str(ROOT / "benchmarks/ssd_audit.md"), help="markdown output ('' to skip)"
  )
  ap.add_argument("--worker", choices=sorted(VENVS), help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  cases, modes = a.cases.split(","), a.modes.split(",")
  unknown = [c for c in cases if c not in CASES] + [m for m in modes if m not in MODES]
  if unknown:
    ap.error(f"unknown case/mode: {unknown}")
  if a.worker:
    return worker(a.worker, cases, modes)
  results, versions = [], {}
  for target in a.targets.split(","):
    out = run_worker(target, cases, modes)
    if out is not None:
      versions[target] = out["jax"]
      results += [summarize(r) for r in out["results"]]
  meta = f"git {_git_state()}; jax " + ", ".join(f"{t} {v}" for t, v in versions.items())
  text = markdown(results, meta)
  print(text)
  if a.out:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
  if a.md:
    Path(a.md).write_text(text)
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
