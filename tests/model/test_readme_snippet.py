"""The README's library snippet (also in docs/model_and_ssd.md) runs as written."""

import re
import sys

import pytest

from tests.paths import ROOT

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _snippet(rel: str) -> str:
  return BLOCK.search((ROOT / rel).read_text(encoding="utf-8")).group(1)


def test_the_docs_repeat_the_readme_snippet():
  assert _snippet("README.md") == _snippet("docs/model_and_ssd.md")


@pytest.mark.slow
def test_readme_snippet_runs(monkeypatch):
  import numpy as np

  from mamba2_jax import runtime

  # the snippet's first line tunes malloc on CPU hosts: off for the test process
  monkeypatch.setenv("MAMBA2_JAX_TUNE_MALLOC", "0")
  monkeypatch.setattr(runtime, "_TUNED", [])
  monkeypatch.delitem(sys.modules, "mamba2_jax.host_tuning", raising=False)
  scope = {}
  exec(compile(_snippet("README.md"), "README.md", "exec"), scope)
  assert sys.modules["mamba2_jax.host_tuning"].TUNED is False
  assert scope["out"].shape == (2, 32) and scope["loss"].shape == ()
  assert np.isfinite(float(scope["loss"]))
