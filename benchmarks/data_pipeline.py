r"""Data benchmark on the built-in corpus: prepare MB/s, training-stream tokens/s, and the tiny
model's training-step consumption rate at the same (batch, seq_len).

  .venv/bin/python benchmarks/data_pipeline.py [--seq_len 2048] [--batch 8] [--batches 200]
      [--tokenizers byte,neox] [--workers 0,2] [--out benchmarks/results/data_pipeline.json]

- prepare: `prepare(builtin:shakespeare)` (42 texts, 5.06 MB) into a temp dir, input MB / wall
  s, with 1 and 2 worker processes (shards of 1 MB of input so both workers get work). `neox` is
  skipped when the tokenizer file is absent (scripts/get_neox_tokenizer.sh).
- stream: `make_train_iterator` over the prepared byte-level data (packing "segments", shuffled,
  repeating), tokens/s over --batches batches after the first (first-batch latency separate).
- consumption: jitted forward + backward (mean next-token cross-entropy w.r.t. all parameters,
  no optimizer) of `Mamba2LM(Mamba2Config.preset("tiny"))` on one (batch, seq_len) batch; the
  stream must beat this rate for the step never to wait on data ("headroom" = stream / step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mamba2_jax.host_tuning  # noqa: E402,F401  (first: malloc for XLA on CPU hosts)
from absl import flags  # noqa: E402

flags.FLAGS(sys.argv[:1])  # grain's mp_prefetch reads an absl flag

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mamba2_jax import Mamba2Config, Mamba2LM  # noqa: E402
from mamba2_jax.data import StreamConfig, make_train_iterator  # noqa: E402
from mamba2_jax.data.builtin import builtin_files  # noqa: E402
from mamba2_jax.data.prepare import prepare  # noqa: E402
from mamba2_jax.data.tokenizers import neox_tokenizer_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_prepare(tokenizer, workers, tmp):
  out = os.path.join(tmp, f"prep-{os.path.basename(str(tokenizer))}-{workers}")
  t0 = time.perf_counter()
  m = prepare(
    ["builtin:shakespeare"],
    tokenizer,
    out,
    workers=workers,
    shard_bytes=1 << 20,
    show_progress=False,
    log=lambda *a: None,
  )
  dt = time.perf_counter() - t0
  return out, {
    "tokenizer": m["tokenizer"]["name"],
    "workers": workers,
    "seconds": dt,
    "MB": m["source_bytes"] / 1e6,
    "MB_per_s": m["source_bytes"] / 1e6 / dt,
    "tokens": m["num_tokens"],
    "tokens_per_s": m["num_tokens"] / dt,
    "shards": len(m["shards"]),
  }


def bench_stream(source, seq_len, batch, n, workers):
  cfg = StreamConfig(
    source=source,
    seq_len=seq_len,
    batch_size=batch,
    seed=0,
    packing="segments",
    num_workers=workers,
  )
  t0 = time.perf_counter()
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  next(it)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(n):
    b = next(it)
  dt = time.perf_counter() - t0
  it.close()
  assert b["tokens"].shape == (batch, seq_len)
  return {
    "workers": workers,
    "first_batch_s": first,
    "batches": n,
    "tokens_per_s": n * batch * seq_len / dt,
    "ms_per_batch": dt / n * 1e3,
  }


def bench_step(seq_len, batch, reps=5):
  cfg = Mamba2Config.preset("tiny")
  model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss_fn(params, tokens, segment_ids):
    m = nnx.merge(graphdef, params)
    logits = m(tokens[:, :-1], segment_ids=segment_ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  step = jax.jit(jax.value_and_grad(loss_fn))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (batch, seq_len)), jnp.int32)
  segs = jnp.ones((batch, seq_len), jnp.int32)
  t0 = time.perf_counter()
  jax.block_until_ready(step(params, tokens, segs))
  compile_s = time.perf_counter() - t0
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, tokens, segs))
    ts.append(time.perf_counter() - t0)
  s = statistics.median(ts)
  return {
    "model": "tiny",
    "params": cfg.num_params(),
    "step_s": s,
    "compile_s": compile_s,
    "tokens_per_s": batch * seq_len / s,
    "backend": jax.default_backend(),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seq_len", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--batches", type=int, default=200)
  ap.add_argument("--tokenizers", default="byte,neox")
  ap.add_argument("--workers", default="0,2", help="stream worker counts")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/data_pipeline.json"))
  args = ap.parse_args()
  builtin_files("shakespeare")  # fetch outside the timings
  res = {
    "machine": {
      "platform": platform.platform(),
      "cpus": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "loadavg_at_start": os.getloadavg(),
    },
    "seq_len": args.seq_len,
    "batch": args.batch,
    "prepare": [],
    "stream": [],
    "skipped": [],
  }
  with tempfile.TemporaryDirectory() as tmp:
    byte_dir = None
    for tok in args.tokenizers.split(","):
      spec = tok
      if tok == "neox":
        if not neox_tokenizer_path().exists():
          res["skipped"].append("prepare neox: no tokenizer file (scripts/get_neox_tokenizer.sh)")
          continue
      for w in (1, 2):
        out, r = bench_prepare(spec, w, tmp)
        res["prepare"].append(r)
        if tok == "byte" and byte_dir is None:
          byte_dir = out
    if byte_dir is None:
      byte_dir, _ = bench_prepare("byte", 1, tmp)
    for w in (int(x) for x in args.workers.split(",")):
      res["stream"].append(bench_stream(byte_dir, args.seq_len, args.batch, args.batches, w))
  res["step"] = bench_step(args.seq_len, args.batch)
  step_tps = res["step"]["tokens_per_s"]
  for s in res["stream"]:
    s["headroom_vs_step"] = s["tokens_per_s"] / step_tps

  print(
    f"\ndata pipeline on builtin:shakespeare ({res['machine']['cpus']} CPUs, "
    f"{res['step']['backend']}, load average at start "
    f"{res['machine']['loadavg_at_start'][0]:.1f}); seq_len {args.seq_len}, "
    f"per-host batch {args.batch}"
  )
  print(f"{'what':44s} {'rate':>22s}")
  for r in res["prepare"]:
    what = f"prepare, {r['tokenizer']}, {r['workers']} worker(s)"
    print(f"{what:44s} {r['MB_per_s']:9.2f} MB/s {r['tokens_per_s'] / 1e6:6.2f} Mtok/s")
  if any(r["workers"] > 1 for r in res["prepare"]):
    print(
      "  (2 workers: the time includes spawning the worker processes, which import jax via\n"
      "   mamba2_jax/__init__; on a 5 MB corpus that start-up dominates)"
    )
  for s in res["stream"]:
    what = f"stream (segments), {s['workers']} mp workers"
    print(
      f"{what:44s} {s['tokens_per_s'] / 1e6:9.2f} Mtok/s  (x{s['headroom_vs_step']:.0f} the step)"
    )
  st = res["step"]
  what = f"tiny model fwd+bwd step ({st['params']:,} params)"
  print(f"{what:44s} {st['tokens_per_s'] / 1e6:9.3f} Mtok/s  ({st['step_s'] * 1e3:.0f} ms/step)")
  for s in res["skipped"]:
    print("skipped:", s)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
