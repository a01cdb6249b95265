"""Reading from the Hugging Face Hub through its cache: ``hf://`` URLs and verified single files.

Everything goes through ``huggingface_hub`` (``hf_hub_download``, ``snapshot_download``, ``http_get``):
the cache is ``HF_HUB_CACHE`` or ``$HF_HOME/hub``, ``HF_ENDPOINT`` selects a mirror and ``HF_HUB_OFFLINE``
reads the cache only; all three are read at call time. Files from plain URLs (torch-fidelity's
Inception weights, ADM's reference batch) are cached in ``$HF_HOME/repa-downloads`` and resumed from
where an interrupted download stopped.

Verification. A Hub file's ETag is the sha256 of its content for LFS files and the git blob sha1 for
the others (Hub docs, "Manage huggingface_hub cache": blobs are named by their ETag); every file is
hashed and compared with it. A URL whose file name carries a hash prefix (``...-6726825d.pth``) is
checked as ``torch.hub.download_url_to_file(hash_prefix=...)`` checks it. A mismatch removes the file
from the cache and raises :class:`FetchError`.

``hf://[datasets/]<org>/<name>[@revision][/<path>]`` (the URL form of ``huggingface_hub.HfFileSystem``)
is resolved by :func:`cached_hf_path` to a local file or folder; ``repa.storage`` then reads it like
any local path. Failures are reported as storage failures are (``repa.storage.faults``): an
unreachable Hub or a refused token is a one-line ``StorageError`` naming the file and the fix; the
only repa module imported here is that policy (``repa.storage`` imports this module lazily).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

from repa.storage.faults import StorageError, access_fix, is_transient

log = logging.getLogger(__name__)

__all__ = ["FetchError", "cached_hf_path", "hub_file", "sha256_file", "url_file", "verified_hub_file"]

_HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's HASH_REGEX: name-<sha256 prefix>.ext
_REPO_TYPES = {"datasets": "dataset", "spaces": "space"}


class FetchError(RuntimeError):
    """A file could not be fetched from the Hub (or a URL) or failed verification; the message names it."""


def _failure(what: str, e: Exception) -> Exception:
    """The error to raise for a failed Hub/URL download of ``what``: a one-line StorageError naming the
    fix when the Hub is unreachable (huggingface_hub has already retried) or refuses the token, else a
    FetchError."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return StorageError(
            f"read {what}: access denied by the Hub (HTTP {status}); {access_fix('hf://')} "
            "(gated models: accept their licence on the Hub first)",
            operation="read",
            url=what,
            kind="access",
        )
    cause = e.__cause__ or e.__context__
    unreachable = type(e).__name__ == "LocalEntryNotFoundError" or is_transient(e)
    if unreachable or (cause is not None and is_transient(cause)):
        endpoint = _hub()["endpoint"]
        return StorageError(
            f"read {what}: the Hub ({endpoint}) is unreachable and the file is not in the Hugging Face "
            f"cache {_hub()['cache_dir']}; check the network or HF_ENDPOINT (a mirror), or copy a filled "
            "cache here and set HF_HUB_OFFLINE=1",
            operation="read",
            url=what,
            kind="unreachable",
        )
    return FetchError(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


# ----------------------------------------------------------------------------------------------


def _hub() -> dict[str, Any]:
    """``endpoint``, ``cache_dir`` and ``local_files_only`` as huggingface_hub reads them from the
    environment (``HF_ENDPOINT``, ``HF_HUB_CACHE`` or ``HF_HOME``/hub, ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME") or constants.HF_HOME
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return {
        "endpoint": (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
        "cache_dir": os.environ.get("HF_HUB_CACHE") or os.path.join(os.path.expanduser(home), "hub"),
        "local_files_only": offline or constants.HF_HUB_OFFLINE,
    }


def _downloads_dir() -> str:
    """Where files from plain URLs are cached: ``$HF_HOME/repa-downloads`` (beside the Hub cache)."""
    from huggingface_hub import constants

    return os.path.join(os.path.expanduser(os.environ.get("HF_HOME") or constants.HF_HOME), "repa-downloads")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_blob_sha1(path: str) -> str:
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified_hub_file(path: str, what: str) -> tuple[str, str | None]:
    """``(sha256, commit)`` of a file in the Hub cache, checked against its ETag (its blob's name)."""
    blob = os.path.realpath(path)
    etag = os.path.basename(blob)
    sha256 = sha256_file(path)
    if len(etag) == 64:
        ok = sha256 == etag
    elif len(etag) == 40:
        ok = _git_blob_sha1(path) == etag
    else:
        raise FetchError(
            f"{what}: cannot verify {path}: its ETag {etag!r} is neither a sha256 nor a git sha1"
        )
    if not ok:
        for p in {path, blob}:
            if os.path.lexists(p):
                os.remove(p)
        raise FetchError(
            f"{what}: content hash does not match the Hub's ETag {etag} (sha256 {sha256}); "
            "the download was removed from the cache, refusing it"
        )
    parts = path.split(os.sep)
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
    return sha256, commit


def hub_file(
    repo_id: str, filename: str, revision: str | None = None, repo_type: str | None = None
) -> tuple[str, str, str | None]:
    """``(local path, sha256, commit)`` of one Hub file, from the cache or downloaded into it, verified."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    what = f"hf://{repo_id}{'' if revision is None else '@' + revision}/{filename}"
    hub = _hub()
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type, **hub)
    except LocalEntryNotFoundError as e:
        if hub["local_files_only"]:
            raise FetchError(
                f"{what}: not in the Hugging Face cache {hub['cache_dir']} and HF_HUB_OFFLINE is set"
            ) from e
        raise _failure(what, e) from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{what}: not found on the Hub") from e
    except Exception as e:  # HfHubHTTPError, RepositoryNotFoundError, connection errors
        raise _failure(what, e) from e
    return (path, *verified_hub_file(path, what))


def url_file(url: str) -> str:
    """A local path of the file at ``url`` in ``_downloads_dir()``, downloaded (resumably) if absent and
    checked against the sha256 prefix in its name, as torch.hub does."""
    from huggingface_hub.file_download import http_get

    name = url.rsplit("/", 1)[-1]
    folder = os.path.join(_downloads_dir(), hashlib.sha256(url.encode()).hexdigest()[:16])
    final = os.path.join(folder, name)
    if not os.path.exists(final):
        if _hub()["local_files_only"]:
            raise FetchError(f"{url}: not in the download cache {folder} and HF_HUB_OFFLINE is set")
        os.makedirs(folder, exist_ok=True)
        partial = final + ".incomplete"
        done = os.path.getsize(partial) if os.path.exists(partial) else 0
        if done:
            log.info("resuming %s at byte %d", url, done)
        try:
            with open(partial, "ab") as f:
                http_get(url, f, resume_size=done, displayed_filename=name)
        except Exception as e:
            failure = _failure(url, e)
            if isinstance(failure, FetchError):
                failure = FetchError(f"{url}: download failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            raise failure from e
        os.replace(partial, final)
    match = _HASH_PREFIX.search(name)
    if match:
        digest = sha256_file(final)
        if not digest.startswith(match.group(1)):
            os.remove(final)
            raise FetchError(
                f"{url}: sha256 {digest} does not start with {match.group(1)} (the prefix in its name); "
                "the download was removed, refusing it"
            )
    return final


def cached_hf_path(url: str) -> str:
    """Local path of ``hf://[datasets/]<org>/<name>[@revision][/<path>]`` in the Hugging Face cache.

    A path whose last part has an extension is a file, downloaded once (then read from the cache, also
    with ``HF_HUB_OFFLINE``); the repo root or an extension-less path is a folder: a snapshot of its
    ``*.json`` and ``*.safetensors`` files (a diffusers VAE folder, say), never pickles. Raises
    FileNotFoundError for a missing file and FetchError for other failures.
    """
    from huggingface_hub import snapshot_download

    rest = url[len("hf://") :].strip("/")
    parts = rest.split("/")
    repo_type = _REPO_TYPES.get(parts[0])
    if repo_type:
        parts = parts[1:]
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{url}: expected hf://<org>/<name>[@revision]/<path>")
    name, _, revision = parts[1].partition("@")
    repo_id, path = f"{parts[0]}/{name}", "/".join(parts[2:])
    revision = revision or None
    if "." in path.rsplit("/", 1)[-1]:  # a file name (config.json, model.safetensors); else a folder
        return hub_file(repo_id, path, revision, repo_type)[0]
    patterns = [f"{path}/*.json", f"{path}/*.safetensors"] if path else ["*.json", "*.safetensors"]
    try:
        root = snapshot_download(
            repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns, **_hub()
        )
    except Exception as e:
        raise _failure(url, e) from e
    local = os.path.join(root, path) if path else root
    if not os.path.isdir(local) or not os.listdir(local):
        raise FileNotFoundError(
            f"{url}: not found on the Hub (no such file, nor a folder of json/safetensors)"
        )
    return local
