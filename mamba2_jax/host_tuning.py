"""`import mamba2_jax.host_tuning`, first thing in a program: tunes the process for its host.

On a CPU-only host (`mamba2_jax.runtime.cpu_only_host`) glibc's malloc keeps XLA:CPU's per-step
scratch memory instead of mapping and page-faulting it in afresh on every call: 1.5x the
training step on a 2-core CPU (`mamba2_jax.runtime.tune_cpu_malloc`). Elsewhere it does
nothing. It must run before numpy or jax are imported (they start threads, and a thread keeps
the malloc arena it started with), hence an import of its own at the top of every binary.
MAMBA2_JAX_TUNE_MALLOC=0 in the environment turns it off. Imports neither numpy nor jax.
"""

from mamba2_jax.runtime import tune_for_this_host

TUNED = tune_for_this_host()  # whether malloc was tuned
