"""The model's public methods run compiled when called directly.

`model(tokens)`, `model.prefill(...)` and `model.decode_step(...)` are decorated with
:func:`compiled_method`. Called outside any JAX transformation, a method runs as one cached XLA
program: compiled once per method and input shapes/dtypes, then dispatched with the model's
current parameter arrays (read from the model's Variables, kept in a list at the first call, so
a call costs no graph traversal: about 0.1 ms of Python for the tiny model, beside NNX's 1-2 ms
for `nnx.jit` and 400 ms for eager op-by-op dispatch of a decode step). Inside a
transformation (`jax.jit`, `nnx.jit`, `grad`, `vmap`, ...) the method runs as written, so it
composes with a user's own jit.

Parameter values set in place (`nnx.update`, `variable[...] = x`, an optimizer step) are seen
by the next call. Replacing a Variable or submodule object after the first call is not: call
:func:`forget` after doing so.

Stacked layers (`compiled_method(unstack="layers")`, used by `decode_step`): on a CPU, XLA
copies a layer's slice of a stacked weight before each matmul that reads it, so a decode step
would write and read every weight once more per token (29 -> 14 MB moved per token for the
bench-cpu model; times in docs/benchmarks.md). There the first call also keeps a per-layer
copy of each stacked parameter of at most UNSTACK_MAX_BYTES in all (remade when the
parameter's array is replaced, e.g. by an optimizer step; freed by :func:`forget`), the
compiled program restacks the copies, and XLA folds each layer's slice of the restacked array into that layer's copy:
no per-call copy is left. The method must then visit the layers with static indices (a fully
unrolled layer scan).
"""

from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

from mamba2_jax.ssd.platform import target_platform

try:
  from jax.core import trace_state_clean as _outside_traces
except ImportError:  # pragma: no cover - older/newer JAX layouts
  from jax._src.core import trace_state_clean as _outside_traces

__all__ = ["compiled_method", "forget", "unstack", "unstack_layers", "UNSTACK_MAX_BYTES"]

# Per-layer copies cost the stacked parameters' memory once more: kept only up to this size
# (the 370m model's layers in fp32 are 1.4 GiB), above it a call copies the slices it reads.
UNSTACK_MAX_BYTES = 2 << 30

_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unstack_layers(stacked) -> bool:
  """Whether layers stacked in ``stacked`` (a pytree of arrays or tracers) are better read
  as per-layer copies where the code is compiled for: on a CPU, up to UNSTACK_MAX_BYTES."""
  size = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(stacked))
  return target_platform() == "cpu" and 0 < size <= UNSTACK_MAX_BYTES


class _Compiled:
  """A model's Variables in the order of its state's leaves, and its graph definition."""

  def __init__(self, model):
    graphdef, state = nnx.split(model)
    self.graphdef = _Static(graphdef)
    by_path = {p: v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    paths = [p for p, _ in nnx.to_flat_state(state)]
    self.variables = [by_path[p] for p in paths]
    self.treedef = jax.tree.structure(state)
    self.heads = tuple(p[0] for p in paths)  # the attribute each leaf lives under
    self._masks: dict[str, tuple[bool, ...]] = {}  # attr -> leaves to unstack, () for none
    self._copies: dict[int, tuple] = {}  # leaf index -> (weakref to the stacked array, copies)

  def leaves(self) -> list:
    return [v.get_raw_value() for v in self.variables]

  def unstacked(self, attr: str) -> tuple[tuple[bool, ...] | None, list]:
    """(mask, leaves) with each stacked leaf under ``attr`` given as its per-layer copies
    (module docstring); mask None where nothing is unstacked."""
    leaves = self.leaves()
    mask = self._masks.get(attr)
    if mask is None:  # decided once per model: about 0.3 ms of Python per call otherwise
      mask = tuple(h == attr for h in self.heads)
      if not unstack_layers([a for a, m in zip(leaves, mask) if m]):
        mask = ()
      self._masks[attr] = mask
    if not mask:
      return None, leaves
    for i, m in enumerate(mask):
      if m:
        ref, copies = self._copies.get(i, (None, None))
        if ref is None or ref() is not leaves[i]:
          copies = _unstack(leaves[i])
          self._copies[i] = (weakref.ref(leaves[i]), copies)
        leaves[i] = copies
    return mask, leaves


def unstack(a) -> tuple:
  """A stacked array's per-layer copies (slices of its leading axis); `jnp.stack` restacks."""
  return tuple(a[i] for i in range(a.shape[0]))


_unstack = jax.jit(unstack)


class _Static:
  """A static jit argument hashed once: NNX hashes a GraphDef anew on every call (0.7 ms per
  decode step for the bench-cpu model), jit's cache hashes its static arguments per call."""

  __slots__ = ("value", "_hash")

  def __init__(self, value):
    self.value, self._hash = value, hash(value)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (
      isinstance(other, _Static) and self._hash == other._hash and self.value == other.value
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run(graphdef, treedef, name, mask, leaves, args, kwargs):
  if mask is not None:  # restack per-layer copies (module docstring)
    leaves = [jnp.stack(a) if m else a for a, m in zip(leaves, mask)]
  model = nnx.merge(graphdef.value, jax.tree.unflatten(treedef, leaves))
  return getattr(model, name)(*args, **kwargs)


def compiled_method(method=None, *, unstack: str | None = None):
  """Decorator of a model method (module docstring). The method must not change the model.
  ``unstack``: the attribute holding layers stacked on a leading axis, passed per layer on a
  CPU (module docstring)."""
  if method is None:
    return functools.partial(compiled_method, unstack=unstack)
  name = method.__name__

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    if not _outside_traces():
      return method(self, *args, **kwargs)
    compiled = _MODELS.get(self)
    if compiled is None:
      compiled = _MODELS[self] = _Compiled(self)
    if unstack is None:
      mask, leaves = None, compiled.leaves()
    else:
      mask, leaves = compiled.unstacked(unstack)
    return _run(compiled.graphdef, compiled.treedef, name, mask, leaves, args, kwargs)

  wrapper.uncompiled = method
  return wrapper


def forget(model) -> None:
  """Drops what the first compiled call of ``model`` recorded (after replacing submodules)."""
  _MODELS.pop(model, None)
