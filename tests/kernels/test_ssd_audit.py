"""The SSD traffic/work audit (benchmarks/ssd_audit.py) for one real case per target.

Runs the audit's worker for the 130m layer at L = 2048, forward + backward, in .venv-tpu (TPU
v5e, Mosaic kernels) and .venv-cuda (deviceless H100, Triton kernels) in a subprocess like the
other compile tests (skipped when the venv is absent), and checks that the bytes and dot FLOPs
per token stay within [0.5x, 1.3x] of the values recorded below: a change that doubles the
traffic or the work fails, and so does a broken measurement that reports (near) zero.
Update RECORDED from ``.venv/bin/python benchmarks/ssd_audit.py --cases 130m-L2048
--modes fwd+bwd`` (columns B/token and dot FLOP/token) after an intended change.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import ssd_audit
from tests.venv_subprocess import run_module, venv_python

CASE, MODE = "130m-L2048", "fwd+bwd"
LOW, HIGH = 0.5, 1.3
# target: (bytes per token (kernels + XLA ops), kernel dot FLOPs per token)
RECORDED = {
  "tpu": (38107, 6.16e6),
  "gpu": (78411, 9.14e6),
}


def _audit(target):
  py = venv_python(ssd_audit.VENVS[target])
  env = {
    "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
    "TF_CPP_MIN_LOG_LEVEL": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
  }  # other libtpu processes may be compiling
  p = run_module(
    py,
    "benchmarks.ssd_audit",
    "--worker",
    target,
    "--cases",
    CASE,
    "--modes",
    MODE,
    timeout=900,
    extra_env=env,
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  (r,) = json.loads(p.stdout)["results"]
  assert "error" not in r, r["error"]
  return ssd_audit.summarize(r)


def _check(target):
  r = _audit(target)
  assert r["kernels"] and all(k.get("dot_flops") for k in r["kernels"]), r["kernels"]
  rec_bytes, rec_flops = RECORDED[target]
  got = (r["bytes_per_token"], r["flops_per_token"])
  print(f"{target} {CASE} {MODE}: {got[0]:.0f} B/token, {got[1] / 1e6:.2f} MFLOP/token")
  assert LOW * rec_bytes <= got[0] <= HIGH * rec_bytes, (got, RECORDED[target])
  assert LOW * rec_flops <= got[1] <= HIGH * rec_flops, (got, RECORDED[target])
  return r


@pytest.mark.tpu_compile
@pytest.mark.skipif(
  not venv_python(".venv-tpu").exists(), reason="no .venv-tpu: run scripts/setup_tpu_venv.sh"
)
def test_tpu_audit_within_recorded_traffic_and_flops():
  _check("tpu")


@pytest.mark.cuda_compile
@pytest.mark.skipif(
  not venv_python(".venv-cuda").exists(), reason="no .venv-cuda: run scripts/setup_cuda_venv.sh"
)
def test_gpu_audit_within_recorded_traffic_and_flops():
  r = _check("gpu")
  # ptxas -v and the thunk sequence were read for every Triton kernel
  assert all(k.get("regs") and k.get("smem") is not None for k in r["kernels"]), r["kernels"]
