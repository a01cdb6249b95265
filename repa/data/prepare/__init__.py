"""`repa prepare`: ImageNet-style images -> WebDataset shards at any URL, then VAE moments into them.

Two stages, each idempotent and split into work units (shards) for N workers:

``images``  ``train/<synset>/*.JPEG`` (a folder or a ``.tar`` of it, on local disk or any fsspec URL)
            -> ADM center crop -> ``shard-NNNNNN.tar`` with ``{key}.png`` + ``{key}.cls`` (``images``).
``latents`` each shard -> ``repa.vae`` ``encode_moments`` -> the same shard rewritten with
            ``{key}.moments.npy`` added (``latents``).

The modules, one job each: ``sources`` (the source tree on fsspec), ``plan`` (which file becomes
which key in which shard, and which worker writes it), ``sidecars`` (the per-shard restart
records), ``images`` and ``latents`` (the stages), ``finalize`` (``manifest.json`` from the
sidecars; ``verify``), ``report`` (errors, summary, progress) and ``cli`` (`repa prepare ...`).

Restart: a shard is committed atomically, then its sidecar; a shard whose sidecar exists, belongs
to the same plan and whose size matches is skipped. ``manifest.json`` is assembled from the
sidecars by whichever worker finds them all present (or by ``repa prepare finalize``). See
docs/data.md.
"""

from repa.data.format import read_manifest
from repa.data.prepare.cli import add_arguments, run
from repa.data.prepare.finalize import finalize, verify_dataset
from repa.data.prepare.images import prepare_images
from repa.data.prepare.latents import prepare_latents
from repa.data.prepare.plan import (
    DEFAULT_TARGET_SHARD_BYTES,
    PLAN_NAME,
    Plan,
    estimate_sample_bytes,
    make_plan,
    resolve_worker,
    worker_shards,
)
from repa.data.prepare.report import DEFAULT_MAX_BAD_FRACTION, PrepareError, PrepareSummary
from repa.data.prepare.sources import IMAGE_EXTENSIONS, SourceFile, open_source

__all__ = [
    "DEFAULT_MAX_BAD_FRACTION",
    "DEFAULT_TARGET_SHARD_BYTES",
    "IMAGE_EXTENSIONS",
    "PLAN_NAME",
    "Plan",
    "PrepareError",
    "PrepareSummary",
    "SourceFile",
    "add_arguments",
    "estimate_sample_bytes",
    "finalize",
    "make_plan",
    "open_source",
    "prepare_images",
    "prepare_latents",
    "read_manifest",
    "resolve_worker",
    "run",
    "verify_dataset",
    "worker_shards",
]
