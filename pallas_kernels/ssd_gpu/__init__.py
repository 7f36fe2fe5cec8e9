"""Pallas SSD kernels for NVIDIA GPUs (Triton lowering): ``impl="pallas_gpu"``.

``ops.ssd_gpu_core`` is the core used by ``mamba2_jax.ssd.ssd``; ``kernel`` holds the
``pl.pallas_call`` kernels; ``compile_check`` compiles them for an H100 on a CPU host.
It needs only jax and `mamba2_jax.ssd` (jax-only; no flax), so the compile-check venv has just jax.
"""
