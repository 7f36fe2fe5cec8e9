"""AOT compile checks for TPU (v5e topology) from this CPU host: the Mosaic SSD kernels and the
full sharded train step.

Run ``scripts/setup_tpu_venv.sh`` first (the project + jax[tpu] with libtpu from PyPI in
.venv-tpu); these tests run ``python -m pallas_kernels.ssd_tpu.compile_check`` and
``python -m experiments.train_compile`` in that venv in a subprocess (libtpu must not be loaded
into the test process) and skip when the venv is absent.
Deselect with ``-m 'not tpu_compile'``.
"""

from __future__ import annotations

import sys

import pytest

from tests.venv_subprocess import run_module, venv_python

PY = venv_python(".venv-tpu")

pytestmark = [
  pytest.mark.tpu_compile,
  pytest.mark.skipif(not PY.exists(), reason="no .venv-tpu: run scripts/setup_tpu_venv.sh"),
]


def _run(*args, timeout=900):
  p = run_module(PY, "pallas_kernels.ssd_tpu.compile_check", *args, timeout=timeout)
  sys.stdout.write(p.stdout)
  return p


def test_tpu_compile_published_and_tiny_shapes():
  p = _run()
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
  assert "ALL COMPILED" in p.stdout
  for name in (
    "tiny",
    "130m-L2048-bf16",
    "130m-L4096-bf16-seg",
    "2.7b-L2048-bf16",
    "bf16-Q104",
    "hd32-packed",
    "hd128-N256",
  ):
    assert f"| {name} " in p.stdout
  assert p.stdout.count("| yes ") >= 16  # every case, fwd and fwd+bwd


# v5p stands for the two-TensorCore chips: v4 takes the same core split (`--topology=v4:2x2x1`
# of the compile check compiles it; dropped here to keep CI under its time budget)
@pytest.mark.parametrize("topology", ["v5p:2x2x1"])
def test_tpu_compile_megacore_topologies(topology):
  """v5p (two TensorCores per device: the kernels split each group's head blocks over them, see
  ssd_tpu.ops.core_split) compiles the tiny and published shapes."""
  p = _run("--topology", topology, "--cases", "tiny,130m-L2048-bf16,2.7b-L2048-bf16")
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
  assert "ALL COMPILED" in p.stdout and p.stdout.count("| yes ") == 6


def test_tpu_compile_rejects_misaligned_block():
  """Negative controls: the same kernel with a 12-row chunk (Pallas/Mosaic (8, 128) rule) and
  with blocks over the 128 MiB of VMEM (TPU backend compiler) is rejected here."""
  p = _run("--negative")
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
  assert "misaligned block (Q=12) REJECTED as expected" in p.stdout
  assert "blocks over VMEM REJECTED as expected (backend compiler)" in p.stdout


def _train_compile(*args, timeout=900):
  return run_module(PY, "experiments.train_compile", *args, timeout=timeout)


@pytest.mark.parametrize(
  "variant,extra",
  [
    ("tiny", []),
    ("130m", ["--config.global_batch_size=4"]),  # 1 x 8192 tokens per chip, bf16, remat
  ],
)
def test_train_step_compiles_for_tpu(variant, extra):
  """The full sharded train step (Mosaic SSD kernels inside) compiles for v5e:2x2 and fits."""
  p = _train_compile(f"--config=configs/train.py:{variant}", "--topology=v5e:2x2", *extra)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "train_compile: OK" in p.stdout and "ssd_impl=pallas_tpu" in p.stdout
  # no noise on a CPU host: libtpu's worker-hostname error, jax's backends it does not find
  assert "hostname" not in p.stderr and "Unable to initialize backend" not in p.stderr, p.stderr
  n = int(p.stdout.split(" Mosaic kernel calls")[0].rsplit(", ", 1)[1])
  assert n >= 2  # the SSD forward and backward kernels
  sys.stdout.write(p.stdout)


def test_train_compile_rejects_a_config_that_does_not_fit():
  p = _train_compile(
    "--config=configs/train.py:130m",
    "--topology=v5e:2x2",
    "--config.global_batch_size=4",
    "--config.seq_len=32768",
    "--config.model.remat_policy=none",
  )
  assert p.returncode == 1
  assert "RESOURCE_EXHAUSTED" in p.stderr or "DOES NOT FIT" in p.stderr
