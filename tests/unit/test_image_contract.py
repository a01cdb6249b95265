"""docker/Dockerfile and helm/repa agree on what the pod needs of the image (issue 23): the user the chart
runs as is the image's USER, the chart's commands go through the image's entrypoint `repa` (or a tool the
image installs), and every path the image's ENV sends writes to (HOME's caches, TORCH_HOME, HF_HOME,
triton, matplotlib) lies under a writable emptyDir the chart mounts on its read-only root.

scripts/smoke-image.sh checks the same against the running container (`make image`, CI); this test needs no
container engine, so `make test` catches a drift too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV_PATHS = ("XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR")
# Programs the chart may run instead of the entrypoint: console scripts of the locked environment.
IMAGE_COMMANDS = {"repa", "torchrun", "tensorboard"}


def chart_settings() -> dict[str, str]:
    """scripts/chart_pod.py's reading of `helm template` with the CI's minimal values."""
    rendered = subprocess.run(
        [
            str(Path(sys.executable).parent / "helm"),  # scripts/install-tools.sh (make tools)
            "template",
            "t",
            str(ROOT / "helm/repa"),
            "-f",
            str(ROOT / "helm/repa/ci/minimal.yaml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    repository = re.search(r"image: (\S+?):", rendered).group(1)
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/chart_pod.py"), repository],
        input=rendered,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {k: v.strip("'") for k, v in (line.split("=", 1) for line in out.splitlines())}


def image_settings(dockerfile: str) -> dict:
    """USER, ENTRYPOINT and ENV of the Dockerfile's final image (ENV of every stage it builds on)."""
    env = dict(re.findall(r"^\s*(?:ENV\s+)?(\w+)=(\S+?)\s*\\?$", dockerfile, re.M))
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    entry = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.M)
    return {
        "user": users[-1] if users else "",
        "entrypoint": json.loads(entry[-1]) if entry else [],
        "env": env,
    }


def disagreements(dockerfile: str, chart: dict[str, str]) -> list[str]:
    image = image_settings(dockerfile)
    out = []
    if image["user"] != f"{chart['CHART_UID']}:{chart['CHART_GID']}":
        out.append(f"USER {image['user']!r} but the chart runs as {chart['CHART_UID']}:{chart['CHART_GID']}")
    if image["entrypoint"] != ["repa"]:
        out.append(f"ENTRYPOINT {image['entrypoint']} but the chart and docs expect ['repa']")
    for command in chart["CHART_COMMANDS"].split():
        if command not in IMAGE_COMMANDS:
            out.append(f"the chart runs {command!r}, which the image does not install")
    writable = chart["CHART_WRITABLE"].split()
    for key in ENV_PATHS:
        path = image["env"].get(key)
        if path is None or not any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable):
            out.append(f"ENV {key}={path} is not under a writable path the chart mounts ({writable})")
    return out


@pytest.fixture(scope="module")
def chart() -> dict[str, str]:
    return chart_settings()


def test_dockerfile_and_chart_agree(chart):
    assert chart["CHART_READ_ONLY_ROOT"] == "1"
    assert disagreements((ROOT / "docker/Dockerfile").read_text(), chart) == []


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ("USER 10001:10001", "USER 1000:1000", "USER '1000:1000'"),
        ('ENTRYPOINT ["repa"]', 'ENTRYPOINT ["python", "-m", "repa"]', "ENTRYPOINT"),
        ("XDG_CACHE_HOME=/home/repa/.cache", "XDG_CACHE_HOME=/var/cache/repa", "XDG_CACHE_HOME"),
        ("MPLCONFIGDIR=/tmp/matplotlib", "MPLCONFIGDIR=/etc/matplotlib", "MPLCONFIGDIR"),
    ],
)
def test_a_drift_is_reported(chart, old, new, reported):
    text = (ROOT / "docker/Dockerfile").read_text()
    assert old in text
    problems = disagreements(text.replace(old, new), chart)
    assert len(problems) == 1 and reported in problems[0], problems
