"""SSD (state-space duality) scan for Mamba-2: public op, oracle and chunked XLA path."""

from .api import (
  available_impls,
  register_impl,
  resolve_impl,
  set_auto_impl,
  ssd,
  ssd_chunked,
  ssd_reference,
)
from .common import prepare_dt

__all__ = [
  "ssd",
  "ssd_reference",
  "ssd_chunked",
  "prepare_dt",
  "register_impl",
  "set_auto_impl",
  "available_impls",
  "resolve_impl",
]
