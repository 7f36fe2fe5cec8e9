"""Deviceless AOT compile checks of the Pallas/Triton SSD kernels for an H100 from this CPU host.

Run ``scripts/setup_cuda_venv.sh`` first (jax[cuda13] in .venv-cuda); these tests run
``python -m pallas_kernels.ssd_gpu.compile_check`` in that venv in a subprocess (the CUDA
plugin must not be loaded into the test process) and skip when the venv is absent.
Deselect with ``-m 'not cuda_compile'``.
"""

from __future__ import annotations

import sys

import pytest

from tests.venv_subprocess import run_module, venv_python

PY = venv_python(".venv-cuda")

pytestmark = [
  pytest.mark.cuda_compile,
  pytest.mark.skipif(not PY.exists(), reason="no .venv-cuda: run scripts/setup_cuda_venv.sh"),
]


def _run(*args, timeout=1800):
  p = run_module(
    PY,
    "pallas_kernels.ssd_gpu.compile_check",
    *args,
    timeout=timeout,
    extra_env={"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"},
  )
  sys.stdout.write(p.stdout)
  return p


# One case per distinct kernel configuration (each is a full Triton compile + ptxas, ~15 s): fp32
# and bf16, segments + initial state, a forced non-power-of-two head block, grouped heads with
# head blocks of 2, the 130m and the largest (2.7b, L 8192) layer. The module run without
# --cases compiles every case of its table (docs/kernels.md).
CASES = (
  "tiny-hb3",
  "tiny-g2-hb2-bf16",
  "130m-L2048-fp32",
  "130m-L4096-bf16-seg",
  "2.7b-L8192-bf16",
)


def test_cuda_compile_published_and_tiny_shapes():
  """Representative cases (tiny, 130m and 2.7b layer shapes), forward and forward+backward,
  compile; the negative control (the forward kernel with a 512-row block exceeds the H100's
  shared memory) is rejected."""
  p = _run("--cases", ",".join(CASES))
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
  assert "all compiled for H100" in p.stdout
  lines = [ln for ln in p.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in CASES]
  assert len(lines) == 2 * len(CASES) and all(" yes " in ln for ln in lines), "\n".join(lines)
  assert "rejected as expected" in p.stdout and "RESOURCE_EXHAUSTED" in p.stdout
