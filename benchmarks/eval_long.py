r"""Long-context evaluation benchmark: streaming ppl_by_position, tokens/s and peak memory.

  .venv/bin/python benchmarks/eval_long.py [--tiny_lengths 65536,262144,1048576]
      [--max_len 131072] [--chunk_tiny 8192] [--chunk_130m 512] [--skip_130m]
      [--tune_malloc] [--out benchmarks/results/eval_long.json]

Runs `mamba2_jax.eval.run_ppl_by_position` (newlines prompt, batch 1, fp32) on
  * the `tiny` preset at each of --tiny_lengths (default 64K, 256K, 1M tokens), and
  * a randomly initialised 130m-shaped model (`Mamba2Config.preset("mamba2-130m")`, vocab 50277)
    at --max_len tokens (default 128K).
Every model is warmed up first (all piece shapes compiled), so tokens/s is the streaming rate.
Memory: the process RSS is sampled every 20 ms from /proc/self/statm during each run; the
table shows the peak of each run and its increase over the RSS before it (runs go from short to
long in one process, so a flat peak shows memory does not grow with the length). Besides the
O(1) device working set, the eval holds the prompt batch on the host (int32, 4 bytes per token
per row; 4 MiB at 1M) and per-bucket loss sums. glibc is left at its defaults unless
--tune_malloc (mamba2_jax.runtime.tune_cpu_malloc: faster, but freed memory then stays in the
RSS, which blurs the measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba2_jax.runtime import tune_cpu_malloc  # noqa: E402  (imports no numpy / jax)

# opt-in here (it blurs the RSS measurement); before numpy and jax start threads
_MALLOC_TUNED = "--tune_malloc" in sys.argv and tune_cpu_malloc()

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from mamba2_jax import Mamba2Config, Mamba2LM  # noqa: E402
from configs.evaluate import get_config  # noqa: E402
from mamba2_jax.eval import run_ppl_by_position  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * PAGE


class PeakRSS:
  """Samples the RSS in a thread while active; `.peak` is the maximum seen (bytes)."""

  def __init__(self, interval: float = 0.02):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()

  def __enter__(self):
    self.start = self.peak = rss_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(self.interval)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def run(model, length: int, chunk: int, out_dir: str) -> dict:
  cfg = get_config("ppl_by_position")
  with cfg.unlocked():
    cfg.update(
      prompt="newlines",
      max_len=length,
      chunk_len=chunk,
      batch_size=1,
      bucket_size=512,
      progress=False,
    )
  with PeakRSS() as mem:
    res = run_ppl_by_position(model, "byte", cfg, out_dir, train_len=8192)
  return {
    "tokens": length,
    "chunk_len": chunk,
    "seconds": res["seconds"],
    "tokens_per_s": res["summary"]["tokens_per_s"],
    "rss_before_mib": mem.start / 2**20,
    "peak_rss_mib": mem.peak / 2**20,
    "peak_increase_mib": (mem.peak - mem.start) / 2**20,
    "mean_loss": res["summary"]["mean_loss"],
  }


def bench_model(name, cfg, lengths, chunk, tmp) -> list[dict]:
  model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
  t0 = time.perf_counter()
  run(model, 2 * chunk, chunk, os.path.join(tmp, f"{name}_warmup"))  # compile every shape
  compile_s = time.perf_counter() - t0
  rows = []
  for length in lengths:
    row = {
      "model": name,
      "params": cfg.num_params(),
      "warmup_s": compile_s,
      **run(model, length, chunk, os.path.join(tmp, f"{name}_{length}")),
    }
    print(
      f"{name:10s} {length:>9,d} tok  chunk {chunk:5d}  {row['tokens_per_s']:9.0f} tok/s  "
      f"{row['seconds']:7.1f} s  peak RSS {row['peak_rss_mib']:7.0f} MiB "
      f"(+{row['peak_increase_mib']:.0f})",
      flush=True,
    )
    rows.append(row)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny_lengths", default="65536,262144,1048576")
  p.add_argument("--max_len", type=int, default=131072, help="tokens for the 130m model")
  p.add_argument("--chunk_tiny", type=int, default=8192)
  p.add_argument("--chunk_130m", type=int, default=512)
  p.add_argument("--skip_130m", action="store_true")
  p.add_argument("--tune_malloc", action="store_true")
  p.add_argument("--out", default="benchmarks/results/eval_long.json")
  args = p.parse_args()
  load = os.getloadavg()
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
    f"load average {load[0]:.1f}"
  )
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    rows += bench_model(
      "tiny",
      Mamba2Config.preset("tiny"),
      [int(x) for x in args.tiny_lengths.split(",")],
      args.chunk_tiny,
      tmp,
    )
    if not args.skip_130m:
      rows += bench_model(
        "130m-rand", Mamba2Config.preset("mamba2-130m"), [args.max_len], args.chunk_130m, tmp
      )
  result = {
    "benchmark": "eval_long",
    "task": "ppl_by_position (newlines, batch 1, fp32)",
    "jax": jax.__version__,
    "platform": platform.platform(),
    "cpus": os.cpu_count(),
    "load_average_at_start": load,
    "tune_malloc": args.tune_malloc,
    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rows": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
