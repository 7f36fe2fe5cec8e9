r"""Inference smoke demo on CPU: forward, chunked prefill vs full, decode, generation.

  python -m experiments.demo --config=configs/demo.py:tiny          # a random tiny model
  python -m experiments.demo --checkpoint=runs/tiny                 # any model source of
                                                                    # mamba2_jax.checkpoints.load_model
                                                                    # (with its tokenizer)
(The main demo, `bash scripts/demo.sh`, trains models and shows state collapse.)
"""

import mamba2_jax.host_tuning  # noqa: F401  (first: malloc for XLA on CPU hosts; before numpy/jax)

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from experiments import cli
from mamba2_jax import Mamba2Config, Mamba2LM
from mamba2_jax.checkpoints import load_model
from mamba2_jax.data import ByteTokenizer
from mamba2_jax.errors import InvalidInput
from mamba2_jax.generate import generate, prefill, prefill_chunked

DEFAULT_CONFIG = "configs/demo.py"
_CONFIG = config_flags.DEFINE_config_file("config", None, f"demo config (default {DEFAULT_CONFIG})")
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "a model source to generate from: a training workdir, a checkpoint dir or "
  "random:<preset>[:seed] (default: a random model of the config preset)",
)


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every restore at INFO
  cfg = _CONFIG.value
  tok = ByteTokenizer()
  if _CHECKPOINT.value:  # with its own tokenizer (the run's; neox for hub checkpoints)
    loaded = load_model(_CHECKPOINT.value)
    model, tok = loaded.model, loaded.tokenizer
    if tok.name.startswith("synthetic-"):
      raise InvalidInput(f"{_CHECKPOINT.value}: {tok.name} has token ids, no text to prompt with")
  else:
    model = Mamba2LM(
      Mamba2Config.preset(cfg.model_preset, vocab_size=tok.vocab_size), rngs=nnx.Rngs(cfg.seed)
    )
  model_cfg = model.config
  print(
    f"model {_CHECKPOINT.value or cfg.model_preset}: {model_cfg.num_params():,} parameters, "
    f"state size N_S = {model_cfg.state_size:,}, backend {jax.default_backend()}"
  )

  prompt = jnp.asarray(tok.encode((cfg.prompt + "\n") * cfg.prompt_repeats))[None]
  t0 = time.perf_counter()
  full_logits, full_cache = prefill(model, prompt)
  full_logits.block_until_ready()
  print(f"prefill of {prompt.shape[1]} tokens: {time.perf_counter() - t0:.2f} s (incl. compile)")
  last, cache = prefill_chunked(model, prompt, cfg.prefill_chunk)
  dlogit = float(jnp.max(jnp.abs(last - full_logits[:, -1])))
  dstate = float(jnp.max(jnp.abs(cache.ssm - full_cache.ssm)))
  print(
    f"prefill in pieces of {cfg.prefill_chunk} vs one piece: max |dlogits| = {dlogit:.2e}, "
    f"max |dstate| = {dstate:.2e}"
  )
  if not (dlogit < 1e-3 and dstate < 1e-3):
    raise SystemExit("prefill in pieces disagrees with the full prefill")

  for name, kw in [
    ("greedy", dict(temperature=0.0)),
    ("sampled", dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)),
  ]:
    generate(model, prompt, cfg.max_new_tokens, seed=cfg.seed, **kw).block_until_ready()
    t0 = time.perf_counter()
    out = generate(model, prompt, cfg.max_new_tokens, seed=cfg.seed, **kw)
    out.block_until_ready()
    dt = time.perf_counter() - t0
    text = tok.decode(np.asarray(out[0]))
    print(
      f"{name} generation ({cfg.max_new_tokens} tokens, {dt * 1e3:.0f} ms incl. prefill): {text!r}"
    )
  if not _CHECKPOINT.value:
    print("(an untrained model: the text is random bytes; try --checkpoint=<a training workdir>)")


if __name__ == "__main__":
  cli.run(main, {"config": DEFAULT_CONFIG})
