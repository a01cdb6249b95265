"""Compare two runs' FID-vs-step curves: the REPA-vs-vanilla A/B (docs/ab-test.md).

    python -m repa.ab_compare RUN_URL_A RUN_URL_B [--csv out.csv]

Reads each run's evaluation results, ``<run>/eval/step-NNNNNNN/result-*.json`` (written by `repa watch`
and `repa eval`), or, where a run has none, its TensorBoard scalars ``<run>/tensorboard/eval``
(``eval/fid`` or ``eval/fd_*``). Prints one row per step both runs were scored at: A, B, B - A and
B / A, then the step at which A first reached B's last score (A's speed-up, read off the curves by
linear interpolation, as the REPA paper's "17.5x faster" is). Results are compared only when they
measure the same thing: same metric, sample count and reference statistics, else it says which differ.
Exit 0; 2 with one line when a run has no results or the two are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from repa import storage

__all__ = ["Curve", "compare", "load_curve", "main", "speedup_step"]


@dataclasses.dataclass
class Curve:
    """One run's scores by step, and what they are."""

    run_url: str
    metric: str  # e.g. "FID" (what the result JSON calls it)
    num_samples: int | None
    reference: str | None  # sha256 of the reference statistics, where known
    points: dict[int, float]
    source: str  # "result JSON" or "TensorBoard"


class CompareError(RuntimeError):
    """A run has no results, or the two runs' results measure different things."""


def _from_results(run_url: str) -> Curve | None:
    eval_url = storage.join(run_url, "eval")
    if not storage.exists(eval_url):
        return None
    points: dict[int, float] = {}
    kinds: set[tuple[str, int | None, str | None]] = set()
    for step_dir in sorted(e.name for e in storage.list_entries(eval_url) if e.is_dir):
        if not step_dir.startswith("step-"):
            continue
        step = int(step_dir.removeprefix("step-"))
        for name in sorted(storage.listdir(storage.join(eval_url, step_dir))):
            if not (name.startswith("result-") and name.endswith(".json")):
                continue
            doc = json.loads(storage.read_bytes(storage.join(eval_url, step_dir, name)))
            if doc.get("fid") is None:
                continue
            kinds.add((doc.get("metric_name", "FID"), doc.get("num_samples"), doc.get("reference_sha256")))
            points[step] = float(doc["fid"])
    if not points:
        return None
    if len(kinds) > 1:
        raise CompareError(f"{run_url}: its results measure different things {sorted(kinds, key=str)}")
    metric, n, ref = kinds.pop()
    return Curve(run_url, metric, n, ref, points, "result JSON")


def _from_tensorboard(run_url: str) -> Curve | None:
    from repa.tensorboard import read_scalars

    scalars = read_scalars(str(storage.join(run_url, "tensorboard", "eval")))
    tags = [
        t
        for t in ("eval/fid", *sorted(scalars))
        if t in scalars and (t == "eval/fid" or t.startswith("eval/fd_"))
    ]
    if not tags:
        return None
    return Curve(run_url, tags[0], None, None, {s: v for s, v in scalars[tags[0]]}, "TensorBoard")


def load_curve(run_url: str) -> Curve:
    """The run's score-vs-step curve (result JSONs first, TensorBoard else); CompareError if none."""
    curve = _from_results(run_url) or _from_tensorboard(run_url)
    if curve is None:
        raise CompareError(
            f"{run_url}: no evaluation results (eval/step-*/result-*.json or tensorboard/eval); "
            "is the evaluator on (`evaluator.enabled`) and has a checkpoint been scored yet?"
        )
    return curve


def speedup_step(a: Curve, target: float) -> float | None:
    """The (interpolated) step at which ``a`` first reaches ``target`` (lower is better), or None."""
    steps = sorted(a.points)
    for i, s in enumerate(steps):
        if a.points[s] <= target:
            if i == 0:
                return float(s)
            s0, v0, v1 = steps[i - 1], a.points[steps[i - 1]], a.points[s]
            return s0 + (s - s0) * (v0 - target) / (v0 - v1)
    return None


def compare(a: Curve, b: Curve) -> list[str]:
    """The report's lines (see the module docstring); CompareError if the curves are not comparable."""
    differ = [
        f"{what} {x} != {y}"
        for what, x, y in (
            ("metric", a.metric, b.metric),
            ("samples", a.num_samples, b.num_samples),
            ("reference statistics", a.reference, b.reference),
        )
        if x != y
    ]
    if differ:
        raise CompareError(f"{a.run_url} vs {b.run_url}: not comparable ({'; '.join(differ)})")
    n = f", {a.num_samples:,} samples" if a.num_samples else ""
    lines = [
        f"{a.metric}{n} vs training step (lower is better; from {a.source} / {b.source})",
        f"  A = {a.run_url}",
        f"  B = {b.run_url}",
        f"  {'step':>9}  {'A':>9}  {'B':>9}  {'B - A':>8}  {'B / A':>6}",
    ]
    common = sorted(set(a.points) & set(b.points))
    for s in common:
        va, vb = a.points[s], b.points[s]
        lines.append(
            f"  {s:>9,d}  {va:>9.2f}  {vb:>9.2f}  {vb - va:>8.2f}  {vb / va if va else float('nan'):>6.2f}"
        )
    if not common:
        lines.append("  (no step scored in both runs yet)")
    last_b = max(b.points)
    hit = speedup_step(a, b.points[last_b])
    if hit is None:
        lines.append(f"A has not yet reached B's {a.metric} at step {last_b:,} ({b.points[last_b]:.2f}).")
    else:
        lines.append(
            f"A reached B's step-{last_b:,} {a.metric} ({b.points[last_b]:.2f}) at step ~{hit:,.0f}: "
            f"{last_b / max(hit, 1.0):.1f}x fewer steps."
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repa.ab_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="run URL of arm A (e.g. REPA): its storage.run_url")
    parser.add_argument("run_b", help="run URL of arm B (e.g. vanilla)")
    parser.add_argument("--csv", metavar="PATH", help="also write step,a,b rows to this file")
    args = parser.parse_args(argv)
    try:
        a, b = load_curve(args.run_a), load_curve(args.run_b)
        lines = compare(a, b)
    except (CompareError, storage.StorageError, OSError) as e:
        print(f"repa.ab_compare: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.csv:
        rows = ["step,a,b"] + [
            f"{s},{a.points.get(s, '')},{b.points.get(s, '')}" for s in sorted(set(a.points) | set(b.points))
        ]
        with open(args.csv, "w") as f:
            f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
