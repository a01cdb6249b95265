"""How long `repa config show` takes and how much memory it needs (a torch-free code path).

Each run is a fresh interpreter (`python -m repa config show --config PRESET`), as a user or the Helm
chart's pod start would run it; prints wall time (median, min, max) and peak RSS, and whether torch was
imported. The figure in docs/benchmarks.md ("Config CLI") comes from this script.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PROBE = (
    "import sys, io, contextlib, resource\n"
    "from repa.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    code = main(['config', 'show', '--config', {preset!r}])\n"
    "print(code, 'torch' in sys.modules, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sit-xl-2-repa")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="CI smoke run: --repeats 1")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    times, rss, torch_loaded = [], [], False
    for _ in range(args.repeats):
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", PROBE.format(preset=args.preset)],
            capture_output=True,
            text=True,
            check=True,
        )
        times.append(time.perf_counter() - started)
        code, loaded, maxrss_kib = proc.stdout.split()
        assert code == "0", proc.stderr
        torch_loaded |= loaded == "True"
        rss.append(int(maxrss_kib) / 1024)
    print(f"repa config show --config {args.preset}: {args.repeats} fresh interpreters")
    print(f"  wall s   median {statistics.median(times):.3f}  min {min(times):.3f}  max {max(times):.3f}")
    print(f"  peak RSS {max(rss):.0f} MiB   torch imported: {torch_loaded}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
