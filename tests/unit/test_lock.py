"""One lock for CI and the image: docker/Dockerfile, requirements/lock*.txt and requirements/constraints.txt
agree, and CI and the images install the same way.

- ``requirements/lock.txt`` (uv, ``make lock``) holds every runtime dependency of pyproject.toml at a
  version its range allows, and every pin of ``requirements/constraints.txt``; ``lock-dev.txt`` (CI's venv)
  has the same pins plus the test and dev extras;
- the Dockerfile's stages start from ``python:X.Y.Z`` (its ``BASE_IMAGE`` ARG) with the lock's Python minor
  version; it names the lock's torch/torchvision in its ``TORCH_VERSION``/``TORCHVISION_VERSION`` ARGs
  (the build-time check asserts them) and the CUDA version of the locked CUDA runtime wheel; it installs
  through ``docker/install-env.sh`` (``lock`` from ``requirements/lock.txt``, then ``package``), which
  ``make image-env`` runs the same way;
- ``make venv`` installs ``lock-dev.txt`` and the package with ``--no-deps``.

:func:`disagreements` returns one line per mismatch, so the last test can show that a changed
Dockerfile, lock or constraints file is caught.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("docker/Dockerfile",)  # one image for GPU and CPU nodes (the same lock)
FILES = (
    "pyproject.toml",
    "Makefile",
    ".dockerignore",
    "requirements/lock.txt",
    "requirements/lock-dev.txt",
    "requirements/constraints.txt",
    *DOCKERFILES,
)


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a pip-style lock (``name==version`` lines)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def lock_python(path: Path) -> str | None:
    """The Python version the lock was compiled for (``--python-version`` in uv's header)."""
    m = re.search(r"--python-version\s+(\d+\.\d+)", path.read_text())
    return m.group(1) if m else None


def _requirements(lines: list[str]) -> list[Requirement]:
    return [Requirement(ln) for ln in (ln.split("#")[0].strip() for ln in lines) if ln]


def _check_requirements(reqs: list[Requirement], pins: dict[str, str], where: str, lock: str) -> list[str]:
    out = []
    for req in reqs:
        found = pins.get(canonicalize_name(req.name))
        if found is None:
            out.append(f"{where}: {req.name} is not in {lock}")
        elif not req.specifier.contains(found, prereleases=True):
            out.append(f"{where}: {req} but {lock} pins {req.name}=={found}")
    return out


def disagreements(root: Path) -> list[str]:
    out: list[str] = []
    lock, dev = read_lock(root / "requirements/lock.txt"), read_lock(root / "requirements/lock-dev.txt")
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    out += _check_requirements(_requirements(project["dependencies"]), lock, "pyproject", "lock.txt")
    extras = [r for name in ("test", "dev") for r in project["optional-dependencies"][name]]
    out += _check_requirements(_requirements(extras), dev, "pyproject extras", "lock-dev.txt")
    constraints = _requirements((root / "requirements/constraints.txt").read_text().splitlines())
    out += _check_requirements(constraints, dev, "constraints.txt", "lock-dev.txt")  # lock.txt's pins too
    out += [
        f"lock-dev.txt pins {n}=={dev.get(n)}, lock.txt {n}=={v}" for n, v in lock.items() if dev.get(n) != v
    ]

    python = lock_python(root / "requirements/lock.txt")
    makefile = (root / "Makefile").read_text()
    m = re.search(r"^LOCK_PYTHON := (\S+)", makefile, re.M)
    if (
        python is None
        or m is None
        or m.group(1) != python
        or lock_python(root / "requirements/lock-dev.txt") != python
    ):
        out.append(f"lock Python {python}, lock-dev Python, Makefile LOCK_PYTHON {m and m.group(1)} differ")
    cuda_runtime = lock.get("nvidia-cuda-runtime", "")
    for name in DOCKERFILES:
        text = (root / name).read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
        stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
        for base in re.findall(r"^FROM (\S+)", text, re.M):
            for arg, value in args.items():
                base = base.replace(f"${{{arg}}}", value)
            if base in stages:
                continue
            m = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-\w+", base)
            if not m or m.group(1) != python:
                out.append(f"{name}: base {base} is not python:{python}.x-slim (the lock's Python)")
        for arg, package in (("TORCH_VERSION", "torch"), ("TORCHVISION_VERSION", "torchvision")):
            if args.get(arg) != lock.get(package):
                out.append(
                    f"{name}: ARG {arg}={args.get(arg)} but lock.txt pins {package}=={lock.get(package)}"
                )
        if "TORCH_CUDA" in args and not cuda_runtime.startswith(args["TORCH_CUDA"] + "."):
            out.append(
                f"{name}: ARG TORCH_CUDA={args['TORCH_CUDA']} but the lock's CUDA runtime is {cuda_runtime}"
            )
        if not re.search(r"sh /build/docker/install-env\.sh lock python /build/requirements/lock\.txt", text):
            out.append(f"{name}: does not install through docker/install-env.sh from requirements/lock.txt")
        if not re.search(r"sh /build/docker/install-env\.sh package python /wheels", text):
            out.append(f"{name}: does not install the repa wheel through docker/install-env.sh package")
    if not re.search(r"sh docker/install-env\.sh lock .+/bin/python requirements/lock\.txt", makefile):
        out.append("Makefile: image-env does not run docker/install-env.sh with requirements/lock.txt")
    if not re.search(r"install -q -r requirements/lock-dev\.txt\n.*install -q --no-deps -e \.", makefile):
        out.append(
            "Makefile: the venv does not install requirements/lock-dev.txt, then the package --no-deps"
        )
    admitted = {
        ln[1:].strip() for ln in (root / ".dockerignore").read_text().splitlines() if ln.startswith("!")
    }
    for path in ("requirements/lock.txt", "docker/install-env.sh", "docker/image_check.py"):
        if path not in admitted:
            out.append(f".dockerignore: {path} is not admitted to the build context")
    return out


def test_dockerfiles_lock_and_constraints_agree():
    assert disagreements(ROOT) == []


def test_the_images_get_the_tested_torch_and_its_cuda_build():
    lock = read_lock(ROOT / "requirements/lock.txt")
    assert lock["torch"] == "2.14.1" and lock["torchvision"] == "0.29.1"
    assert lock["nvidia-cuda-runtime"].startswith("13.0.")  # torch 2.14.1's PyPI wheel: CUDA 13.0


def _edit(root: Path, name: str, old: str, new: str) -> None:
    path = root / name
    text = path.read_text()
    assert old in text, (name, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("name", "old", "new", "reported"),
    [
        (
            "docker/Dockerfile",
            "ARG TORCH_VERSION=2.14.1",
            "ARG TORCH_VERSION=2.7.1",
            "ARG TORCH_VERSION=2.7.1",
        ),
        (
            "docker/Dockerfile",
            "FROM python:3.11.13-slim-bookworm AS build",
            "FROM python:3.12.9-slim-bookworm AS build",
            "python:3.12.9",
        ),
        ("docker/Dockerfile", "ARG TORCH_CUDA=13.0", "ARG TORCH_CUDA=12.8", "TORCH_CUDA=12.8"),
        (
            "docker/Dockerfile",
            "lock python /build/requirements/lock.txt",
            "lock python /build/requirements.txt",
            "install-env",
        ),
        ("requirements/lock.txt", "\ntorch==2.14.1\n", "\ntorch==2.13.0\n", "torch==2.13.0"),
        ("requirements/lock-dev.txt", "\ntimm==", "\ntimm==0.9.0\n#", "timm==0.9.0"),
        ("requirements/constraints.txt", "torchvision==0.29.1", "torchvision==0.28.0", "torchvision==0.28.0"),
        ("pyproject.toml", '"timm>=1.0"', '"timm>=9.0"', "timm>=9.0"),
        ("pyproject.toml", '"pyyaml>=6.0",', '"pyyaml>=6.0",\n  "not-locked-yet>=1",', "not-locked-yet"),
        (".dockerignore", "!requirements/lock.txt\n", "", ".dockerignore"),
    ],
    ids=lambda v: v if isinstance(v, str) and "/" in v and len(v) < 40 else None,
)
def test_a_disagreement_is_reported(tmp_path, name, old, new, reported):
    for file in FILES:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / file, tmp_path / file)
    _edit(tmp_path, name, old, new)
    found = disagreements(tmp_path)
    assert any(reported in line for line in found), found
