"""The command-line glue `repa sample`, `repa eval` and `repa watch` share: flags, one config, errors.

Every shorthand flag is a config key (``--chunk-size 50`` == ``--set sample.chunk_size=50``), so each
setting reaches the verbs through the config and nothing is passed alongside it.

Which config: ``--config`` when given; otherwise the run's own ``{run_url}/config.yaml`` (so sampling a
run needs no flags besides the checkpoint), else the built-in defaults; ``--set`` and the shorthand
flags apply on top. The checkpoint is resolved *first* (from the flag and the ``--set`` lines alone),
so the config is loaded once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass

from repa import checkpoint as ckpt
from repa import storage
from repa.config import RunConfig, add_config_arguments, apply_overrides, load_config

log = logging.getLogger(__name__)

__all__ = [
    "EVAL_FLAG_KEYS",
    "SAMPLE_FLAG_KEYS",
    "VerbConfig",
    "add_checkpoint_argument",
    "add_eval_arguments",
    "add_sampling_arguments",
    "cli_error",
    "flag_overrides",
    "resolve_config",
]

SAMPLE_FLAG_KEYS = {
    "chunk_size": "sample.chunk_size",
    "precision": "sample.precision",
    "output": "sample.output_url",
}
EVAL_FLAG_KEYS = {"feature_extractor": "eval.feature_extractor", "keep_samples": "eval.keep_samples"}


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `repa sample`, `repa eval` and `repa watch`."""
    add_config_arguments(parser)
    parser.add_argument(
        "--chunk-size",
        type=int,
        metavar="N",
        help="samples per chunk file, the unit of resumption and of work per rank (sets sample.chunk_size)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast dtype of the model (sets sample.precision; default fp32, the paper's protocol)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_checkpoint_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--checkpoint URL`` (alias ``--reference-checkpoint``) of `repa sample` / `repa eval`."""
    parser.add_argument("--checkpoint", "--reference-checkpoint", dest="checkpoint", metavar="URL", help=help)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `repa eval` also used by `repa watch`."""
    parser.add_argument(
        "--feature-extractor",
        metavar="MODULE:CALLABLE",
        help="custom feature network, reported as FD_<name> (sets eval.feature_extractor). "
        "Default: Inception-v3 from eval.inception_weights_url (FID, IS)",
    )
    parser.add_argument(
        "--delete-samples",
        dest="keep_samples",
        action="store_false",
        default=None,
        help="delete the samples once the result is written (sets eval.keep_samples=false)",
    )


def flag_overrides(args: argparse.Namespace, keys: dict[str, str] | None = None) -> list[str]:
    """``--set`` lines for the shorthand flags given on the command line (``SAMPLE_FLAG_KEYS`` + ``keys``)."""
    out = []
    for attr, key in {**SAMPLE_FLAG_KEYS, **(keys or {})}.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out


@dataclass(frozen=True)
class VerbConfig:
    """The config of one verb, whether ``--config`` named it, and the checkpoint it works on."""

    cfg: RunConfig
    explicit: bool  # --config given: the checkpoint's recorded model args are checked against it
    source: ckpt.CheckpointSource | None  # None when the verb takes no checkpoint (watch)


def resolve_config(
    args: argparse.Namespace,
    flag_keys: dict[str, str] | None = None,
    *,
    checkpoint: bool = True,
    require_for: str | None = None,
) -> VerbConfig:
    """Resolve the checkpoint (when ``checkpoint``), then load the one config (see the module docstring).

    ``require_for``: a verb whose required keys (``RunConfig.require_for``) are checked as soon as the
    config is known, before a checkpoint is looked for (a missing key is a config error, not a
    missing checkpoint).

    Without ``--config`` the checkpoint is found with the ``--set`` lines alone (``sample.checkpoint_url``,
    ``storage.run_url``, ``storage.storage_options``), as nothing else is known before the run's config.
    """
    overrides = list(getattr(args, "overrides", []) or []) + flag_overrides(args, flag_keys)
    flag = getattr(args, "checkpoint", None)
    if args.config is not None:
        cfg = load_config(args.config, overrides)
        storage.configure(cfg.storage.policy())  # the verb starts here: its config's storage timeouts
        if require_for:
            cfg.require_for(require_for)
        source = _resolve(flag or cfg.sample.checkpoint_url, cfg) if checkpoint else None
        return VerbConfig(cfg, True, source)
    given = apply_overrides({}, overrides)  # the --set lines as a tree: no config is loaded yet
    sample, store = given.get("sample") or {}, given.get("storage") or {}
    url = flag or sample.get("checkpoint_url")
    run = storage.Location(store.get("run_url") or "", store.get("storage_options") or {})
    source = None
    if checkpoint and url:
        source = ckpt.resolve_checkpoint(storage.Location(url, run.options), None)
        run = storage.Location(source.run_url or run.url, run.options)
    cfg = None
    if run.url:
        config_at = run.join("config.yaml")
        if storage.exists(config_at):
            log.info("using the run's config %s", config_at.url)
            cfg = load_config(config_at.url, overrides)
    cfg = cfg or load_config(None, overrides)
    storage.configure(cfg.storage.policy())
    if require_for:
        cfg.require_for(require_for)
    if checkpoint and source is None:  # the run's latest committed checkpoint
        source = _resolve(None, cfg)
    return VerbConfig(cfg, False, source)


def _resolve(url: str | None, cfg: RunConfig) -> ckpt.CheckpointSource:
    return ckpt.resolve_checkpoint(cfg.storage.locate(url), cfg.storage.locate(cfg.storage.run_url))


def cli_error(verb: str, e: BaseException) -> int:
    """The one-line error of a verb's bad input (exit 2)."""
    print(f"repa {verb}: error: {e}", file=sys.stderr)
    return 2
