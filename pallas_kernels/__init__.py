"""Pallas SSD kernels of Mamba-2, forward and backward: the cores behind ``impl="pallas_gpu"``
(``ssd_gpu``: Triton lowering) and ``impl="pallas_tpu"`` (``ssd_tpu``: Mosaic).

A leaf package: it imports only jax (numpy, the standard library) and its own modules. The
caller (``mamba2_jax.ssd.ssd``, which loads the cores lazily) passes in what depends on the
target: ``interpret=`` (run the kernels in interpret mode, as on a CPU host) and, for the TPU
core, ``split=`` (TensorCores per device). ``log_decay`` (the cancellation-free log-decay
gradient) and ``padding`` are shared with the chunked XLA path of ``mamba2_jax.ssd``. Each
kernel package has a ``compile_check`` that compiles it ahead of time for a real target.
"""
