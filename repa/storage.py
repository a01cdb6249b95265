"""The one module that touches fsspec: URLs, locations, atomic writes, listing, local copies.

Every storage location in repa is a URL (``s3://``, ``gs://``, ``memory://``, ``file://``) or a
plain local path. Credentials and endpoints come from the environment (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS`` ...) or from fsspec options, never
from code. A :class:`Location` binds a URL to its fsspec options once, so the options travel
with the URL to whatever reads it (weights, data, checkpoints) instead of being passed alongside.

This module alone decides whether a URL is local (:func:`is_local`, :func:`local_path`) and where
remote files are cached for libraries that only read paths (:func:`cache_dir`, :func:`local_copy`).
``hf://<org>/<name>/<path>`` URLs are read through the Hugging Face cache (``repa.hf_cache``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import fsspec

logger = logging.getLogger(__name__)

T = TypeVar("T")

# write_bytes_atomic's temporary sibling: ".tmp-<32 hex>-<target name>".
_TEMP_PREFIX = ".tmp-"
_TEMP_RE = re.compile(r"^\.tmp-[0-9a-f]{32}-(.+)$")

__all__ = [
    "Entry",
    "Location",
    "StorageError",
    "cache_dir",
    "cleanup_temps",
    "exists",
    "filesystem",
    "is_local",
    "is_transient",
    "join",
    "list_entries",
    "listdir",
    "local_copy",
    "local_path",
    "open_url",
    "read_bytes",
    "remove",
    "retry",
    "size",
    "write_bytes_atomic",
]


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL."""


@dataclass(frozen=True)
class Location:
    """A URL (or local path) together with the fsspec options needed to reach it.

    Every function here takes a ``Location`` wherever it takes a URL; its options then win over a
    ``storage_options`` argument. ``Location(url)`` has no options (environment credentials only).
    """

    url: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` below this one, with the same options."""
        return join(self, *parts)

    def __str__(self) -> str:
        return self.url


def _split(where: str | Location, storage_options: Mapping[str, Any] | None) -> tuple[str, dict | None]:
    """``(url, options)`` of a URL or Location; a Location carries its own options."""
    if isinstance(where, Location):
        return where.url, dict(where.options) or None
    return str(where), (dict(storage_options) if storage_options else None)


def _fs_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    # gcsfs's first bucket access hangs ~60 s probing hierarchical namespaces unless told not to.
    if url.startswith(("gs://", "gcs://")):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return options


def filesystem(
    url: str | Location, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path within it)`` for a URL, local path or Location."""
    from fsspec.core import url_to_fs  # here, not at import: config code uses is_local without fsspec

    url, storage_options = _split(url, storage_options)
    if url.startswith("hf://"):  # read through the Hugging Face cache (repa.hf_cache)
        from repa.hf_cache import cached_hf_path

        return url_to_fs(cached_hf_path(url))
    return url_to_fs(url, **_fs_options(url, storage_options))


def is_local(url: str | Location) -> bool:
    """True for a plain path or ``file://`` URL (the one place that decides "is this URL local")."""
    text = url.url if isinstance(url, Location) else str(url)
    return "://" not in text or text.startswith(("file://", "local://"))


def local_path(url: str | Location) -> str | None:
    """The filesystem path of a local URL (``file:///a/b`` -> ``/a/b``), or None for a remote one."""
    if not is_local(url):
        return None
    text = url.url if isinstance(url, Location) else str(url)
    for prefix in ("file://", "local://"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return os.path.expanduser(text)


def cache_dir() -> str:
    """The one cache root for local copies of remote files: ``$REPA_CACHE_DIR``, else
    ``$TMPDIR/repa-cache`` (writable in a container whose root filesystem is read-only when /tmp is
    an emptyDir, as in the chart)."""
    return os.environ.get("REPA_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "repa-cache")


def local_copy(
    url: str | Location, storage_options: dict[str, Any] | None = None, *, kind: str = "files"
) -> str:
    """A local path holding the file at ``url``: a local path as is, a remote object copied once.

    For libraries that only read paths (torch-fidelity, diffusers, ``np.load``). Copies live under
    ``cache_dir()/kind/<hash of the URL>-<name>``; a copy whose size differs from the remote object
    is refreshed, and the copy is written atomically, so concurrent pods never read half a file.
    """
    text, options = _split(url, storage_options)
    if text.startswith("hf://"):  # already a local file in the Hugging Face cache
        return filesystem(text)[1]
    path = local_path(text)
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{text}: not found")
        return path
    remote_size = size(text, options)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    name = text.rstrip("/").rsplit("/", 1)[-1] or "file"
    local = os.path.join(cache_dir(), kind, f"{key}-{name}")
    if not (os.path.exists(local) and os.path.getsize(local) == remote_size):
        logger.info("copying %s to %s", text, local)
        write_bytes_atomic(local, read_bytes(text, options))
    return local


def join(base: str | Location, *parts: str) -> Any:
    """Join URL path parts with '/' (os.path.join would break ``s3://`` URLs on Windows-like rules).

    A Location gives a Location with the same options; a string gives a string.
    """
    if isinstance(base, Location):
        return Location(join(base.url, *parts), base.options)
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(url: str | Location, storage_options: dict[str, Any] | None = None) -> bool:
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)
    return retry(lambda: fs.exists(path), what=url)


def size(url: str | Location, storage_options: dict[str, Any] | None = None) -> int:
    """Size in bytes of the file/object at ``url`` (FileNotFoundError naming the URL if absent)."""
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)
    try:
        return int(retry(lambda: fs.size(path), what=url))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: not found") from e


def listdir(url: str | Location, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not full paths) directly under ``url``, sorted; empty if it does not exist."""
    url, storage_options = _split(url, storage_options)
    return [entry.name for entry in list_entries(url, storage_options)]


@dataclass(frozen=True)
class Entry:
    """One item directly under a folder URL (``list_entries``)."""

    name: str
    is_dir: bool
    size: int | None  # bytes for files; None (or 0) for folders


def list_entries(url: str | Location, storage_options: dict[str, Any] | None = None) -> list[Entry]:
    """Items directly under ``url`` with their kind and size, sorted by name; empty if absent.

    One listing call (object stores: one LIST per 1000 keys), so callers can check many files'
    existence and size without a request each.
    """
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)

    def ls() -> list[dict[str, Any]]:
        if _supports_refresh(fs):
            return fs.ls(path, detail=True, refresh=True)
        return fs.ls(path, detail=True)

    try:
        infos = retry(ls, what=url)
    except FileNotFoundError:
        return []
    entries: dict[str, Entry] = {}
    for info in infos:
        full = str(info["name"]).rstrip("/")
        if full == path.rstrip("/"):
            continue
        name = full.rsplit("/", 1)[-1]
        is_dir = info.get("type") == "directory"
        entries[name] = Entry(name, is_dir, None if is_dir else info.get("size"))
    return [entries[k] for k in sorted(entries)]


def cleanup_temps(
    url: str | Location, names: Iterable[str], storage_options: dict[str, Any] | None = None
) -> int:
    """Remove leftovers of interrupted ``write_bytes_atomic`` calls for ``names`` in folder ``url``.

    Only temporaries of the given target names are touched, so a worker never deletes a file that
    another worker is writing right now. Object stores have no temporaries (a PUT is atomic).
    Returns how many were removed.
    """
    url, storage_options = _split(url, storage_options)
    fs, _ = filesystem(url, storage_options)
    if not _is_local(fs):
        return 0
    wanted = set(names)
    removed = 0
    for entry in list_entries(url, storage_options):
        m = _TEMP_RE.match(entry.name)
        if m and m.group(1) in wanted:
            remove(join(url, entry.name), storage_options=storage_options)
            removed += 1
    return removed


def _supports_refresh(fs: fsspec.AbstractFileSystem) -> bool:
    # Object-store filesystems cache listings; a watcher must see new objects, so ask for a refresh.
    return fs.protocol not in ("file", "local", "memory") and not (
        isinstance(fs.protocol, tuple) and ("file" in fs.protocol or "memory" in fs.protocol)
    )


@contextmanager
def open_url(
    url: str | Location, mode: str = "rb", storage_options: dict[str, Any] | None = None
) -> Iterator[IO]:
    """Open a URL for reading or (non-atomic) writing; parent folders are created for local files."""
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)
    if "w" in mode and _is_local(fs):
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        f = fs.open(path, mode)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: not found") from e
    with f:
        yield f


def read_bytes(
    url: str | Location, storage_options: dict[str, Any] | None = None, *, attempts: int = 5
) -> bytes:
    """The whole file/object in one request; transient errors are retried (see ``retry``)."""
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)
    # s3fs splits objects > 50 MB into concurrent ranged GETs plus a HEAD and reassembles them in a
    # bytearray: twice the CPU of one streamed GET (measured on moto, benchmarks/loader.py).
    kwargs = {"max_concurrency": 1} if "s3" in _protocols(fs) else {}

    def read() -> bytes:
        try:
            return fs.cat_file(path, **kwargs)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{url}: not found") from e

    return retry(read, what=url, attempts=attempts)


def write_bytes_atomic(
    url: str | Location, data: bytes, storage_options: dict[str, Any] | None = None
) -> None:
    """Write ``data`` so that readers see either nothing or the whole object.

    Local files: write a temporary sibling, fsync, then ``os.replace`` (atomic on POSIX).
    Object stores (S3, GCS): a single PUT is already atomic, an object is visible only once
    complete, so we upload directly.
    """
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)
    if _is_local(fs):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{_TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
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
        # A PUT is idempotent, so retrying a transient failure is safe.
        retry(lambda: fs.pipe_file(path, data), what=url)


def remove(
    url: str | Location, recursive: bool = False, storage_options: dict[str, Any] | None = None
) -> None:
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = _protocols(fs)
    return "file" in protocol or "local" in protocol


# ----------------------------------------------------------------------------------------------
# Retries for transient errors
# ----------------------------------------------------------------------------------------------

_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "ETIMEDOUT",
        "EPIPE",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EAGAIN",
    )
    if hasattr(errno, name)
)
# Class names (anywhere in the MRO) of network errors raised by botocore/aiobotocore, aiohttp,
# urllib3/requests and fsspec; matched by name so storage.py needs none of them installed.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ProtocolError",
        "FSTimeoutError",
        "ChunkedEncodingError",
    }
)
# S3/GCS error codes that mean "try again later" (AWS S3 error responses; 5xx are covered by status).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
_NEVER_TRANSIENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def _status_code(exc: BaseException) -> int | None:
    """HTTP status of a botocore ClientError, aiohttp ClientResponseError or gcsfs HttpError, if any."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for attr in ("status", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if isinstance(code, str):
            return code
    return None


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, _NEVER_TRANSIENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):  # reset/refused/aborted, broken pipe, timeouts
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    if _error_code(exc) in _TRANSIENT_CODES:
        return True
    status = _status_code(exc)
    if status is not None and (status == 429 or status >= 500):
        return True
    # s3fs turns unknown ClientErrors into OSError(EIO, message); keep the code visible in the text.
    text = str(exc)
    return isinstance(exc, OSError) and any(code in text for code in ("SlowDown", "ServiceUnavailable"))


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) is worth retrying.

    Transient: connection reset/refused/aborted, timeouts, ``OSError`` with a network errno,
    botocore/aiohttp/urllib3 connection errors, HTTP 429 and 5xx, and S3 throttling codes
    (``SlowDown``, ``Throttling``, ``RequestTimeout``, ``InternalError``, ``ServiceUnavailable``).
    Never transient: not found, permission denied, and any other error (bad input must fail fast).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _NEVER_TRANSIENT):
            return False
        if _is_transient_one(current):
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn()``; retry transient errors with exponential backoff and jitter.

    Attempt ``k`` (0-based) that fails transiently waits ``d/2 + U(0, d/2)`` seconds with
    ``d = min(max_delay, base_delay * 2**k)`` ("equal jitter", AWS Architecture Blog, "Exponential
    Backoff and Jitter"), so many pods hitting the same throttled bucket spread out. Non-transient
    errors (``is_transient`` is False) propagate unchanged at once. After the last attempt a
    ``StorageError`` naming ``what`` (the URL) is raised from the last error.
    """
    if attempts < 1:
        raise ValueError(f"retry attempts: expected >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == attempts - 1:
                raise StorageError(
                    f"{what}: failed after {attempts} attempts: {type(e).__name__}: {e}"
                ) from e
            delay = min(max_delay, base_delay * 2**attempt)
            delay = delay / 2 + random.uniform(0, delay / 2)
            logger.warning(
                "%s: transient error (%s: %s); retry %d/%d in %.1fs",
                what,
                type(e).__name__,
                e,
                attempt + 1,
                attempts - 1,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")
