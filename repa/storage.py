"""The one module that touches fsspec: URLs, atomic writes, listing.

Every storage location in repa is a URL (``s3://``, ``gs://``, ``memory://``, ``file://``) or a
plain local path. Credentials and endpoints come from the environment (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS`` ...) or from ``storage_options``, never
from code.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

__all__ = [
    "StorageError",
    "exists",
    "filesystem",
    "join",
    "listdir",
    "open_url",
    "read_bytes",
    "remove",
    "write_bytes_atomic",
]


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL."""


def _fs_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    # gcsfs's first bucket access hangs ~60 s probing hierarchical namespaces unless told not to.
    if url.startswith(("gs://", "gcs://")):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return options


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path within it)`` for a URL or local path."""
    return url_to_fs(url, **_fs_options(url, storage_options))


def join(base: str, *parts: str) -> str:
    """Join URL path parts with '/' (os.path.join would break ``s3://`` URLs on Windows-like rules)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def listdir(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not full paths) directly under ``url``; empty if it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if _supports_refresh(fs) else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/")})


def _supports_refresh(fs: fsspec.AbstractFileSystem) -> bool:
    # Object-store filesystems cache listings; a watcher must see new objects, so ask for a refresh.
    return fs.protocol not in ("file", "local", "memory") and not (
        isinstance(fs.protocol, tuple) and ("file" in fs.protocol or "memory" in fs.protocol)
    )


@contextmanager
def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> Iterator[IO]:
    """Open a URL for reading or (non-atomic) writing; parent folders are created for local files."""
    fs, path = filesystem(url, storage_options)
    if "w" in mode and _is_local(fs):
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        f = fs.open(path, mode)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: not found") from e
    with f:
        yield f


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    with open_url(url, "rb", storage_options) as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` so that readers see either nothing or the whole object.

    Local files: write a temporary sibling, fsync, then ``os.replace`` (atomic on POSIX).
    Object stores (S3, GCS): a single PUT is already atomic, an object is visible only once
    complete, so we upload directly.
    """
    fs, path = filesystem(url, storage_options)
    if _is_local(fs):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def remove(url: str, recursive: bool = False, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol
