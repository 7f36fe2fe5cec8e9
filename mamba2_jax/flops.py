"""FLOP counts of the Mamba-2 model (for MFU): dense matmuls plus the chunked SSD's einsums."""

from __future__ import annotations

from mamba2_jax.config import Mamba2Config


def ssd_flops_per_token(cfg: Mamba2Config, seq_len: int, platform: str | None = None) -> float:
  """Forward FLOPs per token of one layer's chunked SSD (multiply-add = 2 FLOPs).

  Per chunk of Q tokens: C·Bᵀ per group (2·Q²·N·G), the masked diagonal block applied to x
  (2·Q²·H·P), chunk states (2·Q·H·P·N) and the state-to-output term (2·Q·H·P·N). A sequence
  of one chunk (seq_len <= chunk_size, trained from a zero state) is only the diagonal block,
  which is all the XLA path computes then. The chunk is the one the model runs with on
  `platform` (None: the platform compiled for; `Mamba2Config.resolved_chunk_size`).
  """
  chunk = cfg.resolved_chunk_size(platform)
  q = min(chunk, seq_len)
  h, p, n, g = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
  states = 0 if seq_len <= chunk else 4 * h * p * n
  return 2 * q * n * g + 2 * q * h * p + states


def model_flops_per_token(cfg: Mamba2Config, seq_len: int, platform: str | None = None) -> float:
  """Forward FLOPs per token of the whole LM (a training step is about 3x this)."""
  d = cfg.d_model
  dense = 2 * (d * cfg.d_in_proj + cfg.d_inner * d)
  ssd = ssd_flops_per_token(cfg, seq_len, platform)
  return cfg.n_layer * (dense + ssd) + 2 * d * cfg.padded_vocab_size
