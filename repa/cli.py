"""`repa <verb>`: parse arguments, load the config, call one function. No logic lives here.

Each verb is a module with ``add_arguments(parser)`` and ``run(args) -> int`` (``COMMANDS``). Only the
chosen verb's module is imported, so ``repa --help`` and ``repa config`` stay fast. A
:class:`repa.config.ConfigError` becomes a one-line message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

import repa
from repa.config import ConfigError

__all__ = ["COMMANDS", "Command", "main"]


class Command:
    """One verb: the module that implements it and a one-line summary for ``repa --help``."""

    def __init__(self, module: str, summary: str) -> None:
        self.module = module
        self.summary = summary


COMMANDS: dict[str, Command] = {
    "prepare": Command(
        "repa.data.prepare",
        "ImageNet folders -> ADM-cropped image shards + VAE moments at data.url (idempotent, resumable)",
    ),
    "train": Command(
        "repa.train.trainer",
        "train SiT + REPA from a config (torchrun for several GPUs); resumes from storage.run_url",
    ),
    "sample": Command("repa.eval.sample", "generate images from a checkpoint for FID (chunked, resumable)"),
    "eval": Command("repa.eval.evaluate", "FID / IS / precision-recall of samples vs reference statistics"),
    "watch": Command("repa.eval.watch", "evaluate every new committed checkpoint of a run once"),
    "eval-job": Command(
        "repa.eval.eval_job",
        "print the Kubernetes Job that evaluates one checkpoint (for kubectl apply -f -)",
    ),
    "status": Command(
        "repa.status", "how a Helm release's run is doing: its TrainJob/PyTorchJob and storage"
    ),
    "logs": Command("repa.logs", "the trainer's worker logs of a Helm release (-f follows)"),
    "weights": Command(
        "repa.hub", "fetch encoder, SD-VAE and Inception weights (Hugging Face Hub) to storage, print --set"
    ),
    "config": Command("repa.config_export", "show, validate, document or export the schema of a run config"),
    "demo": Command(
        "repa.demo",
        "the whole pipeline on this machine in minutes, offline: data, prepare, train, FID, sample grid",
    ),
}


def _chosen_verb(argv: Sequence[str], verbs: Sequence[str]) -> str | None:
    """The first positional argument, if it is a verb (skipping the value of ``--log-level``)."""
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            return None
        if token == "--log-level":
            next(tokens, None)
            continue
        if not token.startswith("-"):
            return token if token in verbs else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The top-level parser; only the verb named in ``argv`` gets its module imported and arguments."""
    commands = COMMANDS
    parser = argparse.ArgumentParser(
        prog="repa",
        description="REPA diffusion transformers: data preparation, training, sampling and evaluation.",
        epilog="Every verb takes --config FILE|PRESET and repeatable --set section.key=value; "
        "see `repa config docs` or docs/configuration.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"repa {repa.__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="VERB", title="verbs")
    chosen = _chosen_verb(argv, list(commands))
    for verb, cmd in commands.items():
        p = sub.add_parser(verb, help=cmd.summary, description=cmd.summary)
        if verb == chosen:
            module = importlib.import_module(cmd.module)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `repa` console script and `python -m repa`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"repa {args.command}: config error: {e}", file=sys.stderr)
        return 2
