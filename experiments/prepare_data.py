r"""Tokenizes raw text once into ArrayRecord shards + manifest.json (resumable).

  python -m experiments.prepare_data --input 'data/*.jsonl.zst' --tokenizer neox --out DIR \
      [--min_doc_tokens 4096] [--subset book,arxiv] [--max_docs N] [--workers 4] \
      [--on_error fail|skip] [--overwrite]

--input: files, directories, globs (quote them), fsspec URLs (gs://... with gcsfs installed),
`builtin:shakespeare` or a prepared TFDS split `tfds:NAME[/CONFIG][:VERSION]:SPLIT` (read from
--tfds_data_dir, text feature --tfds_text_key; docs/data.md); repeat the flag or separate with
commas. Formats: .jsonl / .jsonl.zst /
.jsonl.gz (RedPajama, SlimPajama), .parquet, .txt. --tokenizer: `byte`, `neox` (after
scripts/get_neox_tokenizer.sh) or a tokenizer.json path. Interrupted? Run the same command again:
finished shards are kept. Read it back with `mamba2_jax.data.load_documents(DIR)` or stream it
with `make_train_iterator(source=DIR, ...)`.
"""

import json

from absl import app, flags

from experiments import cli
from mamba2_jax.data.prepare import DEFAULT_SHARD_BYTES, prepare

INPUT = flags.DEFINE_multi_string(
  "input", None, "input files / dirs / globs / URLs / builtin:NAME / tfds:NAME:SPLIT", required=True
)
TFDS_DATA_DIR = flags.DEFINE_string(
  "tfds_data_dir",
  "",
  "tfds: inputs: where prepared (default $TFDS_DATA_DIR, ~/tensorflow_datasets)",
)
TFDS_TEXT_KEY = flags.DEFINE_string(
  "tfds_text_key", "", "tfds: inputs: the text feature (default: the first string feature)"
)
TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "byte | neox | path/to/tokenizer.json")
OUT = flags.DEFINE_string("out", None, "output directory", required=True)
MIN_DOC_TOKENS = flags.DEFINE_integer(
  "min_doc_tokens", 0, "drop documents with fewer tokens (the paper uses 4096)"
)
SUBSET = flags.DEFINE_list(
  "subset", None, "keep only these RedPajama sets (e.g. book,arxiv or RedPajamaBook)"
)
MAX_DOCS = flags.DEFINE_integer("max_docs", None, "keep at most this many documents")
WORKERS = flags.DEFINE_integer("workers", 1, "worker processes (each takes whole shards)")
ON_ERROR = flags.DEFINE_enum(
  "on_error",
  "fail",
  ["fail", "skip"],
  "bad input: stop with file:line, or skip and count in the manifest",
)
SHARD_MB = flags.DEFINE_integer(
  "shard_mb", DEFAULT_SHARD_BYTES >> 20, "input MB per output shard (unit of work and of resume)"
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "discard an existing OUT and start again")
QUIET = flags.DEFINE_bool("quiet", False, "no progress bar")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  inputs = [p for arg in INPUT.value for p in arg.split(",") if p]
  m = prepare(
    inputs,
    TOKENIZER.value,
    OUT.value,
    min_doc_tokens=MIN_DOC_TOKENS.value,
    subset=SUBSET.value,
    max_docs=MAX_DOCS.value,
    workers=WORKERS.value,
    on_error=ON_ERROR.value,
    shard_bytes=SHARD_MB.value << 20,
    overwrite=OVERWRITE.value,
    show_progress=not QUIET.value,
    tfds_data_dir=TFDS_DATA_DIR.value or None,
    tfds_text_key=TFDS_TEXT_KEY.value or None,
  )
  c, bad = m["counts"], m["bad_input"]
  print(
    f"{OUT.value}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens "
    f"({m['tokenizer']['name']}, {m['dtype']}) in {len(m['shards'])} shards from "
    f"{len(m['sources'])} files ({m['source_bytes'] / 2**20:.1f} MiB)"
  )
  print(
    f"  read {c['read']:,}; dropped: {c['filtered_short']:,} shorter than "
    f"{m['filters']['min_doc_tokens']} tokens, {c['filtered_subset']:,} outside --subset"
    + ("; stopped at --max_docs" if c["stopped_at_max_docs"] else "")
  )
  if bad["total"]:
    print(f"  skipped bad input: {json.dumps(bad['counts'])} (first: {bad['examples'][0]})")
  if m["ignored_files"]:
    print(f"  ignored {len(m['ignored_files'])} files of other types, e.g. {m['ignored_files'][0]}")


if __name__ == "__main__":
  cli.run(main)
