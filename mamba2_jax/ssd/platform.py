"""The platform code is being compiled for (which may differ from the one it runs on).

The SSD op (api.py) decides from it what the Pallas kernels are told: ``impl="auto"``, interpret
mode and the TPU core split; the kernels themselves never look the target up.
"""

from __future__ import annotations

import jax

__all__ = ["target_platform", "target_device_kind"]


def target_platform() -> str:
  """'tpu' / 'gpu' / 'cpu' / ...: the platform of the current mesh context's devices
  (`jax.set_mesh` with e.g. TPU topology devices while compiling ahead of time on a CPU
  host), else `jax.default_backend()`. Decides `impl="auto"` and whether Pallas kernels run
  in interpret mode (exactly when the target is the CPU)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    dev = getattr(mesh, "abstract_device", None)
    platform = getattr(dev, "platform", None)
    if platform:
      return platform
  return jax.default_backend()


def target_device_kind() -> str | None:
  """The device kind code is being compiled for ('TPU v5 lite', 'TPU v5', 'TPU v4', 'cpu',
  ...): of the current mesh context's devices, else of the default backend's first device.
  Decides the TPU kernel's core split (two TensorCores per device on v4 / v5p)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    kind = getattr(getattr(mesh, "abstract_device", None), "device_kind", None)
    if kind:
      return kind
  return jax.devices()[0].device_kind
