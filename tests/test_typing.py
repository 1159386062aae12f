"""The public API is typed: mypy --strict passes on the package, and py.typed ships."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

# Run once, on the default interpreter; .ci/run skips these on the other Pythons (see pyproject.toml).
pytestmark = pytest.mark.slow


def test_py_typed_marker_ships() -> None:
    assert (ROOT / "zmqexecutor" / "py.typed").is_file()
    assert "py.typed" in (ROOT / "setup.cfg").read_text()


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean() -> None:
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "zmqexecutor"], cwd=ROOT,
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
