"""What both peer runners share (stdlib only: each runs in its own venv, beside this file).

CLI flags, median timing, and the CPU-contention bookkeeping that tells whether other processes
disturbed a run on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse_args(doc, argv=None, warmup=3):
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq_lens", default="2048,8192", help="comma-separated sequence lengths")
  p.add_argument("--out", default=None, help="path of the JSON result file")
  p.add_argument("--reps", type=int, default=5, help="timed repetitions per metric")
  p.add_argument(
    "--reps_long",
    type=int,
    default=3,
    help="timed repetitions for seq_len >= --long_from (keeps the run under ~10 min)",
  )
  p.add_argument("--long_from", type=int, default=8192)
  p.add_argument("--chunk_size", type=int, default=256)
  p.add_argument("--prefill_len", type=int, default=128)
  p.add_argument("--decode_steps", type=int, default=64)
  p.add_argument(
    "--decode_reps", type=int, default=5, help="timed repetitions of the whole decode loop"
  )
  p.add_argument(
    "--warmup", type=int, default=warmup, help="untimed calls before timing each metric"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--wait_quiet",
    type=float,
    default=0.0,
    help="wait up to this many seconds for other processes to leave the CPU idle before starting",
  )
  return p.parse_args(argv)


def cpu_snapshot():
  """(machine busy CPU seconds from /proc/stat, this process's CPU seconds, wall time); busy is None off Linux."""
  busy = None
  try:
    with open("/proc/stat") as f:
      vals = [int(v) for v in f.readline().split()[1:9]]
    busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle + iowait
  except (OSError, ValueError):
    pass
  t = os.times()
  return busy, t.user + t.system, time.perf_counter()


def contention_note(start):
  """How much CPU other processes used while we ran: the main source of noise on a shared 2-core box."""
  end = cpu_snapshot()
  if start[0] is None or end[0] is None:
    return "other processes' CPU use: unknown (no /proc/stat)"
  wall = end[2] - start[2]
  others = max(0.0, (end[0] - start[0]) - (end[1] - start[1]))
  return (
    f"other processes used {others:.1f} CPU-s during this {wall:.0f} s run (avg {others / wall:.2f} of "
    f"{os.cpu_count()} cores); anything above ~0.1 cores means the timings are pessimistic"
  )


def others_cores(window_s):
  """Average number of cores used by other processes over the next window_s seconds (None off Linux)."""
  start = cpu_snapshot()
  time.sleep(window_s)
  end = cpu_snapshot()
  if start[0] is None or end[0] is None:
    return None
  return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2])


def wait_quiet(label, max_wait_s, window_s=5.0, max_cores=0.15):
  """Wait (up to max_wait_s) until other processes use < max_cores over a window_s window; True if quiet."""
  deadline = time.perf_counter() + max_wait_s
  while True:
    used = others_cores(window_s)
    if used is None:
      return False
    if used < max_cores:
      return True
    if time.perf_counter() > deadline:
      print(
        f"[{label}] machine still busy ({used:.2f} cores used by others); starting anyway",
        flush=True,
      )
      return False


def median_time(fn, reps):
  """Median wall time of fn() over reps calls; fn must block until its result is ready."""
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)
