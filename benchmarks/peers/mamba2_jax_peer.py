"""Peer benchmark: the PyPI package `mamba2-jax` 1.1.2 (Flax NNX) on CPU.

Runs ONLY in .venv-peer-mamba2jax (Python 3.12; see benchmarks/peers/setup_peers.sh). It never imports
our package. Measures, for a random-init Mamba-2 LM (d_model 256, 4 layers, d_state 128, headdim 64,
expand 2 -> 8 heads, ngroups 1, d_conv 4, vocab 1024, tied embeddings, fp32, batch 1):

  * forward tokens/s      : jitted full-sequence forward returning the logits (B, L, V)
  * train-step tokens/s   : jitted jax.value_and_grad of the mean next-token cross-entropy w.r.t. all
                            parameters (forward + backward, NO optimizer update)
  * decode ms/token       : greedy one-token cached steps (the package's own cache path:
                            model(tok, cache=cache)) after a 128-token prefill, jitted per step

Each timing is the median of N repetitions after compilation + --warmup untimed calls; compile time
(lower + compile of the forward and the train step) is reported separately as compile_s.

Usage:
  .venv-peer-mamba2jax/bin/python benchmarks/peers/mamba2_jax_peer.py \
      --seq_lens 2048,8192 --out /tmp/peer_mamba2jax.json --reps 5 --chunk_size 256
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mamba2_jax
from mamba2_jax import Mamba2Config, Mamba2ForCausalLM

from peer_common import (
  contention_note,
  cpu_snapshot,
  median_time,
  others_cores,
  parse_args,
  wait_quiet,
)  # beside this file

PEER = "mamba2-jax (PyPI)"
D_MODEL, N_LAYER, D_STATE, HEADDIM, EXPAND, D_CONV, VOCAB = 256, 4, 128, 64, 2, 4, 1024


def build(chunk_size, seed):
  cfg = Mamba2Config(
    vocab_size=VOCAB,
    hidden_size=D_MODEL,
    num_hidden_layers=N_LAYER,
    state_size=D_STATE,
    head_dim=HEADDIM,
    expand=EXPAND,
    conv_kernel=D_CONV,
    chunk_size=chunk_size,
    tie_word_embeddings=True,
    # ngroups is not a config field: the package always uses one B/C group broadcast to all heads.
  )
  assert cfg.num_heads == 8, cfg.num_heads
  model = Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return cfg, graphdef, params, rest


def main(argv=None):
  args = parse_args(__doc__, argv, warmup=2)
  seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
  if args.wait_quiet > 0:
    wait_quiet(PEER, args.wait_quiet)
  cpu_start = cpu_snapshot()
  busy = others_cores(1.0)
  if busy is not None and busy > 0.15:
    print(
      f"[{PEER}] WARNING: other processes are using {busy:.2f} cores at start; the timings will be "
      "pessimistic (see --wait_quiet)",
      flush=True,
    )
  cfg, graphdef, params, rest = build(args.chunk_size, args.seed)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(params)})

  def logits_fn(params, ids):
    model = nnx.merge(graphdef, params, rest)
    return model(ids)["logits"]

  def loss_fn(params, ids):
    # The package's own loss: mean softmax CE of logits[:, :-1] against ids[:, 1:].
    model = nnx.merge(graphdef, params, rest)
    return model(ids, labels=ids)["loss"]

  fwd_jit = jax.jit(logits_fn)
  train_jit = jax.jit(jax.value_and_grad(loss_fn))

  rng = np.random.default_rng(args.seed)
  results, notes = [], []
  for L in seq_lens:
    reps = args.reps_long if L >= args.long_from else args.reps
    ids = jnp.asarray(rng.integers(0, VOCAB, size=(1, L)), dtype=jnp.int32)

    t0 = time.perf_counter()
    fwd_c = fwd_jit.lower(params, ids).compile()
    fwd_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_c = train_jit.lower(params, ids).compile()
    train_compile = time.perf_counter() - t0

    for _ in range(max(1, args.warmup)):
      fwd_c(params, ids).block_until_ready()
    t_fwd = median_time(lambda: fwd_c(params, ids).block_until_ready(), reps)
    for _ in range(max(1, args.warmup)):
      jax.block_until_ready(train_c(params, ids))
    t_train = median_time(lambda: jax.block_until_ready(train_c(params, ids)), reps)

    loss, grads = train_c(params, ids)
    gleaves = jax.tree_util.tree_leaves(grads)
    assert len(gleaves) == len(jax.tree_util.tree_leaves(params))
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in gleaves)

    r = {
      "seq_len": L,
      "forward_tokens_per_s": L / t_fwd,
      "train_step_tokens_per_s": L / t_train,
      "compile_s": fwd_compile + train_compile,
    }
    results.append(r)
    notes.append(
      f"seq_len {L}: reps={reps}, forward {t_fwd * 1e3:.1f} ms, train step {t_train * 1e3:.1f} ms, "
      f"compile forward {fwd_compile:.2f} s + train step {train_compile:.2f} s, loss {float(loss):.4f}"
    )
    print(
      f"[{PEER}] L={L}: fwd {r['forward_tokens_per_s']:.0f} tok/s, train {r['train_step_tokens_per_s']:.0f} "
      f"tok/s, compile {r['compile_s']:.1f} s",
      flush=True,
    )

  # ---- decode: 128-token prefill, then greedy one-token cached steps (the package's cache path) ----
  def prefill_fn(params, prompt):
    model = nnx.merge(graphdef, params, rest)
    out = model(prompt)
    nxt = jnp.argmax(out["logits"][:, -1, :], axis=-1).astype(jnp.int32)[:, None]
    return nxt, out["cache"]

  def step_fn(params, tok, cache):
    model = nnx.merge(graphdef, params, rest)
    out = model(tok, cache=cache)
    nxt = jnp.argmax(out["logits"][:, -1, :], axis=-1).astype(jnp.int32)[:, None]
    return nxt, out["cache"], out["logits"][:, -1, :]

  prefill_jit = jax.jit(prefill_fn)
  step_jit = jax.jit(step_fn)
  prompt = jnp.asarray(rng.integers(0, VOCAB, size=(1, args.prefill_len)), dtype=jnp.int32)

  t0 = time.perf_counter()
  tok0, cache0 = jax.block_until_ready(prefill_jit(params, prompt))
  prefill_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(step_jit(params, tok0, cache0))
  step_compile = time.perf_counter() - t0

  def decode_steps(tok, cache, keep_logits=False):
    toks, logits = [tok], []
    for _ in range(args.decode_steps):
      tok, cache, lg = step_jit(params, tok, cache)
      toks.append(tok)
      if keep_logits:
        logits.append(lg)
    jax.block_until_ready(tok)
    return toks, logits

  def timed_decode():
    tok, cache = jax.block_until_ready(prefill_jit(params, prompt))  # prefill is not timed
    t0 = time.perf_counter()
    decode_steps(tok, cache)
    return time.perf_counter() - t0

  for _ in range(max(1, args.warmup)):
    timed_decode()
  t_loop = statistics.median(timed_decode() for _ in range(args.decode_reps))
  decode_ms = t_loop / args.decode_steps * 1e3

  # Correctness check of the cached path: last-position logits of each step vs a full forward.
  toks, step_logits = decode_steps(*prefill_jit(params, prompt), keep_logits=True)
  full_ids = jnp.concatenate([prompt] + toks[:-1], axis=1)
  full_logits = jax.jit(logits_fn)(params, full_ids)
  ref = full_logits[0, args.prefill_len :, :]
  got = jnp.concatenate(step_logits, axis=0)
  decode_err = float(jnp.max(jnp.abs(ref - got)))
  print(
    f"[{PEER}] decode {decode_ms:.2f} ms/token (max |cached - full| logits {decode_err:.2e})",
    flush=True,
  )

  notes += [
    "train step = forward + backward (jax.value_and_grad of the mean next-token cross-entropy w.r.t. all "
    "parameters); NO optimizer update",
    f"model: mamba2_jax.Mamba2ForCausalLM, random init (nnx.Rngs({args.seed})), {n_params} params, "
    f"dtypes {dtypes}, d_model {D_MODEL}, n_layer {N_LAYER}, d_state {D_STATE}, headdim {HEADDIM}, "
    f"expand {EXPAND} ({cfg.num_heads} heads), ngroups 1 (hard-wired in the package), d_conv {D_CONV}, "
    f"chunk_size {args.chunk_size}, vocab {VOCAB}, tied embeddings, batch 1",
    f"timings: median of the reps after compile + {args.warmup} warm-up calls; block_until_ready; compile_s = lower+compile of "
    "the forward and of the train step (jax.jit .lower().compile())",
    f"decode: jitted prefill of {args.prefill_len} tokens, then {args.decode_steps} greedy steps of "
    "jit(model(tok, cache=cache) + argmax); ms/token = time of the steps (prefill excluded, block_until_ready at "
    f"the end) / steps, median of {args.decode_reps} loops; first prefill call (compile) {prefill_first:.2f} s, first step call "
    f"(compile) {step_compile:.2f} s",
    "decode quirk: with a cache the package routes even a 1-token step through its chunked SSD "
    f"(ssd_forward with initial_states), zero-padding the token to a full chunk of {args.chunk_size}; "
    "so the per-token cost grows with chunk_size (there is no recurrent single-step path)",
    f"decode correctness: max |cached step logits - full-forward logits| = {decode_err:.3e} over "
    f"{args.decode_steps} steps",
    f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}",
  ]

  notes.append(contention_note(cpu_start))
  print(f"[{PEER}] {notes[-1]}", flush=True)

  out = {
    "peer": PEER,
    "version": mamba2_jax.__version__,
    "python": platform.python_version(),
    "threads": os.cpu_count(),
    "results": results,
    "decode_ms_per_token": decode_ms,
    "notes": notes,
  }

  print(
    f"\n{PEER} {mamba2_jax.__version__} | python {out['python']} | jax {jax.__version__} | "
    f"threads {out['threads']} | chunk_size {args.chunk_size}"
  )
  print(f"{'seq_len':>8} {'fwd tok/s':>12} {'train tok/s':>12} {'compile s':>10}")
  for r in results:
    print(
      f"{r['seq_len']:>8} {r['forward_tokens_per_s']:>12.0f} {r['train_step_tokens_per_s']:>12.0f} "
      f"{r['compile_s']:>10.1f}"
    )
  print(
    f"decode: {decode_ms:.2f} ms/token (prefill {args.prefill_len}, {args.decode_steps} greedy steps)"
  )
  print("train step = forward + backward, no optimizer update")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
