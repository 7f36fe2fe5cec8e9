r"""Language-model training configs: `--config=configs/train.py:<variant>`.

Variants (model preset, training length, batch):
  tiny    CPU: 2 layers x 64, byte vocab, the built-in corpus, seq 512, batch 8.
            python -m experiments.train --config=configs/train.py:tiny --workdir=runs/tiny
  small   CPU: 2 layers x 128, d_state 128 (the probes' model), seq 1024, batch 8.
            python -m experiments.train --config=configs/train.py:small --workdir=runs/small
  30m     CPU benchmark size (30.0M parameters): 8 layers x 768 (the 130m block), byte vocab,
          seq 2048.
  130m    mamba2-130m from scratch, the paper's recipe (App. F.1): NeoX tokens, docs >= 4K tokens,
          seq 8192, 0.5M tokens per step (64 x 8192), AdamW wd 0.1, clip 1.0, WSD with 1000
          warmup steps, bf16 compute with fp32 master params, data-parallel on a pod:
            python -m experiments.train --config=configs/train.py:130m --workdir=gs://BUCKET/130m \
                --config.data.source=gs://BUCKET/redpajama_neox --config.mesh_shape='(-1,1,1,1)'
          AOT check for a v5e-256 pod from a CPU host (64-way data x 4-way tensor parallel; the
          global batch of 64 sequences must divide over data x fsdp):
            .venv-tpu/bin/python -m experiments.train_compile --config=configs/train.py:130m \
                --topology=v5e:16x16 --config.mesh_shape='(64,1,1,4)'
            -> 1.89 GiB of 16 GiB HBM per chip (measured 2026-12-06, docs/training.md)
  370m, 780m, 1.3b, 2.7b   the same recipe for the larger published shapes (FSDP over 8 by
          default: --config.mesh_shape='(-1,8,1,1)'; tensor parallelism with '(-1,1,1,4)').
Mesh shapes are (data, fsdp, context, tensor); "context" splits each sequence over devices for
long sequences (docs/training.md, "Long sequences"), e.g. 64K tokens over 8 chips:
  --config.seq_len=65536 --config.global_batch_size=8 --config.mesh_shape='(-1,1,8,1)'

Any field can be overridden, e.g. a training-length sweep point:
  --config.seq_len=16384 --config.global_batch_size=32 --config.tbptt_segments=2
"""

from configs import base

_PAPER = {  # model preset, mesh shape, lr
  "130m": ("mamba2-130m", (-1, 1, 1, 1), 5e-4),
  "370m": ("mamba2-370m", (-1, 8, 1, 1), 5e-4),
  "780m": ("mamba2-780m", (-1, 8, 1, 1), 2e-4),
  "1.3b": ("mamba2-1.3b", (-1, 8, 1, 1), 2e-4),
  "2.7b": ("mamba2-2.7b", (-1, 8, 1, 1), 2e-4),
}


def get_config(arg: str = "tiny"):
  c = base.get_config()
  c.name = arg
  if arg == "tiny":
    c.model = base.model_config("tiny")
    c.seq_len, c.global_batch_size, c.total_steps = 512, 8, 200
    c.checkpoint_every, c.log_every = 50, 10
    c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 20
  elif arg == "small":
    c.model = base.model_config("small")
    c.seq_len, c.global_batch_size, c.total_steps = 1024, 8, 1500
    c.checkpoint_every = 250
    c.optimizer.lr = 3e-3
  elif arg == "30m":
    c.model = base.model_config(
      "tiny", d_model=768, n_layer=8, d_state=128, headdim=64, chunk_size=128
    )
    c.seq_len, c.global_batch_size, c.total_steps = 2048, 4, 1000
    c.optimizer.lr = 1e-3
  elif arg in _PAPER:
    preset, mesh, lr = _PAPER[arg]
    c.model = base.model_config(
      preset, dtype="bfloat16", param_dtype="float32", remat_policy="full"
    )
    c.seq_len, c.global_batch_size, c.total_steps = 8192, 64, 100_000
    c.mesh_shape = mesh
    c.checkpoint_every, c.keep_every, c.eval_every = 1000, 10_000, 1000
    c.data.source = "REQUIRED: a prepared NeoX directory (python -m experiments.prepare_data)"
    c.data.tokenizer = "neox"
    c.data.min_doc_tokens = 4096
    c.data.num_workers = 4
    c.optimizer.lr, c.optimizer.warmup_steps = lr, 1000
  else:
    raise ValueError(
      f"configs/train.py: unknown variant {arg!r}; allowed: tiny, small, 30m, {', '.join(_PAPER)}"
    )
  return c
