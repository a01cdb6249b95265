"""The `repa prepare images | latents | finalize | verify` command line: arguments and dispatch."""

from __future__ import annotations

import argparse
import sys

from repa import storage
from repa.data.format import MANIFEST_NAME, MOMENTS_DTYPES
from repa.data.prepare.finalize import finalize, verify_dataset
from repa.data.prepare.images import prepare_images
from repa.data.prepare.latents import prepare_latents
from repa.data.prepare.plan import DEFAULT_TARGET_SHARD_BYTES
from repa.data.prepare.report import DEFAULT_MAX_BAD_FRACTION

__all__ = ["add_arguments", "run"]


def _add_worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="this worker's index (default: $JOB_COMPLETION_INDEX of an Indexed Job, else $RANK, else 0)",
    )
    p.add_argument(
        "--worker-count",
        type=int,
        default=None,
        help="number of workers (default: $REPA_WORKER_COUNT, else $WORLD_SIZE, else 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-stages of `repa prepare` (the CLI table calls this with the verb's sub-parser)."""
    from repa.config import add_config_arguments

    sub = parser.add_subparsers(dest="prepare_stage", metavar="STAGE", required=True)

    p = sub.add_parser(
        "images",
        help="ImageNet-style folder/tar -> ADM-cropped PNG shards (png + cls) + manifest.json",
        description="Stage 1: <source>/<synset>/*.JPEG (folder or .tar, any URL) -> WebDataset shards.",
    )
    p.add_argument(
        "source_url",
        help="folder of class folders (ILSVRC train/), or a .tar of it, or IDX files (Fashion-MNIST: a "
        "folder of *-images-idx3-ubyte[.gz], or one such file); any fsspec URL",
    )
    p.add_argument("data_url", nargs="?", help="output dataset URL (default: data.url of --config)")
    p.add_argument("--resolution", type=int, default=None, help="image side after the ADM crop (default 256)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--samples-per-shard", type=int, default=None, help="samples per shard (fixes the split)"
    )
    size.add_argument(
        "--target-shard-mb",
        type=float,
        default=DEFAULT_TARGET_SHARD_BYTES / 1e6,
        help="target shard size in MB incl. latents; sets samples per shard (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    p.add_argument(
        "--max-per-class", type=int, default=None, help="use only the first N images of each class"
    )
    p.add_argument(
        "--png-compress-level", type=int, default=0, help="0 (stored, fastest decode; default) .. 9"
    )
    p.add_argument("--num-workers", type=int, default=None, help="decode threads (default min(8, CPUs))")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=DEFAULT_MAX_BAD_FRACTION,
        help="fail if more than this fraction of source images is unreadable (default %(default)s)",
    )
    _add_worker_arguments(p)
    add_config_arguments(p)

    p = sub.add_parser(
        "latents",
        help="add VAE moments (cat[mean, std]) to every shard, in place",
        description="Stage 2: encode every shard's images with the VAE and add {key}.moments.npy.",
    )
    p.add_argument("data_url", nargs="?", help="dataset URL (default: data.url of --config)")
    p.add_argument("--vae", default=None, help="sd-vae-ft-mse | sd-vae-ft-ema | none (default: vae.name)")
    p.add_argument(
        "--vae-weights-url", default=None, help="diffusers folder of the VAE (default: vae.weights_url)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:0 (default cpu)")
    p.add_argument(
        "--moments-dtype",
        choices=MOMENTS_DTYPES,
        default="float16",
        help="stored dtype (default float16: latent error ~1e-4, see docs/data.md)",
    )
    _add_worker_arguments(p)
    add_config_arguments(p)

    p = sub.add_parser("finalize", help="write manifest.json from the sidecars (normally automatic)")
    p.add_argument("data_url", nargs="?", help="dataset URL (default: data.url of --config)")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION)
    add_config_arguments(p)

    p = sub.add_parser("verify", help="check every shard against manifest.json (sizes, sha256, keys)")
    p.add_argument("data_url", nargs="?", help="dataset URL (default: data.url of --config)")
    p.add_argument("--quick", action="store_true", help="sizes and checksums only, do not parse samples")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run one `repa prepare` stage; prints a summary. Exit 0 ok, 1 when finalize finds shards not done;
    failures (bad source, missing manifest, storage) end in ``repa.cli``'s one line and exit code."""
    cfg = None
    if getattr(args, "config", None) or getattr(args, "overrides", None):
        from repa.config import config_from_args

        cfg = config_from_args(args)
    data_url = args.data_url or (cfg.data.url if cfg is not None else None)
    if not data_url:
        print(f"repa prepare {args.prepare_stage}: give DATA_URL or --config with data.url", file=sys.stderr)
        return 2
    # The output is the config's data set: data.storage_options reach it (also when DATA_URL is given).
    data = storage.Location(data_url, dict(cfg.data.storage_options)) if cfg is not None else data_url
    if args.prepare_stage == "images":
        resolution = args.resolution or (cfg.data.resolution if cfg is not None else 256)
        summary = prepare_images(
            args.source_url,
            data,
            resolution=resolution,
            samples_per_shard=args.samples_per_shard,
            target_shard_bytes=int(args.target_shard_mb * 1e6),
            seed=args.seed,
            max_per_class=args.max_per_class,
            png_compress_level=args.png_compress_level,
            num_workers=args.num_workers,
            worker_index=args.worker_index,
            worker_count=args.worker_count,
            max_bad_fraction=args.max_bad_fraction,
            progress=not args.no_progress,
        )
        print(summary.format())
    elif args.prepare_stage == "latents":
        vae_weights = args.vae_weights_url or (cfg.vae.weights_url if cfg is not None else None)
        summary = prepare_latents(
            data,
            vae=args.vae or (cfg.vae.name if cfg is not None else "sd-vae-ft-mse"),
            vae_weights_url=cfg.storage.locate(vae_weights) if cfg is not None else vae_weights,
            batch_size=args.batch_size,
            device=args.device,
            moments_dtype=args.moments_dtype,
            worker_index=args.worker_index,
            worker_count=args.worker_count,
            progress=not args.no_progress,
        )
        print(summary.format())
    elif args.prepare_stage == "finalize":
        manifest = finalize(data, max_bad_fraction=args.max_bad_fraction)
        if manifest is None:
            print(
                f"repa prepare finalize: {data_url}: not all shards are done; see the log",
                file=sys.stderr,
            )
            return 1
        print(
            f"{storage.join(data_url, MANIFEST_NAME)}: {manifest.num_samples:,} samples, "
            f"{len(manifest.shards)} shards"
        )
    elif args.prepare_stage == "verify":
        manifest = verify_dataset(data, check_samples=not args.quick)
        print(
            f"{data_url}: ok: {len(manifest.shards)} shards, {manifest.num_samples:,} samples "
            "agree with the manifest"
        )
    return 0
