r"""Demo: build a tiny Mamba-2, check prefill-in-pieces == full forward, generate bytes.

python -m experiments.demo --config=configs/demo.py:tiny --config.max_new_tokens=64
"""

import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_preset = arg or "tiny"
  config.seed = 0
  config.prompt = "To be, or not to be, that is the question:"
  config.prompt_repeats = 8  # the prompt is repeated to make a longer prefill
  config.prefill_chunk = 64
  config.max_new_tokens = 64
  config.temperature = 0.8
  config.top_k = 40
  config.top_p = 0.95
  config.lock()
  return config
