r"""Training throughput on this host: tokens/s and MFU of the trainer's own jitted train step.

  .venv/bin/python benchmarks/train_throughput.py [--variants tiny,30m,demo64,demo256] [--seq_len 2048]
      [--out benchmarks/results/train_throughput.json]

Each variant is a configs/train.py config at seq 2048 (`demo64`, `demo256`: the main demo's two
runs, configs/train.py:small with vocab 64 at 64 x 64 and 256 x 16 tokens), run through
`mamba2_jax.train.loop.build` on one device (the full step: forward, backward, AdamW update, clipping; no data loading, which
benchmarks/data_pipeline.py measures separately), timed as the median of `--reps` steps after
compilation. MFU = model FLOPs (3 x forward FLOPs of the dense matmuls and the chunked SSD,
mamba2_jax/flops.py) / step time / the measured fp32 matmul peak of this host. The table also
shows the peers' training-step numbers for the model benchmark's config from
benchmarks/results/model_cpu.json (a different, 2M-parameter model: forward + backward without
the optimizer update), for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba2_jax.runtime import tune_cpu_malloc  # noqa: E402  (imports no numpy / jax)

_MALLOC_TUNED = tune_cpu_malloc()  # before numpy and jax start threads (see tune_cpu_malloc)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import train as train_configs  # noqa: E402
from mamba2_jax.flops import model_flops_per_token  # noqa: E402
from mamba2_jax.train.config import validate  # noqa: E402
from mamba2_jax.train.loop import build  # noqa: E402
from mamba2_jax.train.metrics import peak_flops  # noqa: E402
from mamba2_jax.train.sharding import make_mesh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = {"tiny": 8, "small": 4, "30m": 2}
# The main demo's two training runs (configs/sweeps/demo.py): configs/train.py:small with vocab
# 64 at (seq_len, batch) = (64, 64) and (256, 16), 4096 tokens per step.
DEMO = {"demo64": (64, 64), "demo256": (256, 16)}


def bench(variant: str, seq_len: int, batch: int, reps: int, chunk: int | None) -> dict:
  if variant in DEMO:
    config = train_configs.get_config("small")
    config.model.vocab_size = 64
    seq_len, batch = DEMO[variant]
  else:
    config = train_configs.get_config(variant)
  config.seq_len, config.global_batch_size = seq_len, batch
  if chunk:
    config.model.chunk_size = chunk
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  mc = validate(config, num_devices=1)
  setup = build(config, mc, mesh)
  state = setup.init_state(0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, mc.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  b = {"tokens": jax.device_put(tokens, setup.data_shard)}
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    state, m = setup.train_step(state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(2):  # the first steps grow the malloc heap to its steady state
      state, m = setup.train_step(state, b)
      jax.block_until_ready(m)
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      state, m = setup.train_step(state, b)
      jax.block_until_ready(m)
      ts.append(time.perf_counter() - t0)
  t = statistics.median(ts)
  flops = 3 * model_flops_per_token(mc, seq_len) * batch * seq_len
  return {
    "variant": variant,
    "params": mc.num_params(),
    "seq_len": seq_len,
    "batch": batch,
    "chunk_size": mc.resolved_chunk_size(),
    "scan_unroll": mc.resolved_scan_unroll(),
    "step_s": t,
    "tokens_per_s": batch * seq_len / t,
    "model_flops_per_step": flops,
    "compile_s": compile_s,
    "loss": float(m["loss"]),
  }


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--variants", default="tiny,30m,demo64,demo256")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--chunk_size", type=int, default=None, help="override model.chunk_size")
  p.add_argument(
    "--out", default=os.path.join(ROOT, "benchmarks", "results", "train_throughput.json")
  )
  args = p.parse_args()
  tuned = _MALLOC_TUNED
  peak = peak_flops()
  print(
    f"# jax {jax.__version__} backend={jax.default_backend()} cpus={os.cpu_count()} "
    f"peak={peak / 1e9:.0f} GFLOP/s malloc_tuned={tuned}"
  )
  rows = []
  for v in args.variants.split(","):
    r = bench(v, args.seq_len, BATCH.get(v, 2), args.reps, args.chunk_size)
    r["mfu"] = r["model_flops_per_step"] / r["step_s"] / peak
    rows.append(r)
  print(
    f"{'config':8s} {'params':>11s} {'batch x L':>11s} {'chunk':>5s} {'step ms':>9s} "
    f"{'tokens/s':>10s} {'MFU':>6s}"
  )
  for r in rows:
    print(
      f"{r['variant']:8s} {r['params']:11,d} {r['batch']:>4d} x {r['seq_len']:<5d} "
      f"{r['chunk_size']:5d} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:10,.0f} {r['mfu']:6.1%}"
    )
  peers = []
  try:
    with open(os.path.join(ROOT, "benchmarks", "results", "model_cpu.json")) as f:
      mc = json.load(f)
    for peer in [mc.get("ours", {})] + mc.get("peers", []):
      for r in peer.get("results", []):
        if r["seq_len"] == args.seq_len:
          peers.append(
            {"peer": peer.get("peer"), "train_step_tokens_per_s": r.get("train_step_tokens_per_s")}
          )
  except (OSError, ValueError):
    pass
  if peers:
    print(
      f"\nfor scale, the model benchmark's 2.1M-parameter config (fwd+bwd, no optimizer) at "
      f"L={args.seq_len} from benchmarks/results/model_cpu.json:"
    )
    for q in peers:
      print(f"  {q['peer']:40s} {q['train_step_tokens_per_s']:10,.0f} tokens/s")
  out = {
    "machine": {
      "cpus": os.cpu_count(),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "peak_flops": peak,
      "malloc_tuned": tuned,
    },
    "results": rows,
    "peers_from_model_benchmark": peers,
    "date": time.strftime("%Y-%m-%d"),
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
