"""Public SSD op and implementation dispatch.

Every implementation is a *core* ``core(prepared, *, chunk_size) -> (y, final_state)``
receiving :class:`~mamba2_jax.ssd.common.Prepared` tensors (dt already processed in
fp32/fp64, segment ids already normalised to run indices) and returning y without
the D skip term (in the accumulation dtype) and the final state. The prologue
(dt bias/softplus/clip, segment runs) and epilogue (D skip, casts) live here and
are differentiated by XLA, so a kernel with a hand-written VJP only has to cover
the scan itself.

New implementations register with :func:`register_impl` and, to become the
``"auto"`` choice on a backend, :func:`set_auto_impl`.

:func:`ssd` is the one entry of the model, with or without a mesh: under a multi-device mesh
context (``jax.set_mesh``) a Pallas impl, which XLA cannot partition, runs per shard through
:func:`mamba2_jax.ssd.sharded.sharded_ssd`. The Pallas cores are told what depends on the
target (platform.py): interpret mode exactly when compiling for the CPU, and the TPU core's
split over the TensorCores of the target device.

State-collapse mitigations (paper §3): ``dt_scale`` and ``log_decay_offset`` are applied in
the shared prologue (``Prepared.dt`` and ``Prepared.dA``), so every core honours them;
``window`` is passed to the cores that support it (``WINDOW_IMPLS``) as ``window=r``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from . import common
from .chunked import chunked_core
from .platform import target_device_kind, target_platform
from .reference import reference_core

__all__ = [
  "ssd",
  "register_impl",
  "set_auto_impl",
  "available_impls",
  "resolve_impl",
  "PALLAS_IMPLS",
  "WINDOW_IMPLS",
]

_IMPLS: dict[str, Callable] = {
  "reference": reference_core,
  "xla": chunked_core,
}

# Pallas kernels live in the top-level `pallas_kernels` package and are imported on first use.
# Their cores take the target as arguments (``_kernel_kwargs``): ``interpret`` and, on TPU,
# ``split``.
_LAZY: dict[str, tuple[str, str]] = {
  "pallas_gpu": ("pallas_kernels.ssd_gpu.ops", "ssd_gpu_core"),
  "pallas_tpu": ("pallas_kernels.ssd_tpu.ops", "ssd_tpu_core"),
}

# backend platform -> impl used by impl="auto"; "*" is the fallback. ROCm stays on XLA: the
# Triton kernels are compile-checked for CUDA (sm_90) only.
_AUTO: dict[str, str] = {
  "cpu": "xla",
  "gpu": "pallas_gpu",
  "cuda": "pallas_gpu",
  "rocm": "xla",
  "tpu": "pallas_tpu",
  "*": "xla",
}
PALLAS_IMPLS = frozenset(_LAZY)
# impls whose core takes ``window=r`` (the sliding window by state difference)
WINDOW_IMPLS = {"reference", "xla"}
# impls whose core fuses the D skip: given ``D=`` ((H, P) in the accumulation dtype) it returns
# y + D x (and may return y in the input dtype)
SKIP_IMPLS = {"pallas_gpu", "pallas_tpu"}


def register_impl(
  name: str,
  core: Callable,
  *,
  overwrite: bool = False,
  supports_window: bool = False,
  fuses_skip: bool = False,
) -> None:
  """Register an implementation core under ``name`` (see module docstring).

  ``supports_window``: the core accepts ``window=r`` (int >= 1) as a keyword argument.
  ``fuses_skip``: the core accepts ``D=`` ((H, P) in the accumulation dtype, or None) and
  returns y + D x (e.g. a variant of the Pallas cores).
  Cores must take the per-token log-decay from ``Prepared.dA`` (dt * A + log_decay_offset),
  not recompute dt * A, or ``log_decay_offset`` is silently lost.
  """
  if name == "auto":
    raise ValueError("ssd: 'auto' is reserved")
  if name in _IMPLS and not overwrite:
    raise ValueError(f"ssd: impl {name!r} is already registered")
  _IMPLS[name] = core
  for impls, on in ((WINDOW_IMPLS, supports_window), (SKIP_IMPLS, fuses_skip)):
    if on:
      impls.add(name)
    else:
      impls.discard(name)


def set_auto_impl(platform: str, name: str) -> None:
  """Make ``impl='auto'`` choose ``name`` on backend ``platform`` ('cpu', 'gpu', 'tpu', '*')."""
  if name not in _IMPLS and name not in _LAZY:
    raise ValueError(f"ssd: unknown impl {name!r}; registered: {sorted(set(_IMPLS) | set(_LAZY))}")
  _AUTO[platform] = name


def available_impls() -> tuple[str, ...]:
  return ("auto", *sorted(set(_IMPLS) | set(_LAZY)))


def _load(name: str) -> Callable:
  if name not in _IMPLS and name in _LAZY:
    import importlib

    module, attr = _LAZY[name]
    _IMPLS[name] = getattr(importlib.import_module(module), attr)
  return _IMPLS[name]


def _kernel_kwargs(name: str, interpret) -> dict:
  """What a Pallas core is told about the target: ``interpret`` (None: exactly when compiling
  for the CPU) and, for the TPU core, ``split`` = the TensorCores of the target device."""
  if name not in _LAZY:
    return {}
  kw = {"interpret": target_platform() == "cpu" if interpret is None else interpret}
  if name == "pallas_tpu":
    from pallas_kernels.ssd_tpu.ops import tensorcores

    kw["split"] = tensorcores(target_device_kind())
  return kw


def _shard_mesh(name: str):
  """The mesh to run impl ``name`` per shard under, or None, under a multi-device mesh context
  outside a shard_map (no manual axes): a Pallas impl (which XLA cannot partition), or any impl
  when the mesh splits the sequence (a "context" axis of size > 1: the shards pass states)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return None
  context = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("context", 1) > 1
  return mesh if (name in PALLAS_IMPLS or context) else None


def resolve_impl(impl: str, *, window: int | None = None) -> str:
  """Map ``impl`` (possibly 'auto') to a registered implementation name.

  With ``window`` set, 'auto' falls back to 'xla' where the backend's choice has no
  sliding-window support (the Pallas impls).
  """
  if impl == "auto":
    platform = target_platform()
    name = _AUTO.get(platform, _AUTO["*"])
    if window is not None and name not in WINDOW_IMPLS:
      name = "xla"
    return name
  if not isinstance(impl, str) or (impl not in _IMPLS and impl not in _LAZY):
    raise ValueError(f"ssd: unknown impl={impl!r}; allowed values: {list(available_impls())}")
  return impl


def ssd(
  x,
  dt,
  A,
  B,
  C,
  *,
  D=None,
  dt_bias=None,
  dt_softplus=True,
  dt_limit=(0.0, float("inf")),
  chunk_size=256,
  initial_state=None,
  segment_ids=None,
  return_final_state=False,
  impl="auto",
  interpret=None,
  dt_scale=1.0,
  log_decay_offset=0.0,
  window=None,
  state_hook=None,
):
  """Mamba-2 structured state-space duality (SSD) scan.

  Args:
    x: (b, L, H, P) inputs. dt: (b, L, H) raw step sizes. A: (H,) negative decay
      rates (computed in fp32). B, C: (b, L, G, N); head h uses group h // (H // G).
    D: (H,) or (H, P) skip, or None. dt_bias: (H,) or None.
    dt_softplus: apply softplus to dt + dt_bias. dt_limit: clip range for dt.
    chunk_size: chunk length Q of the chunked implementations.
    initial_state: (b, H, P, N) state before position 0 (first segment only).
    segment_ids: (b, L) int; the state resets wherever the id changes.
    return_final_state: also return the state after the last token.
    impl: 'auto', 'reference' (per-token scan oracle), 'xla' (chunked),
      'pallas_gpu', 'pallas_tpu' (Pallas kernels), plus any registered later. Under a
      multi-device mesh context (``jax.set_mesh``, no manual axes) the Pallas impls run per
      shard (``sharded.sharded_ssd``: batch over "data"/"fsdp", heads over "tensor").
    interpret: Pallas impls only: run the kernel in interpret mode (None = exactly when
      compiling for the CPU).
    dt_scale: s > 0, multiplies the processed dt (LongMamba-style; scales decay and
      insertion). All impls.
    log_decay_offset: o <= 0 added to dt_t * A at every real position (RRI: o = log c_a,
      i.e. alpha_t *= c_a; padded positions stay identity steps). All impls.
    window: sliding window r >= 1 by state difference (paper eq. 8), or None: y_t reads
      h_t - alpha_{t-r+1:t} h_{t-r}, i.e. only positions t-r+1..t contribute; the D skip
      and the returned final state are unchanged. ``initial_state`` is the contribution
      of position -1 (h_{-1}; h_s = 0 for s < -1): it reaches y_t only for t <= r - 2.
      No subtraction across a segment start. Impls 'reference' and 'xla' (both
      differentiable); 'auto' then resolves to one of them; the Pallas impls raise.
    state_hook: impl 'reference' only, not with ``window``: h -> h applied to the state
      (b, H, P, N) after every token, once y_t is read (token-level state normalization);
      the returned final state is the hooked one.

  Per head (fp32 math): dt_t = s * clip(softplus(dt_raw + dt_bias), *dt_limit);
  h_t = exp(dt_t A + o) h_{t-1} + dt_t x_t (outer) B_t; y_t = h_t C_t + D x_t.
  (RRI's insertion scale c_b is no op argument: scale B by c_b before the call, as the
  mixer does.)

  Returns:
    y (b, L, H, P) in x.dtype, and with ``return_final_state`` the final state
    (b, H, P, N) in float32 (float64 when the inputs are float64).
  """
  common.validate_mitigations(dt_scale, log_decay_offset, window)
  name = resolve_impl(impl, window=window)
  if window is not None and name not in WINDOW_IMPLS:
    raise ValueError(
      f"ssd: window= is supported by impl {sorted(WINDOW_IMPLS)} (and 'auto', which then "
      f"uses 'xla'), not by impl={name!r}"
    )
  if state_hook is not None and name != "reference":
    raise ValueError(f"ssd: state_hook= needs impl='reference', not impl={name!r}")
  mesh = _shard_mesh(name)
  if mesh is not None:  # per shard; the call inside the shard_map has manual axes
    from .sharded import sharded_ssd

    fn = sharded_ssd(
      mesh,
      ssd,
      impl=name,
      dt_softplus=dt_softplus,
      dt_limit=dt_limit,
      chunk_size=chunk_size,
      return_final_state=return_final_state,
      interpret=interpret,
      dt_scale=dt_scale,
      log_decay_offset=log_decay_offset,
      window=window,
    )
    return fn(
      x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=initial_state, segment_ids=segment_ids
    )
  common.validate(x, dt, A, B, C, D, dt_bias, initial_state, segment_ids, chunk_size, dt_limit)
  x = jnp.asarray(x)
  prep = common.prepare_inputs(
    x,
    dt,
    A,
    B,
    C,
    dt_bias=dt_bias,
    dt_softplus=dt_softplus,
    dt_limit=dt_limit,
    initial_state=initial_state,
    segment_ids=segment_ids,
    dt_scale=dt_scale,
    log_decay_offset=log_decay_offset,
  )
  core = _load(name)
  extra = _kernel_kwargs(name, interpret)
  if window is not None:
    extra["window"] = window
  if state_hook is not None:
    extra["state_hook"] = state_hook
  fuse_skip = name in SKIP_IMPLS and D is not None
  if fuse_skip:
    D_ = jnp.asarray(D).astype(prep.acc)
    extra["D"] = jnp.broadcast_to(D_.reshape(D_.shape[0], -1), x.shape[2:])
  y, final = core(prep, chunk_size=chunk_size, **extra)
  if not fuse_skip:
    y = common.apply_skip(y, prep.x, D, prep.acc)
  y = y.astype(x.dtype)
  if return_final_state:
    return y, final.astype(prep.acc)
  return y
