"""Pallas SSD kernels (GPU via Triton, TPU via Mosaic), registered as `mamba2_jax.ssd.ssd` impls.

Empty until the Pallas-kernel issue lands; `mamba2_jax.ssd` dispatches to its reference and
chunked XLA paths meanwhile.
"""
