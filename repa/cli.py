"""`repa <verb>`: parse arguments, load the config, call one function. No logic lives here.

Each verb is a module with ``add_arguments(parser)`` and ``run(args) -> int`` (``COMMANDS``). Only the
chosen verb's module is imported, so ``repa --help`` and ``repa config`` stay fast.

Every failure becomes one line on stderr (what failed, which URL or file, what to do) and an exit code
(``EXIT_CODES``, documented in docs/kubernetes.md); the traceback is logged only with
``--log-level DEBUG``. ``repa torchrun ARGS`` is torchrun (``torch.distributed.run``) with a
preemption-safe exit code (``repa.cluster.launch``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from collections.abc import Sequence

import repa
from repa.config import ConfigError

__all__ = ["COMMANDS", "EXIT_CODES", "Command", "describe_failure", "main", "quiet_third_party_logs"]

log = logging.getLogger("repa")

EXIT_FAILURE = 1  # an unexpected error (likely a bug): rerun with --log-level DEBUG for the traceback
EXIT_CONFIG = 2  # bad config, flags or input named by the user
EXIT_INPUT = 3  # a file, shard or checkpoint is missing, corrupt or unwritable (disk full, permission)
EXIT_STORAGE = 4  # the object store did not answer within storage.deadline_seconds (unreachable)
EXIT_LEASE = 5  # another trainer holds the run's lease (repa.lease)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C; `repa train` committed the step it stopped at
EXIT_PREEMPTED = 143  # 128 + SIGTERM: a checkpoint was committed; the pod should be recreated
EXIT_CODES = {
    0: "success",
    EXIT_FAILURE: "unexpected error (a bug?): rerun with --log-level DEBUG and report the traceback",
    EXIT_CONFIG: "config or usage error: fix the named key or flag",
    EXIT_INPUT: "a file, shard or checkpoint is missing, corrupt or not writable, or the store refused "
    "the credentials (missing, wrong or not allowed: not retried); the message names it and the fix",
    EXIT_STORAGE: "the object store did not answer within storage.deadline_seconds (named operation, URL)",
    EXIT_LEASE: "another trainer holds the run's lease: stop it or use another storage.run_url",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): repa train committed the step it names (a second Ctrl-C: "
    "aborted, the last committed checkpoint is named); run the same command again",
    EXIT_PREEMPTED: "preempted (SIGTERM): a checkpoint was committed; run the same command again",
}


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
    "eval": Command("repa.eval.commands", "FID / IS / precision-recall of samples vs reference statistics"),
    "watch": Command("repa.eval.watch", "evaluate every new committed checkpoint of a run once"),
    "eval-job": Command(
        "repa.cluster.eval_job",
        "print the Kubernetes Job that evaluates one checkpoint (for kubectl apply -f -)",
    ),
    "status": Command(
        "repa.cluster.status", "how a Helm release's run is doing: its TrainJob/PyTorchJob and storage"
    ),
    "logs": Command("repa.cluster.logs", "the trainer's worker logs of a Helm release (-f follows)"),
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
        "see `repa config docs` or docs/configuration.md. `repa torchrun TORCHRUN-ARGS -m repa train ...` is "
        "torchrun that exits 143 when preempted (SIGTERM), as the Helm chart runs training.",
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# Loggers of libraries under repa.storage and repa.hf_cache: their retries and tracebacks repeat what
# repa reports in one line (gcsfs logs every "out of retries" with a traceback, botocore/urllib3 each
# retry, asyncio "Task exception was never retrieved" for aiohttp connections dropped in an outage).
_STORAGE_LIBRARIES = ("aiobotocore", "aiohttp", "boto3", "botocore", "fsspec", "gcsfs", "google", "s3fs")
# tensorboard: its event reader logs "No path found after <file>" at INFO when repa reads back the
# eval run's scalars (eval/best_fid) while the file is fresh.
THIRD_PARTY_LOGGERS = (*_STORAGE_LIBRARIES, "asyncio", "huggingface_hub", "tensorboard", "urllib3")


def quiet_third_party_logs(level: str) -> None:
    """Silence :data:`THIRD_PARTY_LOGGERS` unless ``level`` is DEBUG (then they say everything)."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL + 1)
    # huggingface_hub resets its logger's level from HF_HUB_VERBOSITY when it is first imported (later).
    if level == "DEBUG":
        os.environ["HF_HUB_VERBOSITY"] = "debug"
    else:
        os.environ.setdefault("HF_HUB_VERBOSITY", "critical")


def describe_failure(e: BaseException) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an exception that ended a verb."""
    from repa import storage
    from repa.lease import LeaseError

    chain = storage.exception_chain(e)
    if isinstance(e, LeaseError):
        return EXIT_LEASE, _one_line(e)
    # Credentials missing, wrong or refused: not retried, the message names the URL and the fix.
    for link in chain:
        if isinstance(link, storage.StorageError) and link.kind == "access":
            return EXIT_INPUT, _one_line(link)
    if storage.is_access_error(e):
        url = next((str(x.filename) for x in chain if isinstance(x, OSError) and x.filename), "")
        return EXIT_INPUT, f"{_one_line(e)}: access denied or no credentials; {storage.access_fix(url)}"
    # A storage operation ran out of its deadline: name the one that started failing first (an outage
    # fails every operation in flight; the first is the cause, the others are echoes).
    for link in chain:
        if isinstance(link, storage.StorageError) and link.operation:
            first = storage.first_failure() or link
            return EXIT_STORAGE, _one_line(first)  # names operation, URL and the fix
    if isinstance(e, storage.StorageError):
        return EXIT_STORAGE if storage.is_transient(e) else EXIT_INPUT, _one_line(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename and str(e.filename) not in str(e) else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return EXIT_INPUT, f"{_one_line(e)}{where}: free space or point the URL elsewhere"
        if storage.is_transient(e):
            return EXIT_STORAGE, f"{type(e).__name__}: {_one_line(e)}{where}"
        return EXIT_INPUT, f"{type(e).__name__}: {_one_line(e)}{where}"
    if isinstance(e, ValueError):  # CheckpointError, WeightsError, ShardError, ManifestError, ...
        return EXIT_INPUT, _one_line(e)
    return (
        EXIT_FAILURE,
        f"{type(e).__name__}: {_one_line(e)} (rerun with --log-level DEBUG for the traceback)",
    )


# Verbs whose config is loaded and checked before their module (and torch, 5-10 s) is imported, so a config
# error exits 2 within a second (issue 20: "config errors of every verb in under 1 s"); the weights check
# (RunConfig.require_weights, a no-op for verbs that run no network) also runs early when --config names
# the config.
EARLY_CONFIG_VERBS = ("train", "sample", "eval", "watch", "prepare", "eval-job")


def check_config_early(verb: str, argv: Sequence[str]) -> int | None:
    """Exit code of a config error in ``argv``'s --config/--set, found before the verb's module is
    imported; None when the config loads (or lies on remote storage, which the verb reads and reports)."""
    from repa.config import add_config_arguments, load_config

    parser = argparse.ArgumentParser(
        add_help=False, allow_abbrev=False
    )  # abbreviations: the verb parses them
    add_config_arguments(parser)
    known, _ = parser.parse_known_args(list(argv)[list(argv).index(verb) + 1 :])
    if known.config and "://" in known.config and not known.config.startswith("file://"):
        return None
    try:
        cfg = load_config(known.config, known.overrides)  # a check: the verb installs its timeouts
        if known.config:
            cfg.require_weights(verb, known.config)
    except ConfigError as e:
        print(f"repa {verb}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:  # e.g. an unreadable file: the verb reads it again and reports it in full
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `repa` console script and `python -m repa`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = _chosen_verb(argv, [*COMMANDS, "torchrun"])
    if verb == "torchrun":  # torchrun's own flags follow; argparse must not see them
        from repa.cluster.launch import main as torchrun_main

        return torchrun_main(argv[argv.index("torchrun") + 1 :])
    if verb in EARLY_CONFIG_VERBS and not {"-h", "--help"} & set(argv):
        code = check_config_early(verb, argv)
        if code is not None:
            return code
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
    quiet_third_party_logs(args.log_level)
    from repa import storage

    storage.reset_failures()  # "the first failure" is this verb's, not an earlier call's in this process
    storage.configure(storage.Policy())  # default timeouts until the verb's config installs its own
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        log.debug("config error", exc_info=True)
        print(f"repa {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print(f"repa {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        code, message = describe_failure(e)
        log.debug("repa %s failed", args.command, exc_info=True)
        print(f"repa {args.command}: error: {message}", file=sys.stderr)
        return code
