"""Evaluation inputs as token ids: newline prompts, repeated texts, long documents
(docs/evaluation.md §2.2)."""

from __future__ import annotations

import itertools
import logging
from typing import Iterable, Iterator

import numpy as np

from mamba2_jax.data import get_tokenizer, load_documents
from mamba2_jax.data.synthetic import copy_prompt

log = logging.getLogger(__name__)

PROMPT_KINDS = ("newlines", "newlines_text", "text", "docs", "copy")


def newline_id(tokenizer) -> int:
  """The id of "\\n" (it must be a single token)."""
  ids = get_tokenizer(tokenizer).encode("\n")
  if len(ids) != 1:
    raise ValueError(
      f"'\\n' is {len(ids)} tokens {list(ids)} with this tokenizer; the newlines "
      "prompt needs a single newline token"
    )
  return int(ids[0])


def newline_prompt(tokenizer, length: int) -> np.ndarray:
  """(length,) int32: the newline id repeated, built from ids directly (a BPE would merge a long
  newline string into multi-newline tokens)."""
  return np.full((int(length),), newline_id(tokenizer), np.int32)


def repeat_to(ids, length: int) -> np.ndarray:
  """ids tiled (repeated) and truncated to exactly `length` tokens, int32."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  if ids.size == 0:
    raise ValueError("cannot repeat an empty token sequence")
  reps = -(-int(length) // ids.size)
  return np.tile(ids, reps)[:length]


def text_prompt(tokenizer, text: str, length: int) -> np.ndarray:
  """`text` tokenized once, then repeated/truncated to `length` tokens (the paper's string
  variants: `newlines_text` = "\\n" * 300000 tokenized, the `capital` prompt, ...)."""
  return repeat_to(get_tokenizer(tokenizer).encode(text), length)


def iter_document_prompts(
  source,
  tokenizer,
  *,
  num_prompts: int,
  length: int,
  min_doc_len: int = 0,
  max_docs: int | None = None,
  separator: int | None = None,
  tfds_data_dir: str | None = None,
  tfds_text_key: str | None = None,
) -> Iterator[np.ndarray]:
  """Yields num_prompts int32 prompts (length,) from the documents of `source` with >=
  min_doc_len tokens, one at a time (host memory O(length), not O(num_prompts * length)).
  A `tfds:...` source is read from `tfds_data_dir`, its text from `tfds_text_key`.

  Documents are taken in order and concatenated (with `separator` between them, if given) until
  a prompt holds `length` tokens; the rest of a truncated document is dropped and the next
  prompt continues with the following document (the paper's protocol: long documents,
  concatenated if short). If the corpus runs out, it is reused from the start (a warning says
  so: prompts then share text).
  """
  tok = get_tokenizer(tokenizer)

  def docs() -> Iterable[np.ndarray]:
    return load_documents(
      source,
      tok,
      min_doc_tokens=min_doc_len,
      max_docs=max_docs,
      tfds_data_dir=tfds_data_dir,
      tfds_text_key=tfds_text_key,
    )

  stream, cycles, n_docs = docs(), 0, 0
  for _ in range(num_prompts):
    out, filled = np.zeros((length,), np.int32), 0
    while filled < length:
      doc = next(stream, None)
      if doc is None:
        if n_docs == 0:
          raise ValueError(f"{source}: no document with >= {min_doc_len} tokens")
        if cycles == 0:
          log.warning(
            "%s: %d documents (>= %d tokens) are not enough for %d prompts of %d "
            "tokens; reusing the corpus",
            source,
            n_docs,
            min_doc_len,
            num_prompts,
            length,
          )
        cycles += 1
        stream = docs()
        continue
      if cycles == 0:
        n_docs += 1
      piece = doc if separator is None or filled == 0 else np.concatenate([[separator], doc])
      take = min(piece.size, length - filled)
      out[filled : filled + take] = piece[:take]
      filled += take
    yield out


def document_prompts(source, tokenizer, **kwargs) -> np.ndarray:
  """(num_prompts, length) int32: `iter_document_prompts` stacked."""
  return np.stack(list(iter_document_prompts(source, tokenizer, **kwargs)))


def iter_prompts(
  kind: str,
  tokenizer,
  *,
  length: int,
  num_prompts: int = 1,
  text: str = "",
  source: str = "",
  min_doc_len: int = 0,
  max_docs: int | None = None,
  separator: int | None = None,
  span: int = 32,
  seed: int = 0,
  tfds_data_dir: str | None = None,
  tfds_text_key: str | None = None,
) -> tuple[int, Iterator[np.ndarray]]:
  """(number of prompts, iterator of int32 (length,) prompts) of one of PROMPT_KINDS.
  Deterministic kinds (all but "docs" and "copy") give a single prompt: identical prompts would
  give identical losses."""
  if kind == "newlines":
    return 1, iter([newline_prompt(tokenizer, length)])
  if kind == "newlines_text":
    return 1, iter([text_prompt(tokenizer, "\n" * 300000, length)])
  if kind == "text":
    if not text:
      raise ValueError("prompt 'text' needs a non-empty text")
    return 1, iter([text_prompt(tokenizer, text, length)])
  if kind == "docs":
    if not source:
      raise ValueError(
        "prompt 'docs' needs a data source (prepared dir, glob, builtin:... or tfds:...)"
      )
    return num_prompts, iter_document_prompts(
      source,
      tokenizer,
      num_prompts=num_prompts,
      length=length,
      min_doc_len=min_doc_len,
      max_docs=max_docs,
      separator=separator,
      tfds_data_dir=tfds_data_dir,
      tfds_text_key=tfds_text_key,
    )
  if kind == "copy":  # synthetic copy-task streams: BOS + fresh pairs [S S] (vocab = tokenizer's)
    return num_prompts, (
      repeat_to(copy_prompt(tokenizer.vocab_size, span, length, seed + i)[0], length)
      for i in range(num_prompts)
    )
  raise ValueError(f"unknown prompt kind {kind!r}; kinds: {', '.join(PROMPT_KINDS)}")


def build_prompts(kind: str, tokenizer, **kwargs) -> np.ndarray:
  """(n, length) int32: all prompts of `iter_prompts` stacked."""
  _, it = iter_prompts(kind, tokenizer, **kwargs)
  return np.stack(list(it))


def config_prompts(cfg, tokenizer) -> tuple[int, Iterator[np.ndarray]]:
  """`iter_prompts` of a task config with the prompt fields (configs/evaluate.py: _prompt_fields)."""
  tok = get_tokenizer(tokenizer)
  sep = tok.eos_id if cfg.separator == "eos" else None
  return iter_prompts(
    cfg.prompt,
    tok,
    length=cfg.max_len,
    num_prompts=cfg.get("num_prompts", 1),
    text=cfg.text,
    source=cfg.data,
    min_doc_len=cfg.min_doc_len,
    max_docs=cfg.max_docs or None,
    separator=sep,
    span=cfg.get("span", 32),
    seed=cfg.get("seed", 0),
    tfds_data_dir=cfg.get("tfds_data_dir") or None,
    tfds_text_key=cfg.get("tfds_text_key") or None,
  )


def corpus_stream(
  source,
  tokenizer,
  min_tokens: int,
  *,
  max_docs: int | None = None,
  tfds_data_dir: str | None = None,
  tfds_text_key: str | None = None,
) -> np.ndarray:
  """One int32 token stream: documents of `source` concatenated until >= min_tokens (all of
  them if the corpus is shorter)."""
  parts, total = [], 0
  docs = load_documents(
    source, get_tokenizer(tokenizer), tfds_data_dir=tfds_data_dir, tfds_text_key=tfds_text_key
  )
  for doc in itertools.islice(docs, max_docs):
    parts.append(doc)
    total += doc.size
    if total >= min_tokens:
      break
  if not parts:
    raise ValueError(f"{source}: no documents")
  return np.concatenate(parts).astype(np.int32)


def special_ids(tokenizer, bos_id: int = -1, eos_id: int = -1) -> tuple[int, int]:
  """(bos, eos) ids: the config's when >= 0, else the tokenizer's; a vocabulary without BOS (NeoX)
  uses its EOS `<|endoftext|>` for both."""
  tok = get_tokenizer(tokenizer)
  eos = eos_id if eos_id >= 0 else tok.eos_id
  bos = bos_id if bos_id >= 0 else (tok.bos_id if tok.bos_id is not None else eos)
  if bos is None or eos is None:
    raise ValueError(f"{tok!r} has no BOS/EOS ids; set bos_id/eos_id in the config")
  return int(bos), int(eos)
