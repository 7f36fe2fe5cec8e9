"""Small corpora in every supported format, for tests and benchmarks (deterministic)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

_WORDS = (
  "the",
  "state",
  "of",
  "a",
  "recurrent",
  "model",
  "collapses",
  "when",
  "its",
  "context",
  "exceeds",
  "training",
  "length",
  "Mamba",
  "naïve",
  "café",
  "Straße",
  "東京",
  "数据",
  "🙂",
  "«quote»",
  '"double"',
  "back\\slash",
  "tab\tsep",
  "über",
  "ﬁ",
  "e\u0301",
)


def sample_texts(n: int, seed: int = 0, max_words: int = 400) -> list[str]:
  """`n` documents of varied length (including a 1-word one) with non-ASCII, quotes,
  backslashes, tabs, newlines and non-NFC sequences."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    k = 1 if i == 1 else int(rng.integers(2, max_words))
    words = [_WORDS[j] for j in rng.integers(0, len(_WORDS), k)]
    text, lines = [], []
    for w in words:
      lines.append(w)
      if rng.random() < 0.08:
        text.append(" ".join(lines))
        lines = []
    text.append(" ".join(lines))
    out.append(("\n" if i % 3 else "\n\n").join(text) + ("\n" if i % 2 else ""))
  return out


SET_NAMES = ("RedPajamaBook", "RedPajamaArXiv", "RedPajamaC4")


def write_corpus(directory, fmt: str, texts: list[str], files: int = 2) -> list[str]:
  """Writes `texts` (in order, split over `files` files) in one of the formats:
  jsonl | jsonl.zst | jsonl.gz | slimpajama (jsonl.zst, meta.redpajama_set_name cycling through
  SET_NAMES) | cc_flat (jsonl.zst, flat fields, no meta) | parquet_struct | parquet_json
  (meta as JSON string + __index_level_0__) | txt (one file per text). Returns the paths."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  if fmt == "txt":
    paths = []
    for i, t in enumerate(texts):
      p = d / f"book_{i:04d}.txt"
      p.write_bytes(t.encode("utf-8"))
      paths.append(str(p))
    return paths
  chunks = np.array_split(np.arange(len(texts)), files)
  paths = []
  for fi, idx in enumerate(chunks):
    rows = []
    for i in idx:
      i = int(i)
      if fmt == "cc_flat":
        rows.append(
          {
            "text": texts[i],
            "pred_label": "__label__wiki",
            "pred_label_prob": 0.9,
            "wiki_prob": 0.9,
            "source": f"cc/2023-06/en_head_{i:04d}",
          }
        )
      elif fmt == "slimpajama":
        rows.append({"text": texts[i], "meta": {"redpajama_set_name": SET_NAMES[i % 3]}})
      else:
        rows.append({"text": texts[i], "meta": {"doc": i, "source": "test"}})
    if fmt.startswith("parquet"):
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

      cols = {"text": [r["text"] for r in rows]}
      if fmt == "parquet_json":
        cols["meta"] = [json.dumps(r["meta"]) for r in rows]
        cols["__index_level_0__"] = [int(i) for i in idx]
      else:
        cols["meta"] = [r["meta"] for r in rows]
      p = d / f"part-{fi:03d}.parquet"
      pq.write_table(pa.table(cols), p, row_group_size=7)
    else:
      data = "".join(json.dumps(r, ensure_ascii=fi % 2 == 0) + "\n" for r in rows).encode()
      if fmt in ("jsonl.zst", "slimpajama", "cc_flat"):
        import zstandard  # pylint: disable=g-import-not-at-top

        name = {"cc_flat": f"en_head_{fi:04d}.json.gz.dedup.classifier.jsonl.zst"}.get(
          fmt, f"example_train_{fi}.jsonl.zst"
        )
        p = d / name
        # several frames per file, as concatenated zstd writers produce
        half = len(data) // 2
        cut = data.index(b"\n", half) + 1 if b"\n" in data[half:] else len(data)
        c = zstandard.ZstdCompressor(level=3)
        p.write_bytes(c.compress(data[:cut]) + c.compress(data[cut:]))
      elif fmt == "jsonl.gz":
        p = d / f"part-{fi:03d}.jsonl.gz"
        p.write_bytes(gzip.compress(data))
      elif fmt == "jsonl":
        p = d / f"part-{fi:03d}.jsonl"
        p.write_bytes(data)
      else:
        raise ValueError(f"unknown format {fmt!r}")
    paths.append(str(p))
  return paths


def write_bytes(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
  Path(path).write_bytes(data)
  return str(path)


def write_word_level_tokenizer(path) -> str:
  """A 7-token WordLevel `tokenizer.json` (EOS `</s>`=1, PAD `<pad>`=2) for HFTokenizer tests."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  vocab = {"[UNK]": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4, ",": 5, "extra": 6}
  t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  t.decoder = decoders.WordPiece(prefix="##")
  t.add_special_tokens(["</s>", "<pad>"])
  t.save(str(path))
  return str(path)


def write_tfds_dataset(
  data_dir, splits: dict[str, list[str | bytes]], name: str = "tiny_books", config: str = "small"
) -> str:
  """Prepares a TFDS dataset NAME/CONFIG:1.0.0 (array_record) under `data_dir` with a
  `GeneratorBasedBuilder` (no TensorFlow): one example per text of each split, features `body`
  (the text; bytes are stored as given, e.g. invalid UTF-8), `meta/author`, `title` (Text) and
  `year` (int32). The builder is not registered
  (a user's own builder, read back from the files alone). Returns `data_dir`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds_name, config_name = name, config
  with tfds.core.registered.skip_registration():

    class TinyBooks(tfds.core.GeneratorBasedBuilder):
      # A one-part module name: for a builder in a package, tfds 4.9.10 looks for its code with
      # `importlib_resources`, a package it only requires on Python < 3.9.
      __module__ = ds_name
      name = ds_name
      VERSION = tfds.core.Version("1.0.0")
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in (config_name, "zz")]

      def _info(self):
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
            {
              "body": text,
              "meta": {"author": tfds.features.Text()},
              "title": tfds.features.Text(),
              "year": tfds.features.Scalar(dtype=np.int32),
            }
          ),
        )

      def _split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(s) for s in splits}

      def _generate_examples(self, split):
        for i, t in enumerate(splits[split]):
          ex = {"body": t, "meta": {"author": f"author {i}"}, "title": f"{split} {i}"}
          yield f"{split}-{i}", ex | {"year": 1800 + i}

  b = TinyBooks(data_dir=str(data_dir), config=config, file_format="array_record")
  b.download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )
  return str(data_dir)
