"""Tokenize raw inputs once into ArrayRecord shards + a manifest (resumable, multi-process).

Layout of OUT:
  prepare_state.json                 settings + the shard plan, written first (resume key)
  shards/shard-NNNNN.array_record    one record per document (group_size:1: fast random access)
  shards/shard-NNNNN.lengths.npy     tokens per document (int64)
  shards/shard-NNNNN.json            per-shard stats; written last, it marks the shard done
  manifest.json                      written when every shard is done (readers require it)

Work is split into units of consecutive input files (a file larger than `shard_bytes` is a unit
of its own); each unit becomes one shard, written under a temporary name and renamed, so an
interrupted run resumes at the first unfinished unit. The settings bind OUT once a shard is
finished: before that, a rerun with other settings starts again; after it, other settings are
refused (pass overwrite=True / --overwrite), but for `on_error` where the finished shards are the
same under both (`_check_resumable`). Workers (spawned processes) take whole
units; HF tokenizers also encode each batch on all cores.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue as queue_lib
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mamba2_jax.data import documents as docs_lib
from mamba2_jax.data import sources as sources_lib
from mamba2_jax.data.tokenizers import get_tokenizer
from mamba2_jax.errors import InvalidInput

DEFAULT_SHARD_BYTES = 256 << 20


def plan_units(files: Sequence[sources_lib.InputFile], shard_bytes: int) -> list[list[int]]:
  units, cur, cur_bytes = [], [], 0
  for i, f in enumerate(files):
    if cur and cur_bytes + f.size > shard_bytes:
      units.append(cur)
      cur, cur_bytes = [], 0
    cur.append(i)
    cur_bytes += f.size
  if cur:
    units.append(cur)
  return units


def _shard_name(i: int) -> str:
  return f"shard-{i:05d}"


def _write_json_atomic(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
  os.replace(tmp, path)


def length_histogram(lengths: np.ndarray) -> list[dict]:
  """Power-of-two bins [0,1), [1,2), [2,4), ...: documents and tokens per bin."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size == 0:
    return []
  top = int(lengths.max())
  edges = [0, 1]
  while edges[-1] <= top:
    edges.append(edges[-1] * 2)
  idx = np.searchsorted(np.asarray(edges), lengths, side="right") - 1
  out = []
  for b in range(len(edges) - 1):
    sel = idx == b
    if sel.any():
      out.append(
        {
          "min": edges[b],
          "max_exclusive": edges[b + 1],
          "documents": int(sel.sum()),
          "tokens": int(lengths[sel].sum()),
        }
      )
  return out


# ------------------------------------------------------------------------------------------------
# One unit (runs in a worker process or in-process)
_PROGRESS_QUEUE = None


def _init_worker(q, threads) -> None:
  global _PROGRESS_QUEUE
  _PROGRESS_QUEUE = q
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool
  # HF tokenizers encode batches on a rayon pool: share the cores among the workers.
  os.environ.setdefault("RAYON_NUM_THREADS", str(threads))


def run_unit(task: dict, progress=None) -> dict:
  """Tokenizes the files of one unit into its shard; returns (and writes) the shard stats."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter

  if progress is None and _PROGRESS_QUEUE is not None:
    progress = _PROGRESS_QUEUE.put
  shard_dir = Path(task["out"]) / docs_lib.SHARD_DIR
  name = _shard_name(task["unit"])
  files = [sources_lib.InputFile(**f) for f in task["files"]]
  dtype = np.dtype(task["dtype"])
  tok = get_tokenizer(task["tokenizer"])
  bad = sources_lib.BadInput(task["on_error"])
  counts = docs_lib.DocCounts()
  tmp = shard_dir / f"{name}.array_record.tmp"
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  lengths = []
  last = [0, 0]

  def on_bytes(nbytes):
    if progress is not None:
      progress(("bytes", nbytes, counts.kept - last[0], counts.kept_tokens - last[1]))
      last[:] = [counts.kept, counts.kept_tokens]

  try:
    for ids, _ in docs_lib.tokenized_documents(
      files,
      tok,
      bad=bad,
      counts=counts,
      min_doc_tokens=task["min_doc_tokens"],
      subsets=docs_lib.parse_subsets(task["subset"]),
      max_docs=task["max_docs"],
      progress=on_bytes,
    ):
      if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids out of range for {dtype}")
      writer.write(ids.astype(dtype).tobytes())
      lengths.append(ids.size)
  finally:
    writer.close()
  os.replace(tmp, shard_dir / f"{name}.array_record")
  lengths_arr = np.asarray(lengths, np.int64)
  np.save(shard_dir / f"{name}.lengths.npy", lengths_arr)
  stats = {
    "unit": task["unit"],
    "file": f"{name}.array_record",
    "lengths_file": f"{name}.lengths.npy",
    "num_documents": int(lengths_arr.size),
    "num_tokens": int(lengths_arr.sum()),
    "counts": counts.to_dict(),
    "bad_input": bad.to_dict(),
    "sources": [f.path for f in files],
  }
  _write_json_atomic(shard_dir / f"{name}.json", stats)
  return stats


# ------------------------------------------------------------------------------------------------
def _settings(files, tok, min_doc_tokens, subset, max_docs, on_error, shard_bytes, ignored):
  return {
    "inputs": [f.to_dict() for f in files],
    "ignored_files": ignored,
    "tokenizer": tok.identity(),
    "min_doc_tokens": int(min_doc_tokens),
    "subset": sorted(docs_lib.parse_subsets(subset) or []) or None,
    "max_docs": max_docs,
    "on_error": on_error,
    "shard_bytes": int(shard_bytes),
    "dtype": docs_lib.token_dtype(tok.vocab_size).str,
  }


def _diff(a: dict, b: dict) -> list[str]:
  return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _check_resumable(out: Path, state: dict, settings: dict, log) -> None:
  """Settings bind OUT once a shard is finished. Before that an interrupted or failed run is
  started again with the new settings; after it, the settings must be the same but for on_error
  where the finished shards are what the new value gives too: shards finished under "fail" hold
  no bad input (the hint `--on_error=skip` after a failure resumes), shards finished under "skip"
  only if they skipped nothing. Raises InvalidInput otherwise."""
  shard_dir = out / docs_lib.SHARD_DIR
  done = [s for u in range(len(state["units"])) if (s := _shard_done(shard_dir, u)) is not None]
  old = state["settings"]
  if not done:
    if old != settings:
      log(f"{out}: no shard was finished; starting again with the new settings")
      shutil.rmtree(shard_dir, ignore_errors=True)
    return
  differ = _diff(old, settings)
  if differ == ["on_error"]:
    skipped = sum(s["bad_input"]["total"] for s in done)
    if old["on_error"] == "fail" or not skipped:
      return
  if differ:
    raise InvalidInput(
      f"{out}: {len(done)} shard(s) were prepared with other settings (differ: "
      f"{', '.join(differ)}); use the same settings to resume, another --out, or --overwrite "
      "to start again"
    )


def _shard_done(shard_dir: Path, unit: int) -> dict | None:
  name = _shard_name(unit)
  j, rec = shard_dir / f"{name}.json", shard_dir / f"{name}.array_record"
  if not (j.exists() and rec.exists() and (shard_dir / f"{name}.lengths.npy").exists()):
    return None
  try:
    return json.loads(j.read_text())
  except json.JSONDecodeError:
    return None


def prepare(
  inputs,
  tokenizer,
  out,
  *,
  min_doc_tokens: int = 0,
  subset=None,
  max_docs: int | None = None,
  workers: int = 1,
  on_error: str = "fail",
  shard_bytes: int = DEFAULT_SHARD_BYTES,
  overwrite: bool = False,
  show_progress: bool = True,
  log=print,
  tfds_data_dir: str | None = None,
  tfds_text_key: str | None = None,
) -> dict:
  """Prepares `inputs` into `out`; returns the manifest. Resumes an interrupted run. TFDS inputs
  (`tfds:NAME[/CONFIG][:VERSION]:SPLIT`) are read from `tfds_data_dir` (text: `tfds_text_key`)
  in chunks of about `shard_bytes`."""
  out = Path(os.path.expanduser(str(out)))
  tok = get_tokenizer(tokenizer)
  ignored: list[str] = []
  files = sources_lib.expand_inputs(
    inputs,
    ignored,
    tfds_data_dir=tfds_data_dir,
    tfds_text_key=tfds_text_key,
    tfds_chunk_bytes=shard_bytes,
  )
  settings = _settings(files, tok, min_doc_tokens, subset, max_docs, on_error, shard_bytes, ignored)
  units = plan_units(files, shard_bytes)
  state_path, manifest_path = out / docs_lib.STATE, out / docs_lib.MANIFEST
  if overwrite and out.exists():
    for p in (manifest_path, state_path):
      p.unlink(missing_ok=True)
    shutil.rmtree(out / docs_lib.SHARD_DIR, ignore_errors=True)
  if state_path.exists():
    if manifest_path.exists():
      old = json.loads(state_path.read_text())["settings"]
      if old != settings:
        raise InvalidInput(
          f"{out} was prepared with other settings (differ: {', '.join(_diff(old, settings))});"
          " use another --out, or --overwrite to start again"
        )
      log(f"{out}: already prepared ({manifest_path})")
      return json.loads(manifest_path.read_text())
    _check_resumable(out, json.loads(state_path.read_text()), settings, log)
  elif out.exists() and any(out.iterdir()):
    raise InvalidInput(f"{out} exists and is not a prepare_data directory; choose an empty --out")
  (out / docs_lib.SHARD_DIR).mkdir(parents=True, exist_ok=True)
  _write_json_atomic(
    state_path,
    {
      "format": docs_lib.FORMAT,
      "settings": settings,
      "tokenizer_spec": getattr(tok, "spec", str(tokenizer)),
      "units": units,
    },
  )
  shard_dir = out / docs_lib.SHARD_DIR
  done = {u: s for u in range(len(units)) if (s := _shard_done(shard_dir, u)) is not None}
  tasks = [
    {
      "out": str(out),
      "unit": u,
      "files": [dataclasses.asdict(files[i]) for i in units[u]],
      "tokenizer": getattr(tok, "spec", tok),
      "dtype": settings["dtype"],
      "min_doc_tokens": min_doc_tokens,
      "subset": subset,
      "max_docs": max_docs,
      "on_error": on_error,
    }
    for u in range(len(units))
    if u not in done
  ]
  total_bytes = sum(f.size for f in files)
  done_bytes = sum(files[i].size for u in done for i in units[u])
  if done:
    log(f"{out}: resuming, {len(done)} of {len(units)} shards already done")
  t0 = time.perf_counter()
  stats = dict(done)
  pbar = _progress_bar(total_bytes, done_bytes, show_progress)

  def on_progress(msg):
    _, nbytes, ndocs, ntoks = msg
    pbar.update(nbytes)
    pbar.docs += ndocs
    pbar.tokens += ntoks
    pbar.set_postfix_str(f"{pbar.docs:,} docs, {pbar.tokens:,} tokens", refresh=False)

  def reached_max():
    if max_docs is None:
      return False
    kept, u = 0, 0
    while u in stats:
      kept += stats[u]["num_documents"]
      if kept >= max_docs:
        return True
      u += 1
    return False

  try:
    if workers <= 1 or len(tasks) <= 1:
      for t in tasks:
        if reached_max():
          break
        stats[t["unit"]] = run_unit(t, progress=on_progress)
    else:
      ctx = multiprocessing.get_context("spawn")
      q = ctx.Queue()
      stop = threading.Event()

      def drain():
        while not stop.is_set():
          try:
            on_progress(q.get(timeout=0.2))
          except queue_lib.Empty:
            pass

      th = threading.Thread(target=drain, daemon=True)
      th.start()
      n = min(workers, len(tasks))
      threads = max(1, (os.cpu_count() or 1) // n)
      with ctx.Pool(n, initializer=_init_worker, initargs=(q, threads)) as pool:
        for s in pool.imap(run_unit, tasks):
          stats[s["unit"]] = s
          if reached_max():
            pool.terminate()
            break
      stop.set()
      th.join()
  except KeyboardInterrupt:
    pbar.close()
    log(
      f"\n{out}: interrupted with {sum(1 for u in stats if u < len(units))} of {len(units)} "
      "shards done; run the same command again to resume"
    )
    raise
  finally:
    pbar.close()
  manifest = _manifest(out, settings, tok, files, units, stats, max_docs, time.perf_counter() - t0)
  _write_json_atomic(manifest_path, manifest)
  return manifest


def _progress_bar(total, initial, enabled):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  bar = tqdm(
    total=total,
    initial=initial,
    unit="B",
    unit_scale=True,
    unit_divisor=1024,
    desc="prepare",
    disable=not enabled,
    dynamic_ncols=True,
  )
  bar.docs = bar.tokens = 0
  return bar


def _manifest(out, settings, tok, files, units, stats, max_docs, seconds) -> dict:
  shards, lengths = [], []
  counts = docs_lib.DocCounts()
  bad = sources_lib.BadInput(settings["on_error"])
  kept = 0
  for u in range(len(units)):
    if u not in stats:  # only after max_docs was reached
      break
    s = dict(stats[u])
    ln = np.load(Path(out) / docs_lib.SHARD_DIR / s["lengths_file"])
    if max_docs is not None and kept + s["num_documents"] > max_docs:
      s["num_documents"] = max_docs - kept
      ln = ln[: s["num_documents"]]
      s["num_tokens"] = int(ln.sum())
    kept += s["num_documents"]
    lengths.append(ln)
    counts.add(s["counts"])
    bad.merge(s["bad_input"])
    shards.append(
      {k: s[k] for k in ("file", "lengths_file", "num_documents", "num_tokens", "sources")}
    )
    if max_docs is not None and kept >= max_docs:
      counts.stopped_at_max_docs = counts.stopped_at_max_docs or u + 1 < len(units)
      break
  lengths = np.concatenate(lengths) if lengths else np.zeros((0,), np.int64)
  used = {p for s in shards for p in s["sources"]}
  return {
    "format": docs_lib.FORMAT,
    "tokenizer": tok.identity(),
    "tokenizer_spec": getattr(tok, "spec", None),
    "dtype": settings["dtype"],
    "num_documents": int(lengths.size),
    "num_tokens": int(lengths.sum()),
    "length_stats": (
      {
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
      }
      if lengths.size
      else {}
    ),
    "length_histogram": length_histogram(lengths),
    "filters": {
      "min_doc_tokens": settings["min_doc_tokens"],
      "subset": settings["subset"],
      "max_docs": settings["max_docs"],
    },
    "counts": counts.to_dict(),
    "bad_input": bad.to_dict(),
    "sources": [f.to_dict() | {"used": f.path in used} for f in files],
    "source_bytes": int(sum(f.size for f in files)),
    "ignored_files": settings["ignored_files"],
    "shards": shards,
    "prepare_seconds_last_run": round(seconds, 3),
  }
