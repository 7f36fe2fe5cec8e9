"""mamba2_jax: a JAX/Flax NNX Mamba-2 for long-context research (Stuffed Mamba toolkit)."""

from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.config import ConfigError, Mamba2Config
from mamba2_jax.model import Mamba2LM
from mamba2_jax.pretrained import from_pretrained

__all__ = ["ConfigError", "Mamba2Cache", "Mamba2Config", "Mamba2LM", "from_pretrained"]
