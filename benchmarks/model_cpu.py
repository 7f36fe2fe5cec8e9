r"""Model benchmark on CPU: forward / training-step tokens/s and decode ms/token, vs peers.

  .venv/bin/python benchmarks/model_cpu.py [--seq_lens 2048,8192] [--out benchmarks/results/model_cpu.json]
      [--peers hf,mamba2jax|none] [--chunk_size 64] [--scan_unroll 4]

Config (the issue's): d_model 256, 4 layers, d_state 128, headdim 64 (8 heads), expand 2,
vocab 1024, fp32, batch 1. The training step is forward + backward of the mean next-token
cross-entropy w.r.t. all parameters (no optimizer update; ours with the trainer's fused LM-head
cross-entropy, mamba2_jax/loss.py), as in the peers' runners
(benchmarks/peers/, each run in its own venv made by benchmarks/peers/setup_peers.sh; a peer
whose venv is missing is reported as such). MFU = model FLOPs / time / measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba2_jax.runtime import tune_cpu_malloc  # noqa: E402  (imports no numpy / jax)

# before numpy and jax start threads (see tune_cpu_malloc)
_MALLOC_TUNED = "--no_tune_malloc" not in sys.argv and tune_cpu_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mamba2_jax import Mamba2Config, Mamba2LM  # noqa: E402
from mamba2_jax.flops import model_flops_per_token  # noqa: E402
from mamba2_jax.generate import decode_tokens, prefill  # noqa: E402
from mamba2_jax.loss import model_nll  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = {
  "hf": (".venv-torch", "benchmarks/peers/hf_torch_peer.py"),
  "mamba2jax": (".venv-peer-mamba2jax", "benchmarks/peers/mamba2_jax_peer.py"),
}


def timed(fn, reps, warmup=3):
  # compile, then warm up: the first steps grow the malloc heap to its steady state (with the
  # tuned malloc each of the first three L=8192 training steps faults in another 2.2 GB)
  for _ in range(warmup):
    jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def matmul_peak_flops(n=2048, reps=5):
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / timed(lambda: f(a), reps)


def bench_ours(cfg, seq_lens, reps, decode_steps=64):
  model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  @jax.jit
  def train_step(state, tokens):
    def loss_fn(state):  # the trainer's loss: the LM head fused with the cross-entropy
      return jnp.mean(model_nll(nnx.merge(graphdef, state), tokens[:, :-1], tokens[:, 1:])[0])

    return jax.value_and_grad(loss_fn)(state)

  rows = []
  for L in seq_lens:
    tokens = jax.random.randint(jax.random.key(L), (1, L + 1), 0, cfg.vocab_size)
    t0 = time.perf_counter()
    jax.block_until_ready(train_step(state, tokens))
    compile_s = time.perf_counter() - t0
    r = reps if L <= 2048 else max(2, reps // 2)
    t_fwd = timed(lambda: forward(state, tokens[:, :L]), r)
    t_train = timed(lambda: train_step(state, tokens), r)
    fl = model_flops_per_token(cfg, L)
    rows.append(
      {
        "seq_len": L,
        "forward_tokens_per_s": L / t_fwd,
        "train_step_tokens_per_s": L / t_train,
        "compile_s": compile_s,
        "train_model_flops": 3 * fl * L,
        "forward_s": t_fwd,
        "train_step_s": t_train,
      }
    )
  # Decode: prefill 128 tokens, then time `decode_steps` greedy steps (one jitted scan).
  prompt = jax.random.randint(jax.random.key(7), (1, 128), 0, cfg.vocab_size)
  logits, cache = prefill(model, prompt)
  t_steps = timed(
    lambda: decode_tokens(
      model,
      logits[:, -1],
      cache,
      jax.random.key(0),
      max_new_tokens=decode_steps,
      temperature=0.0,
      top_k=None,
      top_p=None,
    )[0],
    reps,
  )
  decode_ms = t_steps / decode_steps * 1e3
  return {"peer": "mamba2_jax (ours)", "results": rows, "decode_ms_per_token": decode_ms}


def run_peer(name, seq_lens, chunk_size, reps):
  venv, script = PEERS[name]
  py = os.path.join(ROOT, venv, "bin", "python")
  if not os.path.exists(py):
    return {"peer": name, "missing": f"{venv} not found: run bash benchmarks/peers/setup_peers.sh"}
  out = os.path.join(ROOT, "benchmarks", "results", f"peer_{name}_chunk{chunk_size}.json")
  cmd = [
    py,
    os.path.join(ROOT, script),
    "--seq_lens",
    ",".join(map(str, seq_lens)),
    "--out",
    out,
    "--chunk_size",
    str(chunk_size),
    "--reps",
    str(reps),
  ]
  print("running peer:", " ".join(cmd), flush=True)
  proc = subprocess.run(
    cmd, cwd=os.path.dirname(os.path.join(ROOT, script)), text=True, capture_output=True
  )
  if proc.returncode != 0:
    return {"peer": name, "failed": proc.stderr[-2000:]}
  with open(out) as f:
    return json.load(f)


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--seq_lens", default="2048,8192")
  p.add_argument(
    "--chunk_size",
    type=int,
    default=None,
    help="our SSD chunk (default: the config's 'auto', 64 on CPU); peers use --peer_chunks",
  )
  p.add_argument(
    "--peer_chunks", default="256,128", help="chunk sizes to run each peer at (256 = their default)"
  )
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--peers", default="hf,mamba2jax")
  p.add_argument(
    "--scan_unroll",
    type=int,
    default=None,
    help="layers per layer-scan iteration (default: the config's 'auto', all 4 on CPU)",
  )
  p.add_argument(
    "--no_tune_malloc",
    action="store_true",
    help="keep glibc's default malloc (see mamba2_jax.runtime.tune_cpu_malloc)",
  )
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "model_cpu.json"))
  args = p.parse_args()
  seq_lens = [int(s) for s in args.seq_lens.split(",")]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)

  malloc_tuned = _MALLOC_TUNED
  cfg = Mamba2Config.preset("bench-cpu")  # chunk_size, scan_unroll: "auto" unless given
  if args.chunk_size:
    cfg = cfg.replace(chunk_size=args.chunk_size)
  if args.scan_unroll:
    cfg = cfg.replace(scan_unroll=args.scan_unroll)
  peak = matmul_peak_flops()
  print(
    f"fp32 matmul peak (jax, 2048^3): {peak / 1e9:.0f} GFLOP/s; "
    f"{os.cpu_count()} CPUs; jax {jax.__version__}",
    flush=True,
  )
  ours = bench_ours(cfg, seq_lens, args.reps)
  peers = []
  for n in args.peers.split(","):
    for chunk in [int(c) for c in args.peer_chunks.split(",")]:
      if n and n != "none":
        r = run_peer(n, seq_lens, chunk, args.reps)
        r["peer"] = f"{r['peer']} (chunk {chunk})"
        peers.append(r)

  header = (
    f"{'impl':28s} {'L':>6s} {'fwd tok/s':>10s} {'train tok/s':>12s} {'MFU':>6s} "
    f"{'ours/peer train':>16s} {'ours/peer fwd':>14s}"
  )
  print("\n" + header + "\n" + "-" * len(header))
  for r in ours["results"]:
    mfu = r["train_model_flops"] / r["train_step_s"] / peak
    r["mfu"] = mfu
    print(
      f"{'mamba2_jax (ours, chunk %d)' % cfg.resolved_chunk_size():28s} {r['seq_len']:6d} "
      f"{r['forward_tokens_per_s']:10.0f} {r['train_step_tokens_per_s']:12.0f} {mfu:6.1%}"
    )
  for peer in peers:
    if "results" not in peer:
      print(
        f"{peer['peer']:28s} {peer.get('missing') or 'FAILED: ' + peer.get('failed', '')[-300:]}"
      )
      continue
    for r in peer["results"]:
      mine = next((o for o in ours["results"] if o["seq_len"] == r["seq_len"]), None)
      rt = (
        mine["train_step_tokens_per_s"] / r["train_step_tokens_per_s"]
        if mine and r.get("train_step_tokens_per_s")
        else float("nan")
      )
      rf = (
        mine["forward_tokens_per_s"] / r["forward_tokens_per_s"]
        if mine and r.get("forward_tokens_per_s")
        else float("nan")
      )
      r["ours_over_peer_train"], r["ours_over_peer_forward"] = rt, rf
      print(
        f"{peer['peer'][:28]:28s} {r['seq_len']:6d} {r.get('forward_tokens_per_s', float('nan')):10.0f} "
        f"{r.get('train_step_tokens_per_s', float('nan')):12.0f} {'':6s} {rt:16.2f} {rf:14.2f}"
      )
  print(f"\ndecode ms/token: ours {ours['decode_ms_per_token']:.3f}", end="")
  for peer in peers:
    if "decode_ms_per_token" in peer:
      print(
        f"; {peer['peer']} {peer['decode_ms_per_token']:.3f} "
        f"(peer/ours {peer['decode_ms_per_token'] / ours['decode_ms_per_token']:.1f}x)",
        end="",
      )
  print()
  result = {
    "machine": {
      "cpus": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "fp32_matmul_peak_flops": peak,
      "malloc_tuned": malloc_tuned,
    },
    "config": cfg.to_dict(),
    "resolved": {
      "chunk_size": cfg.resolved_chunk_size(),
      "scan_unroll": cfg.resolved_scan_unroll(),
    },
    "ours": ours,
    "peers": peers,
    "date": time.strftime("%Y-%m-%d"),
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2, default=str)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
