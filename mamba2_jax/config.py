"""Mamba-2 model configuration: every field of the block, validated, with published presets.

Notation (docs/model_and_ssd.md, the paper): D = d_model, d_inner = expand * D, P = headdim,
H = d_inner / P heads, G = ngroups, N = d_state, K = d_conv.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

from mamba2_jax.errors import UserError
from mamba2_jax.mitigations.validate import validate_fields

DTYPES = {
  "float32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "float16": jnp.float16,
  "float64": jnp.float64,
}
REMAT_POLICIES = ("none", "full", "save_dots", "save_ssd_inputs")
SSD_IMPLS = ("auto", "reference", "xla", "pallas_gpu", "pallas_tpu")
# Fields that change speed, not the function: an int >= 1 or "auto", resolved at trace time for
# the platform compiled for (`resolved_chunk_size`, `resolved_scan_unroll`).
AUTO_FIELDS = ("chunk_size", "scan_unroll")
# SSD chunk of chunk_size="auto" by platform ("*": every other). CPU: 64 (the model benchmark's
# fastest chunk, docs/benchmarks.md); TPU/GPU: 256, the kernels' and official tuning.
AUTO_CHUNK_SIZE = {"cpu": 64, "*": 256}
# scan_unroll="auto" on the CPU: models of at most this many layers run fully unrolled (a rolled
# layer scan copies every saved activation into its stacked buffer and back: 1.5x the training
# step of the CPU presets); deeper ones, and every model on TPU/GPU, stay rolled (compile time
# then does not grow with depth).
AUTO_UNROLL_MAX_LAYERS = 8


class ConfigError(UserError, ValueError):
  """A config value is invalid; the message names the field and the rule."""


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """Hyper-parameters of a Mamba-2 language model (official `mamba_ssm` defaults)."""

  d_model: int = 768
  n_layer: int = 24
  d_state: int = 128
  headdim: int = 64
  expand: int = 2
  ngroups: int = 1
  d_conv: int = 4
  chunk_size: int | str = "auto"  # SSD chunk Q; "auto": by platform (AUTO_CHUNK_SIZE)
  vocab_size: int = 50277
  pad_vocab_size_multiple: int = 16
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  residual_in_fp32: bool = True
  conv_bias: bool = True
  proj_bias: bool = False  # bias of in_proj/out_proj (False in every published checkpoint)
  D_has_hdim: bool = False  # D per (head, headdim) instead of per head
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  A_init_range: tuple[float, float] = (1.0, 16.0)
  dt_limit: tuple[float, float] = (0.0, math.inf)
  initializer_range: float = 0.02  # std of the embedding init
  rescale_prenorm_residual: bool = True  # out_proj init scaled by 1/sqrt(n_layer)
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of parameters (A_log is always float32)
  remat_policy: str = "none"  # one of REMAT_POLICIES, applied per layer
  # layers per remat group (divides n_layer; needs a remat policy): g > 1 also checkpoints each
  # group of g layers, so the backward keeps n_layer/g + g layer inputs instead of n_layer
  # (for one more forward pass); the gradient is the same. 1 = off.
  remat_group: int = 1
  # layers per iteration of the layer scan (n_layer = fully unrolled); "auto": by platform
  scan_unroll: int | str = "auto"
  fused_in_proj: bool = True  # one matmul for z|x|B|C|dt (set False under tensor parallelism)
  ssd_impl: str = "auto"  # one of SSD_IMPLS; see mamba2_jax.ssd.ssd
  # Training-free state-collapse mitigations (paper §3; mamba2_jax/mitigations/). Defaults = off.
  rri_decay_scale: float = 1.0  # c_a in (0, 1]: alpha_t *= c_a (log alpha_t += log c_a)
  rri_insert_scale: float = 1.0  # c_b > 0: B_t *= c_b
  dt_scale: float = 1.0  # s > 0: dt_t *= s after softplus/clip (LongMamba; decay and insertion)
  ssd_window: int = 0  # r >= 1: sliding window by state difference (eq. 8); 0 = off
  state_norm: str = "off"  # off|token|chunk: h <- h * min(1, tau / ||h||_F) per head
  state_norm_chunk: int = 128  # block length of state_norm="chunk"
  state_norm_threshold: float = math.inf  # tau of every (layer, head) until calibrated

  def __post_init__(self):
    # Tuples arrive as lists from JSON / ml_collections; normalise before validating.
    object.__setattr__(self, "A_init_range", tuple(float(v) for v in self.A_init_range))
    object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
    for f in AUTO_FIELDS:  # a command line's "64" is the int 64
      v = getattr(self, f)
      if isinstance(v, str) and v.strip().isdigit():
        object.__setattr__(self, f, int(v))
    if isinstance(self.state_norm_threshold, str):  # JSON has no inf: written as "inf"
      try:
        object.__setattr__(self, "state_norm_threshold", float(self.state_norm_threshold))
      except ValueError:
        pass  # validate() reports it
    self.validate()

  @property
  def mitigations_on(self) -> bool:
    """True when any state-collapse mitigation changes the function."""
    return (
      self.rri_decay_scale != 1.0
      or self.rri_insert_scale != 1.0
      or self.dt_scale != 1.0
      or self.ssd_window > 0
      or self.state_norm != "off"
    )

  # Derived sizes -------------------------------------------------------------------------
  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def nheads(self) -> int:
    return self.d_inner // self.headdim

  @property
  def conv_dim(self) -> int:
    return self.d_inner + 2 * self.ngroups * self.d_state

  @property
  def d_in_proj(self) -> int:
    return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

  @property
  def padded_vocab_size(self) -> int:
    m = self.pad_vocab_size_multiple
    return -(-self.vocab_size // m) * m

  @property
  def state_size(self) -> int:
    """N_S of the paper (number of recurrent-state scalars): SSM states plus conv states."""
    per_layer = self.nheads * self.headdim * self.d_state + (self.d_conv - 1) * self.conv_dim
    return self.n_layer * per_layer

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def param_jnp_dtype(self):
    return DTYPES[self.param_dtype]

  def num_params(self) -> int:
    """Parameter count (tied embedding counted once; padded vocab rows included)."""
    d, v = self.d_model, self.padded_vocab_size
    per_layer = (
      d  # block norm
      + d * self.d_in_proj
      + (self.d_in_proj if self.proj_bias else 0)
      + self.conv_dim * self.d_conv
      + (self.conv_dim if self.conv_bias else 0)
      + 2 * self.nheads  # A_log, dt_bias
      + (self.d_inner if self.D_has_hdim else self.nheads)
      + self.d_inner  # gated norm
      + self.d_inner * d
      + (d if self.proj_bias else 0)
    )
    return v * d + self.n_layer * per_layer + d + (0 if self.tie_embeddings else v * d)

  # Speed settings, resolved where they are used ----------------------------------------------
  def resolved_chunk_size(self, platform: str | None = None) -> int:
    """The SSD chunk: `chunk_size`, or for "auto" AUTO_CHUNK_SIZE of `platform` (None: the
    platform being compiled for, `mamba2_jax.ssd.platform.target_platform`; call at trace
    time). Every SSD impl takes any chunk >= 1 (the Pallas cores round it to their tiles)."""
    if self.chunk_size != "auto":
      return self.chunk_size
    platform = platform or _target_platform()
    return AUTO_CHUNK_SIZE.get(platform, AUTO_CHUNK_SIZE["*"])

  def resolved_scan_unroll(self, platform: str | None = None) -> int:
    """Layers per layer-scan iteration: `scan_unroll`, or for "auto" n_layer (fully unrolled)
    on the CPU up to AUTO_UNROLL_MAX_LAYERS layers, else 1; `platform` as in
    `resolved_chunk_size`."""
    if self.scan_unroll != "auto":
      return self.scan_unroll
    platform = platform or _target_platform()
    return self.n_layer if platform == "cpu" and self.n_layer <= AUTO_UNROLL_MAX_LAYERS else 1

  # Validation -----------------------------------------------------------------------------
  def validate(self) -> None:
    def fail(field, rule):
      raise ConfigError(f"Mamba2Config.{field}: {rule}")

    for f in (
      "d_model",
      "n_layer",
      "d_state",
      "headdim",
      "expand",
      "ngroups",
      "d_conv",
      "vocab_size",
      "pad_vocab_size_multiple",
    ):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        fail(f, f"must be a positive integer, got {v!r}")
    for f in AUTO_FIELDS:
      v = getattr(self, f)
      if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        fail(f, f"must be a positive integer or 'auto', got {v!r}")
    if self.d_inner % self.headdim:
      fail(
        "headdim",
        f"d_model*expand % headdim != 0 ({self.d_model}*{self.expand} = "
        f"{self.d_inner} is not divisible by headdim={self.headdim})",
      )
    if self.nheads % self.ngroups:
      fail(
        "ngroups",
        f"nheads % ngroups != 0 (nheads = d_model*expand/headdim = {self.nheads}, "
        f"ngroups={self.ngroups})",
      )
    if not 0 < self.dt_min <= self.dt_max:
      fail("dt_min", f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
    if not 0 < self.dt_init_floor:
      fail("dt_init_floor", f"must be > 0, got {self.dt_init_floor}")
    if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
      fail("A_init_range", f"need (lo, hi) with 0 < lo <= hi, got {self.A_init_range}")
    if len(self.dt_limit) != 2 or not 0 <= self.dt_limit[0] < self.dt_limit[1]:
      fail("dt_limit", f"need (lo, hi) with 0 <= lo < hi (hi may be inf), got {self.dt_limit}")
    if not self.norm_eps > 0:
      fail("norm_eps", f"must be > 0, got {self.norm_eps}")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in DTYPES:
        fail(f, f"must be one of {sorted(DTYPES)}, got {getattr(self, f)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      fail("remat_policy", f"must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    g = self.remat_group
    if not isinstance(g, int) or isinstance(g, bool) or g < 1 or self.n_layer % g:
      fail("remat_group", f"must be a positive divisor of n_layer={self.n_layer}, got {g!r}")
    if g > 1 and self.remat_policy == "none":
      fail("remat_group", f"{g} needs a remat_policy other than 'none'")
    if self.ssd_impl not in SSD_IMPLS:
      fail("ssd_impl", f"must be one of {SSD_IMPLS}, got {self.ssd_impl!r}")
    validate_fields(self, fail)  # the mitigation fields (mamba2_jax/mitigations/validate.py)

  # Construction helpers ---------------------------------------------------------------------
  def replace(self, **changes) -> "Mamba2Config":
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ConfigError(
        f"Mamba2Config: unknown field(s) {sorted(unknown)}; "
        f"known fields: {sorted(f.name for f in dataclasses.fields(self))}"
      )
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    d = self.to_dict()
    # JSON has no infinity; write it as a string that from_dict reads back.
    d["dt_limit"] = [v if math.isfinite(v) else "inf" for v in d["dt_limit"]]
    if not math.isfinite(d["state_norm_threshold"]):
      d["state_norm_threshold"] = "inf"
    return json.dumps(d, indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Mamba2Config":
    d = dict(d)
    if "dt_limit" in d:
      d["dt_limit"] = tuple(float(v) for v in d["dt_limit"])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ConfigError(
        f"Mamba2Config: unknown field(s) {sorted(unknown)}; known fields: {sorted(known)}"
      )
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> "Mamba2Config":
    return cls.from_dict(json.loads(text))

  @classmethod
  def preset(cls, name: str, **overrides) -> "Mamba2Config":
    if name not in PRESETS:
      raise ConfigError(f"Mamba2Config.preset: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})


# Published shapes (docs/model_and_ssd.md): vocab 50277 padded to 50288, tied, N 128, headdim 64.
PRESETS: dict[str, dict[str, Any]] = {
  "mamba2-130m": dict(d_model=768, n_layer=24),
  "mamba2-370m": dict(d_model=1024, n_layer=48),
  "mamba2-780m": dict(d_model=1536, n_layer=48),
  "mamba2-1.3b": dict(d_model=2048, n_layer=48),
  "mamba2-2.7b": dict(d_model=2560, n_layer=64),
  # Tiny CPU models (byte vocabulary: 256 bytes + BOS/EOS/PAD). Presets fix shapes only:
  # chunk_size and scan_unroll stay "auto" (on a CPU: chunk 64, layers fully unrolled).
  "tiny": dict(d_model=64, n_layer=2, d_state=16, headdim=16, vocab_size=259),
  "small": dict(d_model=128, n_layer=2, d_state=128, headdim=32, vocab_size=259),
  # The model benchmark's shape (benchmarks/model_cpu.py).
  "bench-cpu": dict(d_model=256, n_layer=4, d_state=128, headdim=64, vocab_size=1024),
}


def _target_platform() -> str:
  from mamba2_jax.ssd.platform import target_platform  # pylint: disable=g-import-not-at-top

  return target_platform()
