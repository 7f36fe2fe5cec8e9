"""Checkpoints, below training and evaluation: every way a model is stored, and loading it.

    from mamba2_jax.checkpoints import load_model
    loaded = load_model("runs/t8k")        # or random:tiny, or an official / HF / converted dir
    loaded.model, loaded.tokenizer, loaded.meta

Modules:
  workdir       the layout of a training workdir (checkpoint_dir, config.json, train_complete,
                data-iterator states), `complete_steps`, `CheckpointError`, `train_len`
  checksums     layout-independent `fingerprint`s of saved arrays, `verify`
  params        model parameters as an orbax checkpoint (converted checkpoints, training steps)
  hub           official `state-spaces/mamba2-*` and HF `Mamba2ForCausalLM` directories,
                `from_pretrained`
  weight_files  numpy state dicts of `.safetensors` / `.bin` files, shards, directories
  torch_pickle  torch-free reading of torch.save (`.bin`) files: a restricted unpickler
  load          `load_model(spec)` for every model source, `load_workdir_model`

The training side (`mamba2_jax.train.checkpoint.Checkpointer`: saving, resuming) builds on
these; evaluation, the demo and sweeps only read through them. Names are imported lazily, so
`workdir` can be used without importing jax.
"""

import importlib

_EXPORTS = {
  "CheckpointError": "mamba2_jax.checkpoints.workdir",
  "complete_steps": "mamba2_jax.checkpoints.workdir",
  "is_train_complete": "mamba2_jax.checkpoints.workdir",
  "train_len": "mamba2_jax.checkpoints.workdir",
  "fingerprint": "mamba2_jax.checkpoints.checksums",
  "from_pretrained": "mamba2_jax.checkpoints.hub",
  "save_params": "mamba2_jax.checkpoints.params",
  "restore_params": "mamba2_jax.checkpoints.params",
  "LoadedModel": "mamba2_jax.checkpoints.load",
  "load_model": "mamba2_jax.checkpoints.load",
  "load_workdir_model": "mamba2_jax.checkpoints.load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'mamba2_jax.checkpoints' has no attribute {name!r}")
