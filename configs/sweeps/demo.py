r"""The main demo: state collapse and its mitigations on a CPU in minutes.

  python -m experiments.sweep --config=configs/sweeps/demo.py --workdir=runs/demo
  python -m experiments.report --sweep=runs/demo        # -> runs/demo/report/report.md
  (README command 1, scripts/demo.sh, runs both.)

Two small Mamba-2 models (2 layers x 128, d_state 128, 8 heads x 32; 0.4M parameters) trained
on the synthetic copy task (mamba2_jax/data/synthetic.py; docs/demo.md): pairs [S S] of
32 random tokens, the second half predictable from the first.
  T=64   one pair per training sequence: nothing in training ever needs forgetting
  T=256  four pairs per training sequence: the model must drop old pairs
Both see the same 4096 tokens per step for the same number of steps. Each is evaluated on
8K-token streams of fresh pairs (copied-half loss and accuracy by position, the forgetting
test), with the state statistics (per-head state norms and retention) behind it, and with the
training-free mitigations (RRI, sliding window, state normalization) applied.
Variants: `:quick` (CI-sized: a few steps), `:full` (the same experiment with longer training
and eval streams, for an accelerator).
"""

import ml_collections

_COPY = "synthetic:copy:vocab=64,span=32,pairs={}"


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  steps = {"cpu": 3000, "quick": 4, "full": 12000}
  if arg not in steps:
    raise ValueError(f"configs/sweeps/demo.py: unknown variant {arg!r}; allowed: {sorted(steps)}")
  c = ml_collections.ConfigDict()
  c.name = f"demo-{arg}"
  c.train_config = "configs/train.py:small"
  c.train_overrides = (
    ("model.vocab_size", 64),
    ("data.tokenizer", "synthetic"),
    ("data.add_eos", False),
    ("total_steps", steps[arg]),
    ("checkpoint_every", steps[arg]),
    ("log_every", max(1, steps[arg] // 10)),
    ("optimizer.schedule", "cosine"),
    ("optimizer.lr", 3e-3),
    ("optimizer.warmup_steps", min(100, steps[arg])),
  )
  c.grid = ((("seq_len", "data.source"), ((64, _COPY.format(1)), (256, _COPY.format(4)))),)
  c.tokens_per_step = 4096
  eval_len = {"cpu": 8192, "quick": 512, "full": 65536}[arg]
  prompts = 2 if arg == "quick" else 8
  copy = (
    ("max_len", eval_len),
    ("num_prompts", prompts),
    ("batch_size", prompts),
    ("chunk_len", min(eval_len, 4096)),
  )
  c.evals = ml_collections.ConfigDict(
    {
      "copy": {"task": "copy_task", "overrides": copy},
      "copy_rri": {"task": "copy_task", "overrides": copy, "mitigation": "rri"},
      "copy_window": {"task": "copy_task", "overrides": copy, "mitigation": "ssd_window=64"},
      "copy_state_norm": {
        "task": "copy_task",
        "overrides": copy,
        "mitigation": "state_norm,state_norm_chunk=64,calibrate=1",
      },
      "states": {
        "task": "state_stats",
        "overrides": (
          ("prompt", "copy"),
          ("max_len", min(eval_len, 4096)),
          ("stat_chunk", 32),
          ("chunk_len", min(eval_len, 4096)),
          ("plot_layers", (0, 1)),
        ),
      },
    }
  )
  c.collapse_eval = "copy"
  c.recall_eval = ""
  c.learned_max_loss = 1.5  # copied-half loss within T (chance: ln 62 = 4.13)
  return c
