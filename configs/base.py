r"""Base training config: every field the trainer reads, with defaults.

Experiment files import this and edit it (configs/train.py). Every field can be overridden on
the command line, e.g.

  python -m experiments.train --config=configs/train.py:tiny --workdir=runs/tiny \
      --config.seq_len=4096 --config.optimizer.lr=1e-3 --config.mesh_shape='(2,2,1,2)'

Tuples, not lists (ml_collections cannot override lists). Optional fields are placeholders
(None until set): `--config.eval_source=...` works on them. The config is validated before
any device work (mamba2_jax/train/config.py); errors name the field and the allowed values.
"""

import ml_collections
from ml_collections import config_dict

from mamba2_jax.config import AUTO_FIELDS, Mamba2Config

# Logical parameter axes of the model (mamba2_jax/layers.py) -> mesh axes ("data", "fsdp",
# "context", "tensor"). "batch" and "length" are the axes of the step's (batch, seq_len) inputs,
# targets and segment ids. "embed" (d_model) shards parameters and optimizer state over fsdp x
# context (FSDP over the context devices too: a long-sequence run holds 1/context of them per
# device; with context 1 this is plain FSDP).
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", "context"),
  ("layers", None),
  ("vocab", "tensor"),
  ("embed", ("fsdp", "context")),
  ("inner", "tensor"),
  ("heads", "tensor"),
  ("group_state", None),
  ("conv_width", None),
  ("norm", None),
  ("in_proj", None),
)


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """All Mamba2Config fields of a preset as a ConfigDict (each overridable). chunk_size and
  scan_unroll take an int or "auto" (`--config.model.chunk_size=64` or `=auto`)."""
  d = Mamba2Config.preset(preset, **overrides).to_dict()
  d["A_init_range"] = tuple(d["A_init_range"])
  d["dt_limit"] = tuple(d["dt_limit"])
  for f in AUTO_FIELDS:
    d[f] = config_dict.FieldReference(d[f], field_type=object)
  return ml_collections.ConfigDict(d)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0

  # Sequence and batch. seq_len is the training length T (the model's input length); with
  # tbptt_segments = P > 1 each example is P consecutive segments of seq_len tokens of one
  # stream, the final state (SSM + conv) of each carried into the next (stop-gradient).
  c.seq_len = 2048
  c.global_batch_size = 8
  c.grad_accum_steps = 1  # micro-batches per step (global batch split over them)
  c.tbptt_segments = 1
  c.total_steps = 1000

  # Parallelism: sizes of the mesh axes ("data", "fsdp", "context", "tensor"); -1 = the
  # remaining devices. Three sizes mean (data, fsdp, tensor) with context 1. "context" splits
  # every sequence into contiguous slices (seq_len divisible by it; docs/training.md, "Long
  # sequences").
  c.mesh_shape = (-1, 1, 1, 1)
  c.logical_axis_rules = DEFAULT_RULES

  # Checkpoints, evaluation, logging.
  c.checkpoint_every = 500
  c.keep_checkpoints = 3  # newest N kept ...
  c.keep_every = config_dict.placeholder(int)  # ... plus every N-th step permanently
  c.async_checkpointing = True
  c.eval_every = 0  # 0 = no in-training evaluation
  c.eval_batches = 4
  c.log_every = 10
  c.profile_start = config_dict.placeholder(int)  # jax.profiler trace window (process 0)
  c.profile_steps = 3
  c.allow_config_change = False  # resume a workdir whose saved config differs
  c.max_consecutive_nonfinite = 0  # non-finite losses tolerated before stopping (0 = stop)

  c.model = model_config("tiny")
  # Start from pretrained weights (continued pretraining, as the paper's 130M/370M/780M runs):
  # an official / HF / converted checkpoint dir; its shapes must match config.model.
  c.init_checkpoint = config_dict.placeholder(str)

  c.data = ml_collections.ConfigDict()
  # prepared dir, raw inputs (globs), builtin:NAME or a prepared TFDS split
  # tfds:NAME[/CONFIG][:VERSION]:SPLIT (docs/data.md "TFDS datasets")
  c.data.source = "builtin:shakespeare"
  c.data.tfds_data_dir = (
    ""  # tfds: sources: where prepared ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  )
  c.data.tfds_text_key = ""  # tfds: sources: the text feature ("" = the first string feature)
  c.data.tokenizer = "byte"
  c.data.packing = "concat"  # "concat" (the paper's) | "segments"
  c.data.min_doc_tokens = 0  # the paper drops documents under 4096 tokens
  c.data.add_bos = False
  c.data.add_eos = True
  c.data.num_workers = 0  # grain mp_prefetch processes per host
  c.data.num_shards = config_dict.placeholder(int)  # logical data shards (default: processes)
  c.data.eval_source = config_dict.placeholder(str)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 3e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  # parameters whose path contains one of these names get no weight decay (the paper's recipe)
  c.optimizer.no_decay = ("A_log", "dt_bias", "D", "norm", "bias")
  c.optimizer.clip_norm = 1.0
  c.optimizer.schedule = "wsd"  # "wsd" | "cosine" | "constant"
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_fraction = 0.1  # wsd: share of total_steps spent decaying
  c.optimizer.min_lr_ratio = 0.1  # final lr / peak lr (wsd and cosine)
  return c
