"""Every benchmark under benchmarks/ runs: a smoke run per script, found by listing the folder.

A script is a ``*.sh`` file or a ``*.py`` file with an ``if __name__ == "__main__"`` block, anywhere
under ``benchmarks/``; a new one is covered without editing this file. The convention
(docs/benchmarks.md, "Smoke runs"): every script accepts ``--smoke``, which picks tiny arguments and
the CPU, finishes in seconds and prints the same figures as a real run; it must exit 0 and print at
least one number. ``benchmarks/gpu.sh --smoke`` is its CPU dry run (tiny SiT and encoder, the same
sequence of steps as on a GPU). Python files without a main block are modules and must import.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
_MAIN = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.M)
_FIGURE = re.compile(r"\d+\.\d+|\d+ ?(?:%|ms|s\b|MiB|GiB|img/s)")


def _files(suffix: str) -> list[Path]:
    return sorted(p for p in BENCHMARKS.rglob(f"*{suffix}") if "__pycache__" not in p.parts)


SCRIPTS = [p for p in _files(".sh")] + [p for p in _files(".py") if _MAIN.search(p.read_text())]
MODULES = [p for p in _files(".py") if p not in SCRIPTS]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_listing_finds_the_known_benchmarks():
    names = {_id(p) for p in SCRIPTS}
    assert {"benchmarks/gpu.sh", "benchmarks/trainer_step.py", "benchmarks/convergence/run.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=_id)
def test_benchmark_smoke_run(script: Path, tmp_path: Path):
    command = ["bash", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHON": sys.executable,  # what the shell scripts run
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path),  # scratch files (shards, runs) go where pytest cleans up
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(
        [*command, "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    where = f"{_id(script)} --smoke"
    assert "unrecognized arguments: --smoke" not in proc.stderr, (
        f"{where}: every benchmark must accept --smoke (tiny arguments, CPU, seconds): docs/benchmarks.md"
    )
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{output}"
    assert _FIGURE.search(proc.stdout), f"{where} printed no figures:\n{proc.stdout[-3000:]}"
    if script.name == "gpu.sh":  # the dry run walks the GPU run's whole sequence and prints its figures
        for line in ("images/s", "MFU", "peak memory", "sde        cfg 1.8 on [0,0.7]"):
            assert line in proc.stdout, f"{where}: no {line!r} in\n{proc.stdout}"


@pytest.mark.parametrize("module", MODULES, ids=_id)
def test_benchmark_module_imports(module: Path):
    name = ".".join(module.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    importlib.import_module(name)
