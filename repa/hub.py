"""`repa weights fetch DEST`: stage the weights a REPA run needs onto any storage, and ``hf://`` reads.

repa never downloads on its own (docs/architecture.md, "No downloads"); this verb is the one place
that does, when asked. It fetches, through ``huggingface_hub`` (cache under ``HF_HOME``, resumable,
``HF_ENDPOINT`` mirrors and ``HF_HUB_OFFLINE`` respected):

- the target encoders of the registry as timm's Hub safetensors (``timm/<timm name>``, the repos
  ``timm.create_model(pretrained=True)`` reads; DINOv2 ViT-B/14 is ``timm/vit_base_patch14_dinov2.lvd142m``),
- the SD-VAE diffusers folders ``stabilityai/sd-vae-ft-mse`` (training latents) and
  ``stabilityai/sd-vae-ft-ema`` (REPA ``generate.py``'s decoder): ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` only, never pickles,
- torch-fidelity's Inception-v3 FID weights (its release URL, ``URL_INCEPTION_V3``) and, on request, ADM's
  reference batch ``VIRTUAL_imagenet256_labeled.npz`` (openai/guided-diffusion ``evaluations/``),

then copies each file to ``DEST/<repo id>/<file>`` on any fsspec URL, writes ``DEST/weights-manifest.json``
(sha256, size and source of every file), and prints the ``--set`` lines that point a run at them.
Every file is verified against the Hub's ETag (or the hash prefix in a URL's file name) before it is
copied (``repa.hf_cache``); files already in DEST with the manifest's size are skipped without any
network access.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from repa import storage
from repa.hf_cache import FetchError, hub_file, sha256_file, url_file

log = logging.getLogger(__name__)

__all__ = [
    "ADM_REFERENCE_URL",
    "INCEPTION_URL",
    "MANIFEST",
    "Artifact",
    "FetchError",
    "add_arguments",
    "catalogue",
    "fetch",
    "run",
    "set_lines",
]

# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (tests/unit/test_hub.py compares them).
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
# openai/guided-diffusion evaluations/README.md: the ImageNet 256x256 reference batch.
ADM_REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
    "VIRTUAL_imagenet256_labeled.npz"
)
MANIFEST = "weights-manifest.json"
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # diffusers' folder layout


@dataclass(frozen=True)
class Artifact:
    """One thing to stage: a Hub repo's files, or one file at a URL."""

    name: str
    """Catalogue name (``--only``): an encoder or VAE name of the config, ``inception``, ``adm-reference``."""
    where: str
    """Folder under DEST (the Hub repo id, so DEST mirrors the Hub's names)."""
    files: tuple[str, ...]
    repo_id: str | None = None
    url: str | None = None
    folder: bool = False
    """The config key names the folder (a diffusers VAE) rather than the file."""
    description: str = ""

    def dest(self, root: str) -> str:
        """The URL a config key gets: the folder, or the single file."""
        folder = storage.join(root, self.where)
        return folder if self.folder else storage.join(folder, self.files[0])


def catalogue() -> dict[str, Artifact]:
    """Everything ``repa weights fetch`` knows, by name (``repa weights list``)."""
    from repa.encoders.registry import ENCODERS

    out: dict[str, Artifact] = {}
    for name, spec in ENCODERS.items():
        repo = f"timm/{spec.timm_name}"
        out[name] = Artifact(name, repo, ("model.safetensors",), repo_id=repo, description=spec.description)
    for vae in ("sd-vae-ft-mse", "sd-vae-ft-ema"):
        repo = f"stabilityai/{vae}"
        out[vae] = Artifact(vae, repo, VAE_FILES, repo_id=repo, folder=True, description="diffusers folder")
    name = INCEPTION_URL.rsplit("/", 1)[-1]
    out["inception"] = Artifact(
        "inception",
        "torch-fidelity",
        (name,),
        url=INCEPTION_URL,
        description="torch-fidelity FID Inception-v3",
    )
    out["adm-reference"] = Artifact(
        "adm-reference",
        "openai-guided-diffusion",
        (ADM_REFERENCE_URL.rsplit("/", 1)[-1],),
        url=ADM_REFERENCE_URL,
        description="ADM's ImageNet 256 reference batch (1.6 GB)",
    )
    return out


def wanted(cfg: Any, reference_batch: bool = False) -> list[str]:
    """Catalogue names a run of ``cfg`` needs: its encoders, training and decoding VAEs, Inception (and
    DINOv2 ViT-L/14 with FD-DINOv2 in eval.metrics)."""
    known = catalogue()
    names = [n for n in cfg.encoder.names if n in known]
    names += [v for v in dict.fromkeys([cfg.vae.name, cfg.decoder_vae_name()]) if v != "none"]
    if not cfg.eval.feature_extractor:
        names.append("inception")
    if "fd_dinov2" in cfg.eval.metrics and "dinov2-vit-l" not in names:
        names.append("dinov2-vit-l")  # FD-DINOv2's network (repa.eval.dinov2)
    if reference_batch:
        names.append("adm-reference")
    return names


def set_lines(cfg: Any, staged: dict[str, str]) -> list[str]:
    """``key=value`` overrides (for ``--set``) pointing ``cfg``'s run at ``staged`` (name -> URL); lists
    are written as JSON without spaces, which YAML reads back as is."""
    out = []
    if any(n in staged for n in cfg.encoder.names):
        urls = [staged.get(n) for n in cfg.encoder.names]
        out.append(f"encoder.weights_urls={json.dumps(urls, separators=(',', ':'))}")  # YAML, no spaces
    if cfg.vae.name in staged:
        out.append(f"vae.weights_url={staged[cfg.vae.name]}")
    decoder = cfg.decoder_vae_name()
    if decoder != cfg.vae.name and decoder in staged:
        out.append(f"sample.vae_weights_url={staged[decoder]}")
    if "inception" in staged:
        out.append(f"eval.inception_weights_url={staged['inception']}")
    if "dinov2-vit-l" in staged and "fd_dinov2" in cfg.eval.metrics:
        out.append(f"eval.dinov2_weights_url={staged['dinov2-vit-l']}")
    if "adm-reference" in staged:
        out.append(f"eval.reference_stats_url={staged['adm-reference']}")
    return out


# ----------------------------------------------------------------------------------------------
# Fetching to DEST
# ----------------------------------------------------------------------------------------------


def _read_manifest(root: storage.Location) -> dict[str, Any]:
    where = root.join(MANIFEST)
    if not storage.exists(where):
        return {"format": 1, "files": {}}
    return json.loads(storage.read_bytes(where))


def _copy(local: str, where: storage.Location) -> None:
    """Copy a local file to ``where`` so that it appears whole or not at all."""
    url = where.url
    fs, path = storage.filesystem(where, operation="write")
    target = storage.local_path(url)
    if target is not None:
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}"
        fs.put_file(local, tmp)
        os.replace(tmp, target)
    else:  # object stores: an upload is visible only once complete (multipart for large files)
        storage.retry(lambda: fs.put_file(local, path), what=url, operation="write")


def fetch(
    root: str | storage.Location,
    names: list[str],
    *,
    revision: str | None = None,
    mirrors: dict[str, str] | None = None,
) -> dict[str, str]:
    """Stage the catalogue entries ``names`` under ``root`` (a URL or a Location with its fsspec
    options); returns ``{name: URL for the config}``.

    ``mirrors`` maps URL entries (``inception``, ``adm-reference``) to another URL of the same file
    (Hub entries follow ``HF_ENDPOINT``). Files already at ``root`` with the manifest's size are
    skipped; every other file comes from the Hugging Face cache (downloaded and verified first if
    needed), and the manifest is rewritten after each file, so an interrupted fetch keeps what it did.
    """
    known = catalogue()
    for name, url in (mirrors or {}).items():
        if name not in known or known[name].url is None:
            urls = [n for n, a in known.items() if a.url]
            raise FetchError(f"--mirror {name}=...: only URL entries have mirrors ({', '.join(urls)})")
        known[name] = dataclasses.replace(known[name], url=url, files=(url.rsplit("/", 1)[-1],))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FetchError(f"unknown weights {unknown}; known: {', '.join(known)}")
    root = storage.locate(root)
    if storage.is_local(root):
        root = storage.Location(os.path.abspath(storage.local_path(root) or root.url), root.options)
    manifest = _read_manifest(root)
    staged = {}
    for name in dict.fromkeys(names):
        art = known[name]
        for filename in art.files:
            rel = f"{art.where}/{filename}"
            url = root.join(rel)
            entry = manifest["files"].get(rel)
            if entry and storage.exists(url) and storage.size(url) == entry["bytes"]:
                log.info("%s: already at %s (sha256 %s)", name, url, entry["sha256"][:12])
                continue
            if art.repo_id:
                local, sha256, commit = hub_file(art.repo_id, filename, revision)
                source = f"hf://{art.repo_id}@{commit}/{filename}"
            else:
                assert art.url is not None
                local, source = url_file(art.url), art.url
                sha256 = sha256_file(local)
            log.info("%s: copying %s (%d bytes) to %s", name, filename, os.path.getsize(local), url)
            _copy(local, url)
            manifest["files"][rel] = {
                "sha256": sha256,
                "bytes": os.path.getsize(local),
                "source": source,
                "fetched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            storage.write_bytes_atomic(root.join(MANIFEST), json.dumps(manifest, indent=2).encode())
        staged[name] = art.dest(root.url)
    return staged


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repa.config import add_config_arguments

    sub = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "fetch",
        help="download the run's weights (Hugging Face cache) and copy them to DEST",
        description="Fetch the weights the config needs (its encoders, training and decoding SD-VAE, "
        "Inception) through the Hugging Face cache, copy them to DEST (any fsspec URL) with a sha256 "
        "manifest, and print the --set lines for the run on stdout.",
    )
    add_config_arguments(p)
    p.add_argument("dest", metavar="DEST", help="where the weights go: a local folder, s3://..., gs://...")
    p.add_argument(
        "--only", action="append", metavar="NAME", help="fetch these catalogue entries instead (repeatable)"
    )
    p.add_argument(
        "--reference-batch",
        action="store_true",
        help="also ADM's VIRTUAL_imagenet256_labeled.npz (1.6 GB) for eval.reference_stats_url",
    )
    p.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="fetch a URL entry (inception, adm-reference) from another URL; Hub repos follow HF_ENDPOINT",
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of the Hub repos; default main")
    p.add_argument("--no-progress", action="store_true", help="no download progress bars")
    sub.add_parser("list", help="list what `fetch` knows", description="List the weights catalogue.")


def run(args: argparse.Namespace) -> int:
    if args.weights_command == "list":
        for name, art in catalogue().items():
            source = f"hf://{art.repo_id}" if art.repo_id else art.url
            print(f"{name}: {source} ({', '.join(art.files)}) {art.description}")
        return 0
    from repa.config import config_from_args

    cfg = config_from_args(args)
    if args.no_progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    names = args.only or wanted(cfg, args.reference_batch)
    try:
        bad = [item for item in args.mirror if "=" not in item]
        if bad:
            raise FetchError(f"--mirror {bad[0]!r}: expected NAME=URL")
        mirrors = dict(item.split("=", 1) for item in args.mirror)  # the last one of a name wins
        staged = fetch(cfg.storage.locate(args.dest), names, revision=args.revision, mirrors=mirrors)
    except FetchError as e:  # unknown names, a bad --mirror, a file that fails verification
        print(f"repa weights fetch: error: {e}", file=sys.stderr)
        return 2
    # Storage and Hub failures (unreachable, refused credentials, missing files) end in repa.cli's one
    # line with the documented exit code.
    lines = set_lines(cfg, staged)
    print(f"staged {len(staged)} weights in {args.dest}; use them with:", file=sys.stderr)
    for line in lines:  # no quotes unless needed, so `$(cat file)` passes them on as they are
        print(f"--set {line if not any(c.isspace() for c in line) else shlex.quote(line)}")
    return 0
