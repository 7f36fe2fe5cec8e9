"""Pallas SSD kernels for NVIDIA GPUs (Triton lowering): ``impl="pallas_gpu"``.

``ops.ssd_gpu_core`` is the core used by ``mamba2_jax.ssd.ssd``; ``kernel`` holds the
``pl.pallas_call`` kernels; ``compile_check`` compiles them for an H100 on a CPU host.
It imports only jax and `pallas_kernels`, so the compile-check venv needs just jax.
"""
