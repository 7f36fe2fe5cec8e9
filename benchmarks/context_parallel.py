r"""Context parallelism: overhead of the state passing, bytes exchanged per layer, and the longest
sequence per TPU v5e chip.

  .venv/bin/python -m benchmarks.context_parallel [--contexts 1,2,4,8] [--seq_len 4096]
  .venv/bin/python -m benchmarks.context_parallel --tpu_table [--tpu_models 130m,370m,780m]

Part 1 (default; 8 simulated CPU devices): the trainer's jitted step (`mamba2_jax.train.loop.
build`: forward, backward, AdamW; remat "full" as the pod presets) on ONE global sequence of
`--seq_len` tokens split over context 1 / 2 / 4 / 8 devices (mesh (1, 1, c, 1)); tokens/s as
the median of `--reps` steps after compilation, and the ratio to context 1. The simulated
devices share this host's cores (2 here), so c devices do not run c times faster: the ratio is
the share of useful work, 1.0 when splitting the sequence adds nothing (the same total FLOPs
spread over devices that run one after another on the same cores), below 1.0 by the state
passing (summaries, correction term, conv halos), the parameter gathers of FSDP over context
and smaller per-device matmuls. Beside it, the bytes each device sends per layer, read from the
compiled HLO (operands of the all-gathers and collective-permutes that the context exchanges
make, `hlo_exchange_bytes`) and the analytic figure (`analytic_exchange_bytes`): forward
b·H fp32 carry factors + b·H·P·N fp32 states (all_gather) and (d_conv-1)·b·conv_dim halo rows
(ppermute); backward 2·b·H·P·N fp32 (state cotangents, all_gather) and the halo cotangents.

Part 2 (`--tpu_table`; libtpu's memory analysis, no TPU needed): for each model and context
size, the longest sequence whose full train step (remat "full" with `remat_group`, bf16 compute,
fp32 master weights and AdamW) compiles and fits the 16 GiB HBM of a v5e chip, found by
`experiments.train_compile` in .venv-tpu (one compile at a time, doubling from a guess, then
halving; peak host RSS from /usr/bin/time -v). Context 1 is one sequence per chip under FSDP 4
on v5e:2x2 (mesh (1, 4, 1, 1), batch 4); context c is one sequence over c chips (v5e:2x2,
v5e:4x4, v5e:8x8). A compile over `--tpu_max_s` seconds or `--tpu_max_rss_gb` GB ends that
search ("not measured"). Each part rewrites only its own key of the JSON
(benchmarks/results/context_parallel.json), so they can be rerun separately.
"""

import mamba2_jax.host_tuning  # noqa: F401  (first: malloc for XLA on CPU hosts; before numpy/jax)

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "context_parallel.json")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "f64": 8}


# ---- bytes exchanged: from the HLO and from the formula --------------------------------------
def _shape_bytes(text: str) -> int:
  """Bytes of the last array shape in an HLO result type, e.g. 'f32[8,3,16]{2,1,0}'."""
  shapes = re.findall(r"(\w+)\[([\d,]*)\]", text)
  dt, dims = shapes[-1]
  return _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)


def hlo_exchange_bytes(hlo: str, context: int) -> dict:
  """Bytes one device sends in the context exchanges of a compiled step (its HLO text): the
  operands of the all-gathers and collective-permutes made inside `shard_map` (the SSD state
  passing and the conv halos; FSDP's parameter gathers and the gradient reductions are counted
  apart as "other"), split into those in the layer scan's loop body (per layer and step) and
  those outside it (per step). An all-gather's operand is its result / `context` (the gathered
  axis is the shard axis)."""
  out = {"per_layer": {"all-gather": 0, "collective-permute": 0}, "per_step": 0, "other": 0}
  pat = re.compile(r"=\s+(.+?)\s+(all-gather|collective-permute)(?:-start)?\(")
  for line in hlo.splitlines():
    m = pat.search(line)
    if not m:
      continue
    nbytes = _shape_bytes(m.group(1))
    op = m.group(2)
    if op == "all-gather":
      nbytes //= context
    meta = re.search(r'op_name="([^"]*)"', line)
    name = meta.group(1) if meta else ""
    if "shard_map" not in name:
      out["other"] += nbytes
    elif "while/body" in name:
      out["per_layer"][op] += nbytes
    else:
      out["per_step"] += nbytes
  out["per_layer"]["total"] = sum(out["per_layer"].values())
  return out


def analytic_exchange_bytes(mc, batch: int, context: int) -> dict:
  """The same per-layer bytes from the model shape (forward + backward, one device): the SSD's
  summaries (carry factors b·H and states b·H·P·N, fp32) and state cotangents (2·b·H·P·N fp32:
  the incoming state's and the replicated final state's), the conv halos (d_conv-1 rows of the
  conv_dim channels in the compute dtype, there and back). Zero for context 1."""
  if context == 1:
    return {"all-gather": 0, "collective-permute": 0, "total": 0}
  import jax.numpy as jnp  # noqa: PLC0415

  b, H, P, N = batch, mc.nheads, mc.headdim, mc.d_state
  state = b * H * P * N * 4
  gather = b * H * 4 + state + 2 * state
  halo = 2 * (mc.d_conv - 1) * b * mc.conv_dim * jnp.dtype(mc.compute_dtype).itemsize
  return {"all-gather": gather, "collective-permute": halo, "total": gather + halo}


# ---- part 1: CPU steps on 8 simulated devices ------------------------------------------------
def cpu_config(seq_len: int, layers: int):
  from configs import train as train_configs  # noqa: PLC0415

  config = train_configs.get_config("tiny")
  config.model.update(
    d_model=256, n_layer=layers, d_state=64, headdim=32, chunk_size=64, scan_unroll=1
  )
  config.model.remat_policy = "full"
  config.seq_len, config.global_batch_size = seq_len, 1
  return config


def bench_context(config, context: int, reps: int) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from mamba2_jax.train.config import validate  # noqa: PLC0415
  from mamba2_jax.train.loop import build  # noqa: PLC0415
  from mamba2_jax.train.sharding import make_mesh  # noqa: PLC0415

  config = config.copy_and_resolve_references()
  config.mesh_shape = (1, 1, context, 1)
  mesh = make_mesh(config.mesh_shape, jax.devices()[:context])
  mc = validate(config, num_devices=context)
  setup = build(config, mc, mesh)
  state = setup.init_state(0)
  rng = np.random.default_rng(0)
  rows = rng.integers(0, mc.vocab_size, (1, config.seq_len + 1)).astype(np.int32)
  batch = {"tokens": jax.device_put(rows, setup.data_shard)}
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):  # warm-up: the malloc heap reaches its steady state
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      ts.append(time.perf_counter() - t0)
  t = statistics.median(ts)
  return {
    "context": context,
    "step_s": t,
    "tokens_per_s": config.seq_len / t,
    "compile_s": compile_s,
    "loss": float(m["loss"]),
    "hlo_bytes": hlo_exchange_bytes(compiled.as_text() or "", context),
    "analytic_bytes_per_layer": analytic_exchange_bytes(mc, 1, context),
  }


def run_cpu(args) -> dict:
  import jax  # noqa: PLC0415

  jax.config.update("jax_num_cpu_devices", 8)
  load_before = list(os.getloadavg())  # other processes on this host skew the timings
  config = cpu_config(args.seq_len, args.layers)
  rows = []
  for c in (int(v) for v in args.contexts.split(",")):
    rows.append(bench_context(config, c, args.reps))
    print(f"  context {c}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
  base = next((r["tokens_per_s"] for r in rows if r["context"] == 1), None)
  for r in rows:
    r["ratio_vs_context_1"] = r["tokens_per_s"] / base if base else None
  print(
    f"\n{'context':>7s} {'step s':>8s} {'tokens/s':>10s} {'ratio':>6s} "
    f"{'HLO B/layer':>12s} {'analytic':>10s} {'B/step':>7s}"
  )
  for r in rows:
    h = r["hlo_bytes"]
    print(
      f"{r['context']:7d} {r['step_s']:8.3f} {r['tokens_per_s']:10,.0f} "
      f"{r['ratio_vs_context_1'] or 0:6.2f} {h['per_layer']['total']:12,d} "
      f"{r['analytic_bytes_per_layer']['total']:10,d} {h['per_step']:7,d}"
    )
  m = config.model
  return {
    "model": {k: m[k] for k in ("d_model", "n_layer", "d_state", "headdim", "expand", "d_conv")},
    "seq_len": args.seq_len,
    "remat_policy": m.remat_policy,
    "jax": jax.__version__,
    "cpus": os.cpu_count(),
    "loadavg_before": load_before,
    "results": rows,
    "ratio_means": "tokens/s vs context 1 on simulated devices sharing the host's cores: the "
    "share of useful work kept (1.0 = splitting adds no work), not a speed-up",
  }


# ---- part 2: the TPU v5e table (AOT compiles in .venv-tpu) -----------------------------------
TOPOLOGY = {1: "v5e:2x2", 4: "v5e:2x2", 16: "v5e:4x4", 64: "v5e:8x8"}
# first per-chip token count tried (then doubled while it fits, halved while it does not)
GUESS = {"130m": 131072, "370m": 65536, "780m": 32768}


def remat_group(n_layer: int) -> int:
  """The divisor of n_layer nearest sqrt(n_layer) (n_layer/g + g saved layer inputs)."""
  return min(
    (g for g in range(1, n_layer + 1) if n_layer % g == 0), key=lambda g: abs(g - n_layer**0.5)
  )


def compile_point(args, model: str, context: int, per_chip: int, group: int) -> dict:
  """One `experiments.train_compile` run: its JSON result plus wall time and peak RSS."""
  topo = TOPOLOGY[context]
  if context == 1:
    mesh, batch, seq = "(1,4,1,1)", 4, per_chip
  else:
    mesh, batch, seq = f"(1,1,{context},1)", 1, per_chip * context
  with tempfile.TemporaryDirectory() as tmp:
    res = os.path.join(tmp, "r.json")
    cmd = [
      "/usr/bin/time",
      "-v",
      os.path.join(ROOT, ".venv-tpu", "bin", "python"),
      "-m",
      "experiments.train_compile",
      f"--config=configs/train.py:{model}",
      f"--topology={topo}",
      "--num_hosts=1",  # only the data-shard check reads it; the memory does not depend on it
      f"--config.mesh_shape={mesh}",
      f"--config.seq_len={seq}",
      f"--config.global_batch_size={batch}",
      "--config.model.remat_policy=full",
      f"--config.model.remat_group={group}",
      f"--result_json={res}",
    ]
    t0 = time.perf_counter()
    # its own process group, so a timeout ends the compiler too (not only /usr/bin/time);
    # libtpu's one-process lock is not needed for compiles
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    p = subprocess.Popen(
      cmd,
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
    )
    try:
      _, err = p.communicate(timeout=args.tpu_max_s)
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.communicate()
      return {"seq_len": seq, "per_chip": per_chip, "fits": None, "why": "compile timeout"}
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    r = json.load(open(res)) if os.path.exists(res) else {"fits": False, "error": err[-500:]}
  r.update(seq_len=seq, per_chip=per_chip, mesh=mesh, batch=batch, wall_s=wall)
  r["peak_rss_gb"] = int(rss.group(1)) / 1e6 if rss else None
  if r["peak_rss_gb"] and r["peak_rss_gb"] > args.tpu_max_rss_gb:
    r["why"] = f"host RSS {r['peak_rss_gb']:.1f} GB over {args.tpu_max_rss_gb}"
  return r


def _show(model, context, r):
  used = r.get("used_bytes")
  mem = f"{used / 2**30:.2f} GiB" if used else f"temp {r.get('temp_bytes_required') or 0:.3g} B"
  print(
    f"  {model} context {context}: {r['seq_len']:>9,d} tokens -> fits={r['fits']} ({mem}, "
    f"{r.get('wall_s', 0):.0f} s, RSS {r.get('peak_rss_gb') or 0:.1f} GB)",
    flush=True,
  )


def search(args, model: str, context: int, trials: list, table: dict) -> dict:
  """Longest per-chip token count (powers of two from GUESS, or from the longest per-chip
  count of the model's cells measured so far) that fits: doubling while it fits, halving while
  it does not. Stops at a timeout or an RSS over the limit."""
  from mamba2_jax.config import Mamba2Config  # noqa: PLC0415

  group = remat_group(Mamba2Config.preset(f"mamba2-{model}").n_layer)
  done = [
    v["max_seq_len"] // max(int(k.split("context")[1]), 1)
    for k, v in table.items()
    if k.startswith(f"{model}/") and v.get("max_seq_len")
  ]
  n = max(done) if done else GUESS[model]
  best, fail = None, None
  while best is None or fail is None:
    r = compile_point(args, model, context, n, group)
    trials.append({"model": model, "context": context, **r})
    _show(model, context, r)
    if r["fits"] is None or r.get("why"):
      return {
        "max_seq_len": best["seq_len"] if best else None,
        "not_measured": r["seq_len"],
        "why": r.get("why"),
        "remat_group": group,
        "topology": TOPOLOGY[context],
      }
    if r["fits"]:
      best = r
      n *= 2
    else:
      fail = r
      n //= 2
    if (best and fail) or n < 1024:
      break
    if best and fail is None and n > (1 << 24):
      break
  return {
    "max_seq_len": best["seq_len"] if best else None,
    "used_gib": best["used_bytes"] / 2**30 if best else None,
    "first_failing_seq_len": fail["seq_len"] if fail else None,
    "remat_group": group,
    "topology": TOPOLOGY[context],
    "mesh": best["mesh"] if best else None,
  }


def run_tpu_table(args, previous: dict | None) -> dict:
  table = dict((previous or {}).get("table", {}))
  trials = list((previous or {}).get("trials", []))
  cells = (
    [c.split("/") for c in args.tpu_cells.split(",")]
    if args.tpu_cells
    else [(m, c) for m in args.tpu_models.split(",") for c in args.tpu_contexts.split(",")]
  )
  for model, c in cells:
    key = f"{model}/context{c}"
    if key in table and not args.tpu_redo:
      continue
    table[key] = search(args, model, int(c), trials, table)
    save_part("tpu_table", {"table": table, "trials": trials}, args.out)  # after each cell
  print(
    f"\n{'model/context':16s} {'topology':9s} {'longest fit':>12s} {'GiB/chip':>9s} {'fails at':>10s}"
  )
  for key, v in table.items():
    fit, gib, nxt = v.get("max_seq_len"), v.get("used_gib"), v.get("first_failing_seq_len")
    print(
      f"{key:16s} {v.get('topology', ''):9s} {fit or 0:12,d} {gib or 0:9.2f} "
      f"{nxt or 0:10,d} {v.get('why') or ''}"
    )
  return {"table": table, "trials": trials, "date": time.strftime("%Y-%m-%d")}


# ---- main -------------------------------------------------------------------------------------
def save_part(key: str, value: dict, path: str):
  data = {}
  if os.path.exists(path):
    with open(path) as f:
      data = json.load(f)
  data[key] = value
  data["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=2)


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--contexts", default="1,2,4,8")
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--tpu_table", action="store_true", help="part 2 instead of part 1")
  p.add_argument("--tpu_models", default="130m,370m,780m")
  p.add_argument("--tpu_contexts", default="1,4,16,64")
  p.add_argument("--tpu_cells", default="", help="MODEL/CONTEXT,... in this order (default: all)")
  p.add_argument("--tpu_redo", action="store_true", help="recompute cells already in the JSON")
  p.add_argument("--tpu_max_s", type=float, default=540.0)
  p.add_argument("--tpu_max_rss_gb", type=float, default=10.0)
  p.add_argument("--out", default=OUT)
  args = p.parse_args()
  if args.tpu_table:
    previous = None
    if os.path.exists(args.out):
      with open(args.out) as f:
        previous = json.load(f).get("tpu_table")
    save_part("tpu_table", run_tpu_table(args, previous), args.out)
  else:
    out = run_cpu(args)
    out["loadavg_after"] = list(os.getloadavg())
    out["date"] = time.strftime("%Y-%m-%d")
    save_part("cpu", out, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
