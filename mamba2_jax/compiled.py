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
"""

from __future__ import annotations

import functools
import weakref

import jax
from flax import nnx

try:
  from jax.core import trace_state_clean as _outside_traces
except ImportError:  # pragma: no cover - older/newer JAX layouts
  from jax._src.core import trace_state_clean as _outside_traces

__all__ = ["compiled_method", "forget"]

_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Compiled:
  """A model's Variables in the order of its state's leaves, and its graph definition."""

  def __init__(self, model):
    graphdef, state = nnx.split(model)
    self.graphdef = _Static(graphdef)
    by_path = {p: v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    self.variables = [by_path[p] for p, _ in nnx.to_flat_state(state)]
    self.treedef = jax.tree.structure(state)

  def leaves(self) -> list:
    return [v.get_raw_value() for v in self.variables]


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


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(graphdef, treedef, name, leaves, args, kwargs):
  model = nnx.merge(graphdef.value, jax.tree.unflatten(treedef, leaves))
  return getattr(model, name)(*args, **kwargs)


def compiled_method(method):
  """Decorator of a model method (module docstring). The method must not change the model."""
  name = method.__name__

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    if not _outside_traces():
      return method(self, *args, **kwargs)
    compiled = _MODELS.get(self)
    if compiled is None:
      compiled = _MODELS[self] = _Compiled(self)
    return _run(compiled.graphdef, compiled.treedef, name, compiled.leaves(), args, kwargs)

  wrapper.uncompiled = method
  return wrapper


def forget(model) -> None:
  """Drops what the first compiled call of ``model`` recorded (after replacing submodules)."""
  _MODELS.pop(model, None)
