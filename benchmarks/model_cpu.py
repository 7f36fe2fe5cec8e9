r"""Model benchmark on CPU: forward / training-step tokens/s and decode ms/token, vs peers.

  .venv/bin/python benchmarks/model_cpu.py [--seq_lens 2048,8192] [--rounds 3]
      [--out benchmarks/results/model_cpu.json] [--peers hf,mamba2jax|none] [--peer_chunks 256,128]
      [--chunk_size 64] [--scan_unroll 4]

Config (the issue's): d_model 256, 4 layers, d_state 128, headdim 64 (8 heads), expand 2,
vocab 1024, fp32, batch 1. Two paths of ours, each in its own process:

  tuned   the benchmark's path: `jax.jit` over the split model state, the training step the
          forward + backward of the mean next-token cross-entropy w.r.t. all parameters with the
          trainer's fused LM-head cross-entropy (mamba2_jax/loss.py), no optimizer update, as in
          the peers' runners; decode = `generate`'s in-jit scan.
  readme  the README's library snippet as written: the official defaults (`Mamba2Config` with
          only the sizes above), `model(tokens)` called directly, the README's `train_step`
          (`nnx.jit`, `nnx.value_and_grad` of `model.loss`, AdamW `optimizer.update`: it
          includes the optimizer step the peers leave out), decode = a loop of
          `model.decode_step(argmax, cache)` after `model.prefill`.

Peers (benchmarks/peers/, each in its own venv made by benchmarks/peers/setup_peers.sh; a peer
whose venv is missing is reported as such). Every process runs `--rounds` times, alternating
(tuned, readme, peers, tuned, ...); the table gives medians over the rounds, a ratio is the
median over the rounds of the ratio within a round (processes run back to back, so a load that
drifts between rounds cancels), and the JSON has every round with the load average (1 min) at
its start and end. Ratios from one run are what to compare: on a shared machine absolute
numbers move with the load.
MFU = model FLOPs / time / measured fp32 matmul peak. The FLOP floor is the model's FLOPs at
that peak with everything else free: no implementation beats it, so floor / a peer's time bounds
the speed-up over that peer any implementation can show on the machine at hand.
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


def _row(cfg, L, t_fwd, t_train, compile_s):
  return {
    "seq_len": L,
    "forward_tokens_per_s": L / t_fwd,
    "train_step_tokens_per_s": L / t_train,
    "compile_s": compile_s,
    "train_model_flops": 3 * model_flops_per_token(cfg, L) * L,
    "forward_s": t_fwd,
    "train_step_s": t_train,
  }


def _tokens(cfg, L):
  return jax.random.randint(jax.random.key(L), (1, L + 1), 0, cfg.vocab_size)


def bench_tuned(cfg, seq_lens, reps, decode_steps=64):
  """The benchmark's path (module docstring)."""
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
    tokens = _tokens(cfg, L)
    t0 = time.perf_counter()
    jax.block_until_ready(train_step(state, tokens))
    compile_s = time.perf_counter() - t0
    r = reps if L <= 2048 else max(2, reps // 2)
    t_fwd = timed(lambda: forward(state, tokens[:, :L]), r)
    t_train = timed(lambda: train_step(state, tokens), r)
    rows.append(_row(cfg, L, t_fwd, t_train, compile_s))
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
  return {"results": rows, "decode_ms_per_token": t_steps / decode_steps * 1e3}


def bench_readme(cfg, seq_lens, reps, decode_steps=64):
  """The README's library snippet as written (module docstring), at the benchmark's sizes."""
  import optax  # pylint: disable=g-import-not-at-top

  model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, tokens):  # the README's, verbatim
    loss, grads = nnx.value_and_grad(lambda m: m.loss(tokens[:, :-1], tokens[:, 1:]))(model)
    optimizer.update(model, grads)
    return loss

  rows = []
  for L in seq_lens:
    tokens = _tokens(cfg, L)
    t0 = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer, tokens))
    compile_s = time.perf_counter() - t0
    r = reps if L <= 2048 else max(2, reps // 2)
    t_fwd = timed(lambda: model(tokens[:, :L]), r)
    t_train = timed(lambda: train_step(model, optimizer, tokens), r)
    rows.append(_row(cfg, L, t_fwd, t_train, compile_s))
  prompt = jax.random.randint(jax.random.key(7), (1, 128), 0, cfg.vocab_size)

  def decode():
    logits, cache = model.prefill(prompt)
    token = jax.block_until_ready(jnp.argmax(logits[:, -1], axis=-1))  # prefill not timed
    t0 = time.perf_counter()
    for _ in range(decode_steps):
      logits, cache = model.decode_step(token, cache)
      token = jnp.argmax(logits, axis=-1)
    jax.block_until_ready(token)
    return time.perf_counter() - t0

  decode()  # compile
  t_steps = statistics.median(decode() for _ in range(reps))
  return {"results": rows, "decode_ms_per_token": t_steps / decode_steps * 1e3}


def run_process(label, cmd, out):
  """Runs one benchmark process; returns its JSON with the load average before and after."""
  print(f"running {label}: {' '.join(cmd)}", flush=True)
  load0 = os.getloadavg()[0]
  proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
  load = {"load_1min_start": load0, "load_1min_end": os.getloadavg()[0]}
  if proc.returncode != 0:
    return {"failed": proc.stderr[-2000:], **load}
  with open(out) as f:
    return {**json.load(f), **load}


def run_ours(path, args, out):
  cmd = [sys.executable, os.path.abspath(__file__), "--only", path, "--out", out]
  cmd += ["--seq_lens", args.seq_lens, "--reps", str(args.reps)]
  if path == "tuned":
    cmd += [f"--{k}={getattr(args, k)}" for k in ("chunk_size", "scan_unroll") if getattr(args, k)]
  if args.no_tune_malloc:
    cmd.append("--no_tune_malloc")
  return run_process(f"ours ({path})", cmd, out)


def run_peer(name, seq_lens, chunk_size, reps):
  venv, script = PEERS[name]
  py = os.path.join(ROOT, venv, "bin", "python")
  if not os.path.exists(py):
    return {"missing": f"{venv} not found: run bash benchmarks/peers/setup_peers.sh"}
  out = os.path.join(ROOT, "benchmarks", "results", f"peer_{name}_chunk{chunk_size}.json")
  cmd = [py, os.path.join(ROOT, script), "--seq_lens", seq_lens, "--out", out]
  cmd += ["--chunk_size", str(chunk_size), "--reps", str(reps)]
  return run_process(f"peer {name} (chunk {chunk_size})", cmd, out)


def _configs(args):
  """(tuned, readme) configs: the preset with the benchmark's options, and the official defaults
  with only the sizes given, as the README's snippet builds one."""
  tuned = Mamba2Config.preset("bench-cpu")  # chunk_size, scan_unroll: "auto" unless given
  if args.chunk_size:
    tuned = tuned.replace(chunk_size=args.chunk_size)
  if args.scan_unroll:
    tuned = tuned.replace(scan_unroll=args.scan_unroll)
  return tuned, Mamba2Config(d_model=256, n_layer=4, d_state=128, headdim=64, vocab_size=1024)


def _median_rows(runs):
  """Per seq_len medians over the rounds of one entry (runs: list of JSON results)."""
  by_len = {}
  for run in runs:
    for r in run.get("results", []):
      by_len.setdefault(r["seq_len"], []).append(r)
  out = {}
  for L, rs in by_len.items():
    out[L] = {
      k: statistics.median(r[k] for r in rs)
      for k in ("forward_tokens_per_s", "train_step_tokens_per_s")
      if all(r.get(k) for r in rs)
    }
  return out


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--seq_lens", default="2048,8192")
  p.add_argument(
    "--chunk_size",
    type=int,
    default=None,
    help="the tuned path's SSD chunk (default: the config's 'auto', 64 on CPU); peers use "
    "--peer_chunks",
  )
  p.add_argument(
    "--peer_chunks", default="256,128", help="chunk sizes to run each peer at (256 = their default)"
  )
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3, help="alternating runs of every process")
  p.add_argument("--peers", default="hf,mamba2jax")
  p.add_argument(
    "--scan_unroll",
    type=int,
    default=None,
    help="the tuned path's layers per layer-scan iteration (default: 'auto', all 4 on CPU)",
  )
  p.add_argument(
    "--no_tune_malloc",
    action="store_true",
    help="keep glibc's default malloc (see mamba2_jax.runtime.tune_cpu_malloc)",
  )
  p.add_argument("--only", choices=("tuned", "readme"), help=argparse.SUPPRESS)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "model_cpu.json"))
  args = p.parse_args()
  seq_lens = [int(s) for s in args.seq_lens.split(",")]
  tuned_cfg, readme_cfg = _configs(args)
  if args.only:  # one process of the alternation
    cfg = tuned_cfg if args.only == "tuned" else readme_cfg
    bench = bench_tuned if args.only == "tuned" else bench_readme
    with open(args.out, "w") as f:
      json.dump({**bench(cfg, seq_lens, args.reps), "malloc_tuned": _MALLOC_TUNED}, f)
    return
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  peak = matmul_peak_flops()
  print(
    f"fp32 matmul peak (jax, 2048^3): {peak / 1e9:.0f} GFLOP/s; "
    f"{os.cpu_count()} CPUs; jax {jax.__version__}",
    flush=True,
  )
  entries = {"ours (tuned)": [], "ours (readme)": []}
  peer_names = [n for n in args.peers.split(",") if n and n != "none"]
  chunks = [int(c) for c in args.peer_chunks.split(",")]
  tmp = os.path.join(ROOT, "benchmarks", "results", "model_cpu_part.json")
  for _ in range(args.rounds):
    for path in ("tuned", "readme"):
      entries[f"ours ({path})"].append(run_ours(path, args, tmp))
    for n in peer_names:
      for chunk in chunks:
        entries.setdefault(f"{n} (chunk {chunk})", []).append(
          run_peer(n, args.seq_lens, chunk, args.reps)
        )
  if os.path.exists(tmp):
    os.remove(tmp)
  report(args, entries, peak, tuned_cfg, readme_cfg)


def _round_ratio(mine, theirs, L, key):
  """Median over the rounds of mine / theirs, each round's pair run back to back (a load that
  drifts between rounds cancels; a ratio of medians over rounds would not)."""
  rs = []
  for a, b in zip(mine, theirs):
    x = next((r.get(key) for r in a.get("results", []) if r["seq_len"] == L), None)
    y = next((r.get(key) for r in b.get("results", []) if r["seq_len"] == L), None)
    if x and y:
      rs.append(x / y)
  return statistics.median(rs) if rs else float("nan")


def _flop_floor(med, peak, cfg):
  """The fastest any implementation of this model can run here: its model FLOPs (forward; a
  training step 3x) at the measured fp32 matmul peak, with every matmul at that peak and all
  other work free. Prints and returns, per L, the floor's tokens/s and floor / each impl's
  measured tokens/s: the largest speed-up over that impl this machine allows."""
  out = {}
  for L in sorted({L for rows in med.values() for L in rows}):
    fwd = peak / model_flops_per_token(cfg, L)
    row = {"forward_tokens_per_s": fwd, "train_step_tokens_per_s": fwd / 3, "max_speedup": {}}
    for name, rows in med.items():
      r = rows.get(L, {})
      if r.get("train_step_tokens_per_s") and r.get("forward_tokens_per_s"):
        row["max_speedup"][name] = {
          "train": fwd / 3 / r["train_step_tokens_per_s"],
          "forward": fwd / r["forward_tokens_per_s"],
        }
    out[str(L)] = row
    print(
      f"\nFLOP floor at L={L} (model FLOPs at the measured matmul peak, nothing else costing "
      f"time): train {fwd / 3:.0f} tok/s, forward {fwd:.0f} tok/s; the most an implementation "
      "could gain here over: "
      + "; ".join(
        f"{k} {v['train']:.2f}x train / {v['forward']:.2f}x fwd"
        for k, v in row["max_speedup"].items()
      )
    )
  return out


def report(args, entries, peak, tuned_cfg, readme_cfg):
  med = {name: _median_rows(runs) for name, runs in entries.items()}
  ours = ("ours (tuned)", "ours (readme)")
  header = (
    f"{'impl':26s} {'L':>6s} {'fwd tok/s':>10s} {'train tok/s':>12s} "
    f"{'tuned/it train':>15s} {'readme/it train':>16s} {'tuned/it fwd':>13s} {'readme/it fwd':>14s}"
  )
  print("\n" + header + "\n" + "-" * len(header))
  ratios = {}
  for name, rows in med.items():
    problems = [r.get("missing") or r.get("failed") for r in entries[name] if "results" not in r]
    if problems:
      print(f"{name:26s} {str(problems[0])[-300:]}")
      continue
    for L, r in sorted(rows.items()):
      cols = [
        _round_ratio(entries[o], entries[name], L, key)
        for key in ("train_step_tokens_per_s", "forward_tokens_per_s")
        for o in ours
      ]
      ratios.setdefault(name, {})[L] = dict(
        zip(("tuned_train", "readme_train", "tuned_forward", "readme_forward"), cols)
      )
      print(
        f"{name:26s} {L:6d} {r.get('forward_tokens_per_s', float('nan')):10.0f} "
        f"{r.get('train_step_tokens_per_s', float('nan')):12.0f} "
        f"{cols[0]:15.2f} {cols[1]:16.2f} {cols[2]:13.2f} {cols[3]:14.2f}"
      )
  floor = _flop_floor(med, peak, tuned_cfg)
  decode = {
    name: statistics.median(r["decode_ms_per_token"] for r in runs if "decode_ms_per_token" in r)
    for name, runs in entries.items()
    if any("decode_ms_per_token" in r for r in runs)
  }
  print(
    "\ndecode ms/token (median over rounds): "
    + "; ".join(f"{k} {v:.3f}" for k, v in decode.items())
  )
  loads = [
    v for runs in entries.values() for r in runs for k, v in r.items() if k.startswith("load")
  ]
  print(f"load average (1 min) over the runs: {min(loads):.1f} - {max(loads):.1f}")
  result = {
    "machine": {
      "cpus": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "fp32_matmul_peak_flops": peak,
      "malloc_tuned": _MALLOC_TUNED,
      "load_1min_min": min(loads),
      "load_1min_median": statistics.median(loads),
      "load_1min_max": max(loads),
    },
    "config": {"tuned": tuned_cfg.to_dict(), "readme": readme_cfg.to_dict()},
    "resolved": {
      "chunk_size": tuned_cfg.resolved_chunk_size(),
      "scan_unroll": tuned_cfg.resolved_scan_unroll(),
    },
    "rounds": args.rounds,
    "medians": {k: {str(L): r for L, r in v.items()} for k, v in med.items()},
    "ratios": {k: {str(L): r for L, r in v.items()} for k, v in ratios.items()},
    "flop_floor": floor,
    "decode_ms_per_token": decode,
    "runs": entries,
    "date": time.strftime("%Y-%m-%d"),
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2, default=str)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
