r"""Converts an official `state-spaces/mamba2-*` or HF `Mamba2ForCausalLM` checkpoint to ours.

  python -m experiments.convert_hf --src DIR --dst DIR [--param_dtype float32] [--overwrite]

DST gets `mamba2_jax_config.json` (the Mamba2Config), `params/` (orbax) and `source.json`;
`mamba2_jax.from_pretrained(DST)` loads it. No torch needed: `.bin` files are read with a
restricted unpickler, `.safetensors` with safetensors' numpy API.
"""

import mamba2_jax.host_tuning  # noqa: F401  (first: malloc for XLA on CPU hosts; before numpy/jax)

import json
import os
import shutil

from absl import flags, logging

from experiments import cli
from mamba2_jax.checkpoints.hub import OUR_CONFIG, OUR_PARAMS, from_pretrained, load_config
from mamba2_jax.checkpoints.params import save_params

FLAGS = flags.DEFINE_string("src", None, "official or HF checkpoint directory", required=True)
DST = flags.DEFINE_string("dst", None, "output directory", required=True)
PARAM_DTYPE = flags.DEFINE_enum(
  "param_dtype", "float32", ["float32", "bfloat16"], "storage dtype of the converted parameters"
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing DST")


def convert(src: str, dst: str, param_dtype: str = "float32", overwrite: bool = False) -> None:
  if os.path.exists(dst) and os.listdir(dst):
    if not overwrite:
      raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite to replace it)")
    shutil.rmtree(dst)
  _, fmt = load_config(src)
  model = from_pretrained(src, param_dtype=param_dtype)
  tmp = dst.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_params(os.path.join(tmp, OUR_PARAMS), model)
  with open(os.path.join(tmp, OUR_CONFIG), "w") as f:
    f.write(model.config.to_json())
  with open(os.path.join(tmp, "source.json"), "w") as f:
    json.dump({"src": os.path.abspath(src), "format": fmt}, f, indent=2)
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  os.replace(tmp, dst)  # the destination appears only once complete
  logging.info(
    "converted %s checkpoint %s -> %s (%d parameters)", fmt, src, dst, model.config.num_params()
  )


def main(argv):
  del argv
  convert(FLAGS.value, DST.value, PARAM_DTYPE.value, OVERWRITE.value)
  print(f"wrote {DST.value}")


if __name__ == "__main__":
  cli.run(main)
