"""`repa eval` on the command line: evaluate a checkpoint, or one of its actions.

    repa eval [--checkpoint URL] ...                 sample + score one checkpoint (repa.eval.evaluate)
    repa eval ref-stats --out URL ...                reference statistics of a dataset (repa.eval.refstats)
    repa eval compare A.json B.json ...              are these scores comparable? (repa.eval.provenance)
    repa eval sweep --cfg-scale .. --guidance-high ..  a guidance sweep of one checkpoint (repa.eval.sweep)

Only argument parsing, printing and exit codes live here; the work is in the modules named above.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from repa import checkpoint as ckpt
from repa import runtime, storage
from repa.config import ConfigError
from repa.eval import sample as S
from repa.eval.args import (
    EVAL_FLAG_KEYS,
    add_checkpoint_argument,
    add_eval_arguments,
    add_sampling_arguments,
    cli_error,
    resolve_config,
)
from repa.eval.errors import EvalError
from repa.eval.evaluate import EvalOutcome, evaluate_checkpoint
from repa.eval.features import build_extractor
from repa.eval.report import provenance_brief, score_line
from repa.runtime import DistInfo

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    add_checkpoint_argument(
        parser, "step folder or weights file (see `repa sample`); default: the latest committed checkpoint"
    )
    add_eval_arguments(parser)
    parser.add_argument("--force", action="store_true", help="recompute even if the result file exists")
    sub = parser.add_subparsers(
        dest="eval_command", metavar="[ref-stats|compare|sweep]", title="optional action"
    )
    p = sub.add_parser(
        "ref-stats",
        help="reference statistics (mu, sigma, features) of a prepared dataset",
        description="Compute FID reference statistics of a `repa prepare` dataset with the feature "
        "extractor. Options go after `ref-stats`.",
    )
    from repa.config import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--data-url", metavar="URL", help="prepared dataset (default: data.url)")
    p.add_argument("--out", required=True, metavar="URL", help="where to write the .npz")
    p.add_argument("--feature-extractor", metavar="MODULE:CALLABLE", help="as for `repa eval`")
    p.add_argument(
        "--dinov2",
        action="store_true",
        help="statistics of FD-DINOv2's network (eval.dinov2_weights_url) instead of Inception's: the "
        "file eval.dinov2_reference_stats_url names",
    )
    p.add_argument("--keep-features", type=int, default=10_000, help="features kept for precision/recall")
    p.add_argument(
        "--keep-images", type=int, default=0, help="images kept as arr_0 (ADM evaluator compatible)"
    )
    p.add_argument("--max-images", type=int, help="use only the first N images (tests, quick looks)")
    p.add_argument("--batch-size", type=int, default=64)
    c = sub.add_parser(
        "compare",
        help="are these scores comparable? (exit 0: yes; 1: no, naming the fields that differ)",
        description="Print the scores of result JSONs side by side with every provenance field that "
        "differs (docs/evaluation.md); exit 0 when they were produced by the same protocol, 1 otherwise.",
    )
    c.add_argument("results", nargs="+", metavar="RESULT.json", help="result files (local paths or URLs)")
    w = sub.add_parser(
        "sweep",
        help="score a checkpoint over CFG scales x guidance intervals (same labels and noises per cell)",
        description="Evaluate the checkpoint once per cell of --cfg-scale x --guidance-high (guidance on "
        "[0, high]), every cell on the same labels and noises; resumable cell by cell; writes a table, a "
        "heat map and the best cell (repa.eval.sweep). Options go after `sweep`.",
    )
    add_sampling_arguments(w)
    add_checkpoint_argument(w, "as for `repa eval`")
    add_eval_arguments(w)
    w.add_argument("--cfg-scale", required=True, metavar="W1,W2,...", help="CFG scales (rows)")
    w.add_argument("--guidance-high", required=True, metavar="H1,H2,...", help="interval ends (columns)")
    w.add_argument("--num-samples", type=int, metavar="N", help="samples per cell (sets sample.num_samples)")
    w.add_argument(
        "--index", type=int, help="this process's share of the cells (default: $JOB_COMPLETION_INDEX, else 0)"
    )
    w.add_argument(
        "--count", type=int, default=1, help="processes sharing the cells (an Indexed Job's completions)"
    )
    w.add_argument(
        "--sample-parts",
        type=int,
        default=1,
        metavar="P",
        help="split each cell's samples into P parts (sample chunks c %% P), so cells x P units share "
        "the --count processes (default 1: whole cells)",
    )


def _run_ref_stats(args: argparse.Namespace) -> int:
    from repa.config import load_config
    from repa.eval.args import flag_overrides
    from repa.eval.refstats import compute_dataset_reference_stats

    cfg = load_config(args.config, args.overrides + flag_overrides(args, EVAL_FLAG_KEYS))
    storage.configure(cfg.storage.policy())  # the verb starts here: its config's storage timeouts
    data = cfg.data.location() if not args.data_url else cfg.storage.locate(args.data_url)
    if not data.url:
        raise ConfigError("data.url", "required by `repa eval ref-stats` (or pass --data-url)")
    device = runtime.resolve_device(cfg.train.device)
    if args.dinov2 and args.feature_extractor:
        raise EvalError("--dinov2 and --feature-extractor name two networks; pass one")
    if args.dinov2:
        from repa.eval.dinov2 import build_dinov2_from_config

        extractor = build_dinov2_from_config(cfg, device)
    else:
        extractor = build_extractor(cfg, device)
    digest = compute_dataset_reference_stats(
        data,
        cfg.storage.locate(args.out),
        extractor,
        batch_size=args.batch_size,
        keep_features=args.keep_features,
        keep_images=args.keep_images,
        max_images=args.max_images,
    )
    print(f"{args.out} sha256 {digest}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from repa.eval.provenance import compare_results
    from repa.eval.report import format_comparison

    payloads = []
    for url in args.results:
        try:
            payloads.append(json.loads(storage.read_bytes(url)))
        except FileNotFoundError:
            return cli_error("eval compare", EvalError(f"{url}: not found"))
        except ValueError as e:
            return cli_error("eval compare", EvalError(f"{url}: not a result JSON ({e})"))
        problem = _result_problem(payloads[-1])
        if problem:
            return cli_error("eval compare", EvalError(f"{url}: not a `repa eval` result ({problem})"))
    comparison = compare_results(payloads)
    print(format_comparison(args.results, comparison))
    return 0 if comparison.comparable else 1


def _result_problem(payload: Any) -> str | None:
    """What makes ``payload`` unreadable as a result JSON (None: readable): `repa eval compare` must
    exit 2 for a bad file, never 1 ("not comparable") or a traceback."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not an object"

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not number(payload.get("fid")):
        return f"fid is {payload.get('fid')!r}, not a number"
    for key in ("sfid", "inception_score_mean", "precision", "recall", "fd_dinov2"):
        if payload.get(key) is not None and not number(payload[key]):
            return f"{key} is {payload[key]!r}, not a number"
    if payload.get("provenance") is not None and not isinstance(payload["provenance"], dict):
        return "provenance is not an object"
    if payload.get("fd_dinov2") is not None:
        record = payload.get("dinov2")
        if not isinstance(record, dict):
            return "fd_dinov2 without its dinov2 record"
        if not isinstance(record.get("label"), str) or not isinstance(record.get("standard"), bool):
            return "its dinov2 record lacks a label (text) or standard (true/false)"
    return None


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors of bad input to `repa eval`: one line on stderr, exit 2 (never a traceback)."""
    from repa.eval.errors import MetricsError
    from repa.weights import WeightsError

    return (S.SamplingError, ckpt.CheckpointError, EvalError, MetricsError, WeightsError, FileNotFoundError)


def _on_every_rank(
    name: str, args: argparse.Namespace, keys: dict[str, str], work: Callable[[Any, DistInfo], Any]
) -> tuple[int | None, Any, DistInfo | None]:
    """Resolve the config and checkpoint, start the process group, run ``work(verb, info)``, shut down.

    Returns ``(exit code of a user error or None, work's value, info)``.
    """
    info = None
    try:
        verb = resolve_config(args, keys, require_for="eval")
        info = runtime.init_distributed(verb.cfg.train.device, verb.cfg.train.process_group_timeout_seconds)
        return None, work(verb, info), info
    except ConfigError:
        raise
    except _user_errors() as e:
        return cli_error(name, e), None, info
    finally:
        if info is not None:
            runtime.shutdown()


def _run_sweep(args: argparse.Namespace) -> int:
    from repa.eval import sweep

    grid = sweep.SweepGrid(
        sweep.parse_values(args.cfg_scale, "--cfg-scale"),
        sweep.parse_values(args.guidance_high, "--guidance-high"),
    )

    def work(verb: Any, info: DistInfo) -> tuple[dict[str, Any] | None, Any]:
        summary = sweep.run_sweep(
            verb.cfg,
            verb.source,
            grid,
            info=info,
            index=sweep.index_from_environment(args.index),
            count=args.count,
            sample_parts=args.sample_parts,
            check_config=verb.explicit,
            progress=not args.no_progress,
        )
        return summary, (sweep.sweep_folder(verb.cfg, verb.source, grid) if summary else None)

    keys = {**EVAL_FLAG_KEYS, "num_samples": "sample.num_samples"}
    code, value, info = _on_every_rank("eval sweep", args, keys, work)
    if code is not None:
        return code
    summary, folder = value
    if summary is not None:
        print("\n".join(sweep.best_lines(summary)))
        print(f"{summary['score']}: {len(summary['cells'])} cells -> {folder}")
    elif info is not None and info.is_main:
        print(
            "eval sweep: this index's cells are done; the summary is written by the index that finishes last"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "compare":
        return _run_compare(args)
    if args.eval_command == "sweep":
        return _run_sweep(args)
    if args.eval_command == "ref-stats":
        try:
            return _run_ref_stats(args)
        except ConfigError:
            raise
        except (*_user_errors(), ValueError) as e:
            return cli_error("eval ref-stats", e)

    def work(verb: Any, info: DistInfo) -> EvalOutcome | None:
        return evaluate_checkpoint(
            verb.cfg,
            verb.source,
            info=info,
            check_config=verb.explicit,
            force=args.force,
            progress=not args.no_progress,
        )

    code, outcome, _ = _on_every_rank("eval", args, EVAL_FLAG_KEYS, work)
    if code is not None:
        return code
    if outcome is not None:
        done = " (already evaluated)" if outcome.skipped else ""
        print(
            f"{score_line(outcome.result)} {provenance_brief(outcome.result)}{done} -> {outcome.result_url}"
        )
    return 0
