"""How long each verb takes to report a config error (issue 20: under 1 s, the config is checked before
the verb's module and torch are imported).

Each case is a fresh interpreter (`python -m repa VERB ...`), as a user's shell or a pod start runs it;
prints, per case, the exit code, the wall time (median of --repeats), whether torch was imported, and
the first line of stderr. The figure in docs/benchmarks.md ("Config errors") comes from this script.

    .venv/bin/python benchmarks/config_errors.py            # 3 fresh interpreters per case
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# (verb arguments) of each case; the first two are issue 20's must-show examples.
CASES = [
    ["train", "--config", "nope"],
    ["train", "--set", "train.max_step=1"],
    [
        "train",
        "--config",
        "sit-b-2-repa",
        "--set",
        "data.url=file:///d",
        "--set",
        "storage.run_url=file:///r",
    ],
    ["sample", "--config", "nope"],
    ["sample", "--set", "sample.num_sample=4"],
    ["eval", "--config", "nope"],
    ["eval", "--config", "sit-b-2-repa", "--set", "eval.reference_stats_url=/r.npz"],
    ["watch", "--config", "nope"],
    ["watch", "--set", "eval.watch_every=2"],
    ["prepare", "images", "--config", "nope", "/in"],
    ["eval-job", "--config", "nope"],
    [
        "config",
        "validate",
        "--config",
        "sit-b-2-repa",
        "--for",
        "train",
        "--set",
        "data.url=/d",
        "--set",
        "storage.run_url=/r",
    ],
]
PROBE = (
    "import sys\n"
    "from repa.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('torch' in sys.modules, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="CI smoke run: --repeats 1, two cases")
    args = parser.parse_args(argv)
    cases = CASES[:2] if args.smoke else CASES
    if args.smoke:
        args.repeats = 1
    print(f"config errors: wall seconds of `repa VERB ...` in a fresh interpreter, median of {args.repeats}")
    for case in cases:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", PROBE, *case], capture_output=True, text=True)
            times.append(time.perf_counter() - started)
        lines = proc.stderr.strip().splitlines()
        torch_loaded = lines.pop() if lines else "?"
        first = lines[0] if lines else ""
        print(
            f"  exit {proc.returncode}  {statistics.median(times):6.2f} s  torch imported: {torch_loaded:5}  "
            f"repa {' '.join(case)}\n      {first[:150]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
