r"""State capacity: training length x state size -> T_forget, T_recall and the paper's fits.

  python -m experiments.sweep --config=configs/sweeps/state_capacity.py:<variant> --workdir=DIR
  python -m experiments.report --sweep=DIR

Variants:
  copy   CPU, about 40 minutes (README: measured results): the synthetic copy task (mamba2_jax/data/synthetic.py) with k pairs
         of 32 tokens per training sequence (T = 64k) x d_state. A model has to learn to forget
         only when its state cannot hold the k pairs it is trained on, so the smallest k that
         avoids collapse (T_forget) should grow with the state size N_S.
  text   CPU, about an hour: byte-level models on the built-in corpus (builtin:shakespeare),
         T x d_state, evaluated on held-out-style document streams and newlines to 16K.
  ci     2 runs x 3 steps: the machinery end to end (tests/e2e/test_sweep_e2e.py).
  paper  The paper's grid (§5, Table 2) for an accelerator cluster: the six model sizes (the
         36.4M/47.0M/84.6M from scratch; 130M/370M/780M continued from the official
         checkpoints via init_checkpoint) x T_train in 512 .. 64K, on RedPajama documents of
         >= 4K NeoX tokens, 0.5M tokens per step; each run evaluated on 1M-token newline prompts
         (the forgetting test) and passkey up to 256K. Emit one command per run:
           python -m experiments.sweep --workdir=gs://BUCKET/sc --launcher=print \
               --config=configs/sweeps/state_capacity.py:paper,data=gs://B/redpj,ckpts=gs://B/conv
         data= a prepared NeoX directory (experiments.prepare_data), ckpts= a directory holding
         experiments.convert_hf outputs named mamba2-130m, mamba2-370m, mamba2-780m. Or run it
         on a Ray cluster of TPU VMs, one TPU slice per run (docs/sweeps.md):
           python -m experiments.sweep --workdir=/shared/sc --launcher=ray --ray_address=auto \
               --config=configs/sweeps/state_capacity.py:paper,data=...,ckpts=...,slice=v5e:4x4
         slice= VERSION:TOPOLOGY of the multi-host slice each run trains on (its evaluations
         then run on one TPU chip each).

`resources` (the ray launcher's per-run resources, docs/sweeps.md): one CPU per run on CPU.
"""

import ml_collections

PAPER_DATA = "gs://BUCKET/redpajama_v2_neox_min4k"  # default of paper,data=...
PAPER_CKPTS = "gs://BUCKET/converted"  # default of paper,ckpts=...


def _copy():
  c = ml_collections.ConfigDict()
  c.train_config = "configs/train.py:small"
  c.train_overrides = (
    ("model.vocab_size", 64),
    ("data.tokenizer", "synthetic"),
    ("data.add_eos", False),
    ("total_steps", 3000),
    ("checkpoint_every", 3000),
    ("log_every", 300),
    ("optimizer.schedule", "cosine"),
    ("optimizer.lr", 3e-3),
    ("optimizer.warmup_steps", 100),
  )
  src = "synthetic:copy:vocab=64,span=32,pairs={}"
  c.grid = (
    ("model.d_state", (16, 64, 128)),
    (("seq_len", "data.source"), tuple((64 * k, src.format(k)) for k in (1, 2, 4))),
  )
  c.tokens_per_step = 4096
  copy = (("max_len", 8192), ("num_prompts", 8), ("batch_size", 8), ("chunk_len", 4096))
  c.evals = ml_collections.ConfigDict({"copy": {"task": "copy_task", "overrides": copy}})
  c.collapse_eval, c.recall_eval = "copy", ""
  c.resources = ml_collections.ConfigDict({"cpus": 1})
  c.learned_max_loss = 1.5  # copied-half loss within T (chance: ln 62 = 4.13)
  return c


def _text():
  c = ml_collections.ConfigDict()
  c.train_config = "configs/train.py:small"
  c.train_overrides = (
    ("total_steps", 1000),
    ("checkpoint_every", 1000),
    ("log_every", 100),
    ("optimizer.schedule", "cosine"),
    ("optimizer.warmup_steps", 100),
  )
  c.grid = (("model.d_state", (16, 128)), ("seq_len", (64, 256, 1024)))
  c.tokens_per_step = 8192
  # 32-token buckets (the first dropped): the shortest T = 64 keeps one reference bucket
  ppl = (
    ("prompt", "docs"),
    ("data", "builtin:shakespeare"),
    ("min_doc_len", 16384),
    ("num_prompts", 8),
    ("max_len", 16384),
    ("bucket_size", 32),
    ("chunk_len", 4096),
    ("ppl_ymax", 0.0),
  )
  c.evals = ml_collections.ConfigDict(
    {
      "ppl": {"task": "ppl_by_position", "overrides": ppl},
      "newlines": {
        "task": "ppl_by_position",
        "overrides": (("max_len", 16384), ("bucket_size", 32)),
      },
      "states": {"task": "state_stats", "overrides": (("max_len", 16384), ("stat_chunk", 32))},
    }
  )
  c.collapse_eval, c.recall_eval = "ppl", ""
  c.resources = ml_collections.ConfigDict({"cpus": 1})
  return c


def _ci():
  c = ml_collections.ConfigDict()
  c.train_config = "configs/train.py:tiny"
  c.train_overrides = (
    ("total_steps", 3),
    ("checkpoint_every", 3),
    ("log_every", 1),
    ("model.d_model", 32),
    ("model.chunk_size", 16),
  )
  c.grid = (("model.d_state", (8, 16)), ("seq_len", (32,)))
  c.tokens_per_step = 128
  c.evals = ml_collections.ConfigDict(
    {
      "ppl": {
        "task": "ppl_by_position",
        "max_len_factor": 8,
        "overrides": (("bucket_size", 16), ("chunk_len", 128)),
      },
      "passkey": {
        "task": "passkey",
        "overrides": (("lengths", (256, 512)), ("num_samples", 2), ("batch_size", 2)),
      },
    }
  )
  c.collapse_eval, c.recall_eval = "ppl", "passkey"
  c.resources = ml_collections.ConfigDict({"cpus": 1})  # two at once on a 2-core machine
  return c


_PAPER_MODELS = {  # name: (model overrides, init checkpoint or "")
  "36.4m": ((("model.d_model", 512), ("model.n_layer", 6)), ""),
  "47.0m": ((("model.d_model", 512), ("model.n_layer", 12)), ""),
  "84.6m": ((("model.d_model", 768), ("model.n_layer", 12)), ""),
  "130m": ((("model.d_model", 768), ("model.n_layer", 24)), "mamba2-130m"),
  "370m": ((("model.d_model", 1024), ("model.n_layer", 48)), "mamba2-370m"),
  "780m": ((("model.d_model", 1536), ("model.n_layer", 48)), "mamba2-780m"),
}


def _paper(data=PAPER_DATA, ckpts=PAPER_CKPTS, slice=""):  # noqa: A002
  c = ml_collections.ConfigDict()
  c.train_config = "configs/train.py:130m"
  c.train_overrides = (("data.source", data), ("total_steps", 100_000))
  keys = ("model.d_model", "model.n_layer", "init_checkpoint")
  models = tuple(
    (*(v for _, v in over), f"{ckpts}/{ck}" if ck else "") for over, ck in _PAPER_MODELS.values()
  )
  # T_train as chained 8K segments with state passing beyond 8K (the paper's T8192_P{2,4,8})
  lengths = ((512, 1), (1024, 1), (2048, 1), (4096, 1), (8192, 1), (8192, 2), (8192, 4), (8192, 8))
  c.grid = ((keys, models, tuple(_PAPER_MODELS)), (("seq_len", "tbptt_segments"), lengths))
  c.tokens_per_step = 524288
  c.evals = ml_collections.ConfigDict(
    {
      # 256-token buckets: with the first dropped, T = 512 keeps one reference bucket
      "newlines": {
        "task": "ppl_by_position",
        "overrides": (("max_len", 1 << 20), ("bucket_size", 256)),
      },
      "passkey": {"task": "passkey", "overrides": (("max_len", 1 << 18),)},
      "states": {"task": "state_stats", "overrides": ()},
    }
  )
  c.collapse_eval, c.recall_eval = "newlines", "passkey"
  res = {"tpu_slice": slice, "eval": {"cpus": 1, "TPU": 1}} if slice else {"cpus": 1}
  c.resources = ml_collections.ConfigDict(res)
  return c


def get_config(arg: str = "copy") -> ml_collections.ConfigDict:
  """arg: a variant name, optionally with key=value options ("paper,data=...,ckpts=...")."""
  builders = {"copy": _copy, "text": _text, "ci": _ci, "paper": _paper}
  name, *opts = (arg or "copy").split(",")
  if name not in builders:
    raise ValueError(
      f"configs/sweeps/state_capacity.py: unknown variant {name!r}; allowed: {sorted(builders)}"
    )
  kw = dict(o.split("=", 1) for o in opts)
  allowed = {"paper": {"data", "ckpts", "slice"}}.get(name, set())
  if set(kw) - allowed:
    raise ValueError(
      f"configs/sweeps/state_capacity.py:{name}: unknown options "
      f"{sorted(set(kw) - allowed)}; allowed: {sorted(allowed)}"
    )
  c = builders[name](**kw)
  c.name = f"state_capacity-{name}"
  return c
