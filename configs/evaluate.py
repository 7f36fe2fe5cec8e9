r"""Default configs of the evaluation tasks (ml_collections), and their one home.

  python -m experiments.evaluate --checkpoint=random:tiny --out=/tmp/ev \
      --config=configs/evaluate.py:passkey --config.lengths="(512,1024)" --config.num_samples=10
  python -m experiments.evaluate --checkpoint=runs/demo/runs/seq_len-64/train --out=/tmp/copy \
      --config=configs/evaluate.py:copy_task --config.max_len=4096

Tasks: ppl_by_position, passkey, state_stats, forgetting_curve, copy_task (the synthetic copy
task, for models trained on synthetic:copy data; the library's
`mamba2_jax.eval.TASKS`; it checks a config with `mamba2_jax.eval.tasks.check_task_config` and
never imports this file: experiments.evaluate and experiments.sweep load it and pass the configs
down). Sentinels: 0 / -1 / "" / () mean "derive it" as documented per field.

Paper constants are the defaults wherever the paper states them (its section in brackets; docs/evaluation.md).
"""

from __future__ import annotations

import ml_collections

from mamba2_jax.eval.tasks import check_task, check_task_config

PASSKEY_PREFIX = (
  "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
)
PASSKEY_BLOCK = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
)
PASSKEY_NEEDLE = "The passkey is {K}. Remember it. {K} is the passkey.\n"
PASSKEY_SUFFIX = "\nWhat is the pass key? The passkey is"
CAPITAL_TEXT = (
  "The capital of China is Beijing. The capital of USA is Washington. "
  "The capital of Norway is Oslo. "
)


def _common(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.train_len = 0  # T_train in tokens; 0 = from the checkpoint (config.seq_len) or none
  c.chunk_len = 4096  # tokens per jitted prefill piece (memory ~ batch * chunk_len * vocab)
  c.batch_size = 1
  c.seed = 0
  c.progress = True  # tqdm bars
  c.mitigation = ""  # "" | preset name | "field=value,field=value" (mamba2_jax.mitigations)
  c.model_dtype = ""  # "" = as loaded (float32); e.g. "bfloat16" for the paper's bf16 runs
  return c


def _prompt_fields(c, prompt: str, max_len: int) -> None:
  c.prompt = prompt  # newlines | newlines_text | text | docs | copy  [§2.2]
  c.text = CAPITAL_TEXT  # the text repeated by prompt=text
  c.data = "builtin:shakespeare"  # documents for prompt=docs: prepared dir, glob, builtin:, tfds:
  c.tfds_data_dir = ""  # data=tfds:...: where prepared ("" = $TFDS_DATA_DIR, ~/tensorflow_datasets)
  c.tfds_text_key = ""  # data=tfds:...: the text feature ("" = the first string feature)
  c.min_doc_len = 16384  # documents shorter than this are skipped  [§2.2 redpj_16k]
  c.max_docs = 0  # 0 = no limit
  c.separator = "eos"  # between concatenated documents: eos | none
  c.max_len = max_len  # prompt length in tokens (truncated / repeated to it)
  c.span = 32  # prompt=copy: span of the synthetic copy task's pairs


def ppl_by_position() -> ml_collections.ConfigDict:
  c = _common("ppl_by_position")
  _prompt_fields(c, "newlines", 1 << 20)  # 1M tokens  [§2.3, §2.4]
  c.chunk_len = 8192
  c.num_prompts = 128  # prompts averaged (prompt=docs only)  [§2.4]
  c.batch_size = 8
  # positions per bucket; 0 = from T_train: the largest power of two <= T_train / 4, at most
  # 512 [§2.3 arguments.py] (512 without T_train), so >= 2 buckets lie within T_train
  c.bucket_size = 0
  c.drop_first_bucket = True  # [§2.3]
  c.drop_last_bucket = True
  # FAIL if a bucket loss > factor * max loss within T_train  [§2.4]; "not learned" (no
  # verdict) if the mean loss within T_train is not clearly below ln(vocab_size)
  # (mamba2_jax.eval.criteria.LEARNED_MARGIN)
  c.forget_factor = 2.0
  c.log_x = False
  c.ppl_ymax = 60.0  # y-limit of the perplexity plot (0 = auto)  [§2.3]
  c.loss_ymax = 0.0  # 0 = auto
  return c


def passkey() -> ml_collections.ConfigDict:
  c = _common("passkey")
  c.lengths = ()  # explicit context lengths in tokens; () = from min/max/step
  c.min_len = 1024
  c.max_len = 131072
  c.len_step = 0  # 0 = powers of two from min_len; > 0 = range(min, max+1, step)
  c.num_samples = 200  # per length, needle depths (i + 0.5) / n  [§4]
  c.depth_bins = 10  # heatmap rows  [§4 plot.py]
  c.max_new_tokens = 5  # greedy  [§4]
  c.threshold = 0.95  # T_recall: accuracy > threshold  [§4.3]
  c.t_recall_rule = "prefix"  # prefix | any (see mamba2_jax.eval.criteria.largest_passing)
  c.prefix = PASSKEY_PREFIX
  c.block = PASSKEY_BLOCK
  c.needle = PASSKEY_NEEDLE  # {K} = the 5-digit key
  c.suffix = PASSKEY_SUFFIX
  c.use_bos = False  # prepend BOS (NeoX: <|endoftext|>)
  c.add_prefix_blocks = 0  # the code's add_prefix: prepend the context block N times (1200)
  c.batch_size = 4
  return c


def state_stats() -> ml_collections.ConfigDict:
  c = _common("state_stats")
  _prompt_fields(c, "newlines", 35 * 1024)  # [§2.5]
  c.num_prompts = 1  # prompt=docs: prompts in the batch (statistics are averaged)
  c.stat_chunk = 128  # the state is read after every stat_chunk tokens  [§2.5]
  c.plot_layers = ()  # () = (int(0.8 * n_layer),): layer 38 of 48 as in the paper
  c.plot_heads = ()  # () = heads 0..7  [§2.5]
  c.explode_factor = 2.0  # flag a head if max norm beyond T_train > factor * max within
  c.hist_layer = -1  # state histogram of one head; -1 = the first plot layer
  c.hist_head = 2  # [§2.5 Fig. 6: layer 38 head 2]
  c.hist_positions = ()  # token positions (multiples of chunk_len); () = (T_train, end)
  return c


def forgetting_curve() -> ml_collections.ConfigDict:
  c = _common("forgetting_curve")
  c.data = (
    "builtin:shakespeare"  # corpus for data_type=order  [§6: PG-19 test, e.g. tfds:pg19:test]
  )
  c.tfds_data_dir = ""  # data=tfds:...: as in _prompt_fields
  c.tfds_text_key = ""
  c.data_type = "order"  # order (contiguous corpus spans) | random (uniform ids)
  c.random_low = 10  # random ids in [low, high]  [§6]
  c.random_high = -1  # -1 = min(31999, last id before the first special id > low)
  c.filler = "auto"  # LM baseline filler R: auto | corpus (last L tokens) | random
  c.min_dep_len = 8
  c.max_dep_len = 20000  # [§6 test_max_length]
  c.num_lengths = 32  # [§6]
  c.spacing = "linear"  # linear | log
  c.repeats = 10  # fresh S per length  [§6]
  c.fine_threshold = 0.99  # fine-grained memory: copy accuracy >= this
  c.p_threshold = 0.05  # coarse-grained memory: copy > LM at p < this (paired t-test)
  c.rule = "prefix"  # prefix | any (see mamba2_jax.eval.criteria.largest_passing)
  c.bos_id = -1  # -1 = tokenizer's (byte: 256; NeoX: <|endoftext|> = 0)
  c.eos_id = -1
  c.batch_size = 0  # 0 = all 2 * repeats sequences of a length in one batch
  return c


def copy_task() -> ml_collections.ConfigDict:
  """The synthetic copy task (mamba2_jax/eval/copy_task.py; data: synthetic:copy)."""
  c = _common("copy_task")
  c.vocab = 0  # 0 = the tokenizer's (synthetic-copy-v<V>)
  c.span = 32  # the training data's span
  c.max_len = 8192  # stream length in tokens (BOS + pairs)
  c.num_prompts = 8  # fresh streams averaged
  c.batch_size = 8
  c.bucket_size = 64  # positions per bucket (one pair for span 32); 0 = from T_train
  # FAIL if a bucket's copied-half loss > factor x max within T_train; "not learned" (no
  # verdict) if it is not clearly below chance ln(vocab - 2) within T_train
  c.forget_factor = 2.0
  return c


_DEFAULTS = {
  "ppl_by_position": ppl_by_position,
  "passkey": passkey,
  "state_stats": state_stats,
  "forgetting_curve": forgetting_curve,
  "copy_task": copy_task,
}


def get_config(task: str = "ppl_by_position") -> ml_collections.ConfigDict:
  task = task or "ppl_by_position"
  check_task(task)
  config = _DEFAULTS[task]()
  check_task_config(config)
  config.lock()
  return config
