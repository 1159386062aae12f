"""The release: an sdist and a wheel built as a user would (``python -m build``) that ``twine check``
accepts, with the type marker, the console script and the license in the wheel; installed alone in a
fresh virtual environment, the wheel runs the demo."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytest.importorskip("build")
pytest.importorskip("twine")

# Once, on the default interpreter (.ci/run): the wheel is the same on every Python.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_built_wheel_alone_runs_the_demo_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=400)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        info = next(name.rsplit("/", 1)[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = wheel.read(f"{info}/METADATA").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "zmqexecutor/py.typed" in names and "zmqexecutor/joblib.py" in names
    assert f"{info}/licenses/LICENSE" in names and "License-Expression: MIT" in metadata
    assert "zmqexecutor = zmqexecutor._tools._cli:main" in entry_points
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheels[0])],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # From a folder without the source tree: what runs is the installed wheel.
    version = subprocess.run([str(env / "bin" / "zmqexecutor"), "--version"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("zmqexecutor ")
    demo = subprocess.run([str(python), str(ROOT / "examples" / "demo.py")], capture_output=True, text=True,
                          timeout=200, cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "identical on every executor" in demo.stdout
