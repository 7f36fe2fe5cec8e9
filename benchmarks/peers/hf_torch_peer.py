"""Peer benchmark: HF transformers `Mamba2ForCausalLM` (PyTorch, CPU, pure-torch path) on CPU.

Runs ONLY in .venv-torch (Python 3.11, torch 2.13.0 CPU, transformers 5.23.0; see
benchmarks/peers/setup_peers.sh). It never imports our package. Measures, for a random-init Mamba-2 LM
(hidden_size 256, 4 layers, state_size 128, head_dim 64, expand 2 -> 8 heads, n_groups 1, conv_kernel 4,
vocab 1024, tied embeddings, fp32, batch 1):

  * forward tokens/s      : eager full-sequence forward returning the logits (B, L, V), torch.no_grad(),
                            use_cache=False, model.eval()
  * train-step tokens/s   : forward + loss.backward() of the model's own mean next-token cross-entropy
                            (labels=input_ids), gradients for all parameters, NO optimizer update
  * decode ms/token       : greedy one-token steps with the model's cache (prefill 128 tokens with
                            use_cache=True, then model(tok, cache_params=cache, use_cache=True)), no_grad

Without the optional CUDA packages (mamba_ssm / causal_conv1d / HF kernels), transformers uses its
pure-torch fallbacks: the chunked SSD scan for full sequences and a recurrent single-step update for
decode. Timings are medians of N repetitions after --warmup untimed calls (default 3: eager PyTorch on CPU
needs several calls before its allocator / oneDNN caches settle; no compilation, compile_s 0).

Usage:
  .venv-torch/bin/python benchmarks/peers/hf_torch_peer.py \
      --seq_lens 2048,8192 --out /tmp/peer_hf_torch.json --reps 5 --chunk_size 256
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import Mamba2Config, Mamba2ForCausalLM

from peer_common import (
  contention_note,
  cpu_snapshot,
  median_time,
  others_cores,
  parse_args,
  wait_quiet,
)  # beside this file

PEER = "hf-transformers-torch-cpu"
D_MODEL, N_LAYER, D_STATE, HEADDIM, EXPAND, D_CONV, VOCAB = 256, 4, 128, 64, 2, 4, 1024
THREADS = 2


def build(chunk_size, seed):
  torch.manual_seed(seed)
  cfg = Mamba2Config(
    vocab_size=VOCAB,
    hidden_size=D_MODEL,
    num_hidden_layers=N_LAYER,
    state_size=D_STATE,
    head_dim=HEADDIM,
    num_heads=EXPAND * D_MODEL // HEADDIM,
    expand=EXPAND,
    n_groups=1,
    conv_kernel=D_CONV,
    chunk_size=chunk_size,
    tie_word_embeddings=True,
  )
  model = Mamba2ForCausalLM(cfg).to(torch.float32)
  assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr(), (
    "embeddings not tied"
  )
  return cfg, model


def main(argv=None):
  args = parse_args(__doc__, argv, warmup=3)
  torch.set_num_threads(THREADS)
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
  cfg, model = build(args.chunk_size, args.seed)
  params = list(model.parameters())  # unique (tied weight counted once)
  n_params = sum(p.numel() for p in params)
  dtypes = sorted({str(p.dtype) for p in params})
  gen = torch.Generator().manual_seed(args.seed)

  results, notes = [], []
  for L in seq_lens:
    reps = args.reps_long if L >= args.long_from else args.reps
    ids = torch.randint(0, VOCAB, (1, L), generator=gen)

    model.eval()

    def fwd():
      with torch.no_grad():
        return model(ids, use_cache=False).logits

    for _ in range(max(1, args.warmup)):
      assert fwd().shape == (1, L, VOCAB)
    t_fwd = median_time(fwd, reps)

    model.train()  # HF: use_cache defaults to False in training; no dropout in Mamba2

    def train_step():
      model.zero_grad(set_to_none=True)
      loss = model(ids, labels=ids, use_cache=False).loss
      loss.backward()
      return loss

    for _ in range(max(1, args.warmup)):
      train_step()
    t_train = median_time(train_step, reps)
    loss = train_step().detach()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), (
      "missing/non-finite grads"
    )
    model.zero_grad(set_to_none=True)

    r = {
      "seq_len": L,
      "forward_tokens_per_s": L / t_fwd,
      "train_step_tokens_per_s": L / t_train,
      "compile_s": 0.0,
    }
    results.append(r)
    notes.append(
      f"seq_len {L}: reps={reps}, forward {t_fwd * 1e3:.1f} ms, train step {t_train * 1e3:.1f} ms, "
      f"loss {float(loss):.4f}"
    )
    print(
      f"[{PEER}] L={L}: fwd {r['forward_tokens_per_s']:.0f} tok/s, train {r['train_step_tokens_per_s']:.0f} "
      f"tok/s",
      flush=True,
    )

  # ---- decode: prefill with the cache, then greedy one-token cached steps ----
  model.eval()
  prompt = torch.randint(0, VOCAB, (1, args.prefill_len), generator=gen)

  @torch.no_grad()
  def prefill():
    out = model(prompt, use_cache=True)
    return out.logits[:, -1, :].argmax(-1, keepdim=True), out.cache_params

  @torch.no_grad()
  def decode_steps(tok, cache, keep_logits=False):
    toks, logits = [tok], []
    for _ in range(args.decode_steps):
      out = model(tok, cache_params=cache, use_cache=True)
      cache = out.cache_params
      lg = out.logits[:, -1, :]
      tok = lg.argmax(-1, keepdim=True)
      toks.append(tok)
      if keep_logits:
        logits.append(lg.clone())
    return toks, logits

  def timed_decode():
    tok, cache = prefill()  # fresh cache each repetition; prefill is not timed
    t0 = time.perf_counter()
    decode_steps(tok, cache)
    return time.perf_counter() - t0

  for _ in range(max(1, args.warmup)):
    timed_decode()
  t_loop = statistics.median(timed_decode() for _ in range(args.decode_reps))
  decode_ms = t_loop / args.decode_steps * 1e3

  # Correctness check of the cached path: each step's logits vs a full (uncached) forward.
  toks, step_logits = decode_steps(*prefill(), keep_logits=True)
  with torch.no_grad():
    full = model(torch.cat([prompt] + toks[:-1], dim=1), use_cache=False).logits[
      0, args.prefill_len :, :
    ]
  decode_err = float((full - torch.cat(step_logits, dim=0)).abs().max())
  print(
    f"[{PEER}] decode {decode_ms:.2f} ms/token (max |cached - full| logits {decode_err:.2e})",
    flush=True,
  )

  notes += [
    "train step = forward + loss.backward() of the model's mean next-token cross-entropy (labels=input_ids) "
    "w.r.t. all parameters; NO optimizer update (grads zeroed with set_to_none each step)",
    f"model: transformers.Mamba2ForCausalLM, random init (torch.manual_seed({args.seed})), {n_params} params, "
    f"dtypes {dtypes}, hidden_size {D_MODEL}, num_hidden_layers {N_LAYER}, state_size {D_STATE}, head_dim "
    f"{HEADDIM}, num_heads {cfg.num_heads}, expand {EXPAND}, n_groups 1, conv_kernel {D_CONV}, chunk_size "
    f"{args.chunk_size}, vocab {VOCAB}, tie_word_embeddings True, batch 1",
    f"eager PyTorch (no torch.compile): compile_s is 0; torch.set_num_threads({THREADS}); forward and decode "
    f"under torch.no_grad(); medians after {args.warmup} warm-up calls",
    "pure-torch fallbacks (no mamba_ssm / causal_conv1d / HF hub kernels on CPU): chunked SSD "
    "(mamba2_chunk_scan) for full sequences and prefill, recurrent selective_state_update for 1-token steps",
    f"decode: prefill {args.prefill_len} tokens with use_cache=True, then {args.decode_steps} greedy steps of "
    "model(tok, cache_params=cache, use_cache=True) (transformers 5.23 needs no cache_position here); "
    f"ms/token = time of the {args.decode_steps} steps (prefill excluded) / steps, median of {args.decode_reps} "
    "loops",
    f"decode correctness: max |cached step logits - full-forward logits| = {decode_err:.3e} over "
    f"{args.decode_steps} steps",
    f"torch {torch.__version__}, transformers {transformers.__version__}",
  ]

  notes.append(contention_note(cpu_start))
  print(f"[{PEER}] {notes[-1]}", flush=True)

  out = {
    "peer": PEER,
    "version": f"transformers {transformers.__version__} / torch {torch.__version__}",
    "python": platform.python_version(),
    "threads": torch.get_num_threads(),
    "results": results,
    "decode_ms_per_token": decode_ms,
    "notes": notes,
  }

  print(
    f"\n{PEER} | transformers {transformers.__version__} | torch {torch.__version__} | python "
    f"{out['python']} | threads {out['threads']} | chunk_size {args.chunk_size}"
  )
  print(f"{'seq_len':>8} {'fwd tok/s':>12} {'train tok/s':>12} {'compile s':>10}")
  for r in results:
    print(
      f"{r['seq_len']:>8} {r['forward_tokens_per_s']:>12.0f} {r['train_step_tokens_per_s']:>12.0f} "
      f"{'eager':>10}"
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
