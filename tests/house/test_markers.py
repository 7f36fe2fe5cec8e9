"""The quick selection's module list (tests/conftest.py) names modules that exist."""

from tests.conftest import NOT_QUICK_MODULES
from tests.paths import ROOT


def test_not_quick_modules_exist():
  missing = sorted(m for m in NOT_QUICK_MODULES if not (ROOT / m).is_file())
  assert not missing, f"tests/conftest.py NOT_QUICK_MODULES names missing modules: {missing}"
