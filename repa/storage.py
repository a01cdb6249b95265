"""The one module that touches fsspec: URLs, locations, atomic writes, listing, local copies.

Every storage location in repa is a URL (``s3://``, ``gs://``, ``memory://``, ``file://``) or a
plain local path. Credentials and endpoints come from the environment (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS`` ...) or from fsspec options, never
from code. A :class:`Location` binds a URL to its fsspec options once, so the options travel
with the URL to whatever reads it (weights, data, checkpoints) instead of being passed alongside.

This module alone decides whether a URL is local (:func:`is_local`, :func:`local_path`) and where
remote files are cached for libraries that only read paths (:func:`cache_dir`, :func:`local_copy`).
``hf://<org>/<name>/<path>`` URLs are read through the Hugging Face cache (``repa.hf_cache``).

Deadlines (docs/architecture.md, "Nothing blocks without a bound"): every remote operation has
connect/read timeouts on its sockets (botocore's ``connect_timeout``/``read_timeout`` through s3fs's
``config_kwargs``; aiohttp's ``sock_connect``/``sock_read`` for gcsfs and HTTP) and one wall-clock
deadline over all its attempts (:func:`retry`; fsspec's ``sync(..., timeout=)`` cancels an attempt
that outlives it, so a store that accepts bytes and never answers cannot hold a PUT forever). The
values are the ``storage.*`` config keys; :func:`configure` installs them for the process.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import re
import tempfile
import threading
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
    "Policy",
    "StorageError",
    "cache_dir",
    "cleanup_temps",
    "configure",
    "exists",
    "filesystem",
    "first_failure",
    "is_local",
    "is_transient",
    "join",
    "list_entries",
    "listdir",
    "local_copy",
    "local_path",
    "move",
    "open_url",
    "policy",
    "read_bytes",
    "read_bytes_hashed",
    "remove",
    "reset_failures",
    "retry",
    "size",
    "write_bytes_atomic",
]


class StorageError(RuntimeError):
    """A storage operation failed; the message names the operation and the URL.

    ``operation`` and ``url`` name the first operation that failed (a later failure while cleaning
    up must not hide it; see ``repa.train.trainer``); either is "" when unknown.
    """

    def __init__(
        self, message: str, *, operation: str = "", url: str = "", failing_since: float | None = None
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.url = url
        self.failing_since = failing_since  # time.monotonic() of the operation's first failed attempt


_first_failure: StorageError | None = None
_failure_lock = threading.Lock()


def _record_failure(error: StorageError) -> None:
    global _first_failure
    with _failure_lock:
        if _first_failure is None or (error.failing_since or 0.0) < (_first_failure.failing_since or 0.0):
            _first_failure = error


def first_failure() -> StorageError | None:
    """The storage operation of this process that started failing first among those that ran out of
    their deadline (e.g. a background checkpoint upload, not the TensorBoard flush that failed after it
    during the same outage), or None. Error reporting names it (``repa.cli``)."""
    return _first_failure


def reset_failures() -> None:
    """Forget :func:`first_failure` (tests, or a long-lived process after recovering)."""
    global _first_failure
    with _failure_lock:
        _first_failure = None


@dataclass(frozen=True)
class Policy:
    """Timeouts of every remote storage operation of this process (the ``storage.*`` config keys)."""

    connect_timeout: float = 10.0
    """Seconds to open a TCP connection to the store."""
    read_timeout: float = 60.0
    """Seconds a socket may wait for the store's next bytes before the attempt counts as failed."""
    deadline: float = 600.0
    """Wall-clock seconds for one operation, all attempts and backoff included."""


_policy = Policy()


def configure(
    *, connect_timeout: float | None = None, read_timeout: float | None = None, deadline: float | None = None
) -> Policy:
    """Install this process's storage timeouts (None keeps a value); returns the new policy.

    Called with the run config's ``storage.*`` keys when a config is loaded (``repa.config``).
    """
    global _policy
    current = _policy
    _policy = Policy(
        connect_timeout=current.connect_timeout if connect_timeout is None else float(connect_timeout),
        read_timeout=current.read_timeout if read_timeout is None else float(read_timeout),
        deadline=current.deadline if deadline is None else float(deadline),
    )
    return _policy


def policy() -> Policy:
    """The storage timeouts in force (:func:`configure`)."""
    return _policy


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
    """The fsspec options of ``url`` with the policy's socket timeouts added (the user's win)."""
    options = dict(storage_options or {})
    p = _policy
    if url.startswith(("s3://", "s3a://")):
        # botocore Config (s3fs passes config_kwargs to it): socket timeouts, and no retries of its own:
        # repa.storage.retry is the one retry loop, so its deadline is the whole story.
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", p.connect_timeout)
        config.setdefault("read_timeout", p.read_timeout)
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 1})
        options["config_kwargs"] = config
    elif url.startswith(("gs://", "gcs://")):
        # gcsfs's first bucket access hangs ~60 s probing hierarchical namespaces unless told not to.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        if "requests_timeout" not in options:  # gcsfs passes it to every aiohttp request
            options["requests_timeout"] = _aiohttp_timeout(p)
    elif url.startswith(("http://", "https://")):
        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", _aiohttp_timeout(p))
        options["client_kwargs"] = client
    return options


def _aiohttp_timeout(p: Policy) -> Any:
    """aiohttp's per-socket timeouts (no total: a large transfer that keeps moving is not cut)."""
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=p.connect_timeout, sock_read=p.read_timeout)


def _attempt(fs: fsspec.AbstractFileSystem, remaining: float) -> dict[str, Any]:
    """Keyword arguments bounding one attempt of an fsspec call by the time left to the deadline.

    fsspec's async filesystems (s3fs, gcsfs, HTTP) run their coroutines through ``fsspec.asyn.sync``,
    which takes ``timeout=`` and cancels the coroutine when it passes (``FSTimeoutError``). Local and
    memory filesystems do not block on a network and take no such argument.
    """
    if getattr(fs, "async_impl", False):
        return {"timeout": max(1.0, remaining)}
    return {}


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
    return _retry(lambda left: fs.exists(path, **_attempt(fs, left)), what=url, operation="exists")


def size(url: str | Location, storage_options: dict[str, Any] | None = None) -> int:
    """Size in bytes of the file/object at ``url`` (FileNotFoundError naming the URL if absent)."""
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)
    try:
        return int(_retry(lambda left: fs.size(path, **_attempt(fs, left)), what=url, operation="size"))
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

    def ls(left: float) -> list[dict[str, Any]]:
        if _supports_refresh(fs):
            return fs.ls(path, detail=True, refresh=True, **_attempt(fs, left))
        return fs.ls(path, detail=True)

    try:
        infos = _retry(ls, what=url, operation="list")
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
    url: str | Location, storage_options: dict[str, Any] | None = None, *, attempts: int | None = None
) -> bytes:
    """The whole file/object in one request; transient errors are retried (see ``retry``) until the
    deadline, or ``attempts`` times."""
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)
    # s3fs splits objects > 50 MB into concurrent ranged GETs plus a HEAD and reassembles them in a
    # bytearray: twice the CPU of one streamed GET (measured on moto, benchmarks/loader.py).
    kwargs = {"max_concurrency": 1} if "s3" in _protocols(fs) else {}

    def read(left: float) -> bytes:
        try:
            return fs.cat_file(path, **kwargs, **_attempt(fs, left))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{url}: not found") from e

    return _retry(read, what=url, operation="read", attempts=attempts)


_HASH_CHUNK = 16 << 20


def read_bytes_hashed(
    url: str | Location, storage_options: dict[str, Any] | None = None, *, expected_size: int | None = None
) -> tuple[bytes, str]:
    """``(content, sha256 hex)`` of a file/object, hashed while it is read (one pass over the bytes).

    Streams 16 MiB reads into one buffer (``expected_size`` preallocates it), so verifying a multi-GB
    checkpoint costs no second pass; the whole read is retried under the deadline like
    :func:`read_bytes`.
    """
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)

    def read(left: float) -> tuple[bytes, str]:
        started = time.monotonic()
        digest = hashlib.sha256()
        buffer = bytearray()
        try:
            f = fs.open(path, "rb", block_size=_HASH_CHUNK, cache_type="none")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{url}: not found") from e
        with f:
            while True:
                if time.monotonic() - started > left:
                    raise TimeoutError(f"reading {url} outlived the deadline")
                chunk = f.read(_HASH_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                buffer += chunk
        return bytes(buffer), digest.hexdigest()

    return _retry(read, what=url, operation="read")


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
        except OSError as e:
            if e.filename is None:  # write()/fsync() errors (ENOSPC, EDQUOT, EIO) name no file: name it
                raise type(e)(e.errno, e.strerror or str(e), path) from e
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # A PUT is idempotent, so retrying a transient failure is safe.
        _retry(lambda left: fs.pipe_file(path, data, **_attempt(fs, left)), what=url, operation="write")


def remove(
    url: str | Location, recursive: bool = False, storage_options: dict[str, Any] | None = None
) -> None:
    url, storage_options = _split(url, storage_options)
    fs, path = filesystem(url, storage_options)

    def rm(left: float) -> None:
        if fs.exists(path, **_attempt(fs, left)):
            fs.rm(path, recursive=recursive, **_attempt(fs, left))

    _retry(rm, what=url, operation="remove")


def move(src: str | Location, dst: str | Location, storage_options: dict[str, Any] | None = None) -> None:
    """Move a file or folder (object stores: server-side copy, then delete) under the deadline."""
    src_url, storage_options = _split(src, storage_options)
    dst_url = dst.url if isinstance(dst, Location) else str(dst)
    fs, path = filesystem(src_url, storage_options)
    _, target = filesystem(dst_url, storage_options)
    if _is_local(fs):
        os.makedirs(os.path.dirname(target.rstrip("/")) or ".", exist_ok=True)
    _retry(
        lambda left: fs.mv(path, target, recursive=True, **_attempt(fs, left)), what=src_url, operation="move"
    )


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
    operation: str = "",
    attempts: int | None = None,
    deadline: float | None = None,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn()``; retry transient errors with exponential backoff and jitter, within a deadline.

    Attempt ``k`` (0-based) that fails transiently waits ``d/2 + U(0, d/2)`` seconds with
    ``d = min(max_delay, base_delay * 2**k)`` ("equal jitter", AWS Architecture Blog, "Exponential
    Backoff and Jitter"), so many pods hitting the same throttled bucket spread out. Non-transient
    errors (``is_transient`` is False) propagate unchanged at once. Retries stop when the next one
    would start past ``deadline`` seconds after the first call (default: the policy's, see
    :func:`configure`) or after ``attempts`` calls (default: no count limit); then a
    ``StorageError`` naming ``operation`` and ``what`` (the URL) is raised from the last error.
    """
    return _retry(
        lambda _left: fn(),
        what=what,
        operation=operation,
        attempts=attempts,
        deadline=deadline,
        base_delay=base_delay,
        max_delay=max_delay,
        sleep=sleep,
    )


def _retry(
    fn: Callable[[float], T],
    *,
    what: str,
    operation: str = "",
    attempts: int | None = None,
    deadline: float | None = None,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """:func:`retry` for a ``fn(seconds_left)`` that bounds its own attempt by the time left."""
    if attempts is not None and attempts < 1:
        raise ValueError(f"retry attempts: expected >= 1, got {attempts}")
    limit = _policy.deadline if deadline is None else float(deadline)
    start = clock()
    failing_since: float | None = None
    attempt = 0
    while True:
        try:
            return fn(max(0.0, limit - (clock() - start)))
        except Exception as e:
            if not is_transient(e):
                raise
            if failing_since is None:
                failing_since = time.monotonic()
            attempt += 1
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            delay = delay / 2 + random.uniform(0, delay / 2)
            elapsed = clock() - start
            out_of_attempts = attempts is not None and attempt >= attempts
            if out_of_attempts or elapsed + delay >= limit:
                why = (
                    f"failed after {attempt} attempts"
                    if out_of_attempts
                    else f"failed after {attempt} attempts: no answer within the {limit:g} s deadline "
                    "(storage.deadline_seconds)"
                )
                label = f"{operation} {what}" if operation else what
                error = StorageError(
                    f"{label}: {why} in {elapsed:.1f} s; last error: {type(e).__name__}: "
                    f"{' '.join(str(e).split()) or 'timed out'}",
                    operation=operation,
                    url=what,
                    failing_since=failing_since,
                )
                _record_failure(error)
                raise error from e
            logger.warning(
                "%s%s: transient error (%s: %s); retry %d in %.1fs (%.0f s of the %g s deadline left)",
                f"{operation} " if operation else "",
                what,
                type(e).__name__,
                e,
                attempt,
                delay,
                limit - elapsed,
                limit,
            )
            sleep(delay)
