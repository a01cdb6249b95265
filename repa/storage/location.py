"""The seam: the one module that touches fsspec. URLs, locations, atomic writes, listing, local copies.

Every storage location in repa is a URL (``s3://``, ``gs://``, ``memory://``, ``file://``) or a
plain local path. Credentials and endpoints come from the environment (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS`` ...) or from fsspec options, never
from code. A :class:`Location` binds a URL to its fsspec options once, so the options travel
with the URL to whatever reads it (weights, data, checkpoints); the config hands them out
(``cfg.storage.locate(url)``). Every operation takes a URL or a Location, nothing else.

This module alone decides whether a URL is local (:func:`is_local`, :func:`local_path`) and where
remote files are cached for libraries that only read paths (:func:`cache_dir`, :func:`local_copy`).
``hf://<org>/<name>/<path>`` URLs are read through the Hugging Face cache (``repa.hf_cache``).

Deadlines (docs/architecture.md, "Nothing blocks without a bound"): every remote operation has
connect/read timeouts on its sockets (botocore's ``connect_timeout``/``read_timeout`` through s3fs's
``config_kwargs``; aiohttp's ``sock_connect``/``sock_read`` for gcsfs and HTTP) and one wall-clock
deadline over all its attempts (``repa.storage.faults.run``; fsspec's ``sync(..., timeout=)`` cancels
an attempt that outlives it, so a store that accepts bytes and never answers cannot hold a PUT
forever). What is retried, and how a failure is reported, is the policy's (``repa.storage.faults``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from repa.storage.faults import Policy, access_error, is_access_error, policy, run

if TYPE_CHECKING:
    import fsspec

logger = logging.getLogger("repa.storage")

# write_bytes_atomic's temporary sibling: ".tmp-<32 hex>-<target name>".
_TEMP_PREFIX = ".tmp-"
_TEMP_RE = re.compile(r"^\.tmp-[0-9a-f]{32}-(.+)$")


@dataclass(frozen=True)
class Location:
    """A URL (or local path) together with the fsspec options needed to reach it.

    Every function here takes a ``Location`` wherever it takes a URL. ``Location(url)`` has no options
    (environment credentials only).
    """

    url: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` below this one, with the same options."""
        return join(self, *parts)

    def __str__(self) -> str:
        return self.url


def locate(where: str | Location) -> Location:
    """``where`` as a Location (a plain URL has no options: environment credentials only)."""
    return where if isinstance(where, Location) else Location(str(where))


def _split(where: str | Location) -> tuple[str, dict[str, Any]]:
    """``(url, fsspec options)`` of a URL (no options) or a Location."""
    if isinstance(where, Location):
        return where.url, dict(where.options)
    return str(where), {}


def fs_options(url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options of ``url`` with the policy's socket timeouts added (the user's win)."""
    options = dict(options or {})
    p = policy()
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


def filesystem(where: str | Location, *, operation: str = "open") -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path within it)`` for a URL, local path or Location.

    Credentials that fail already here (gcsfs reads its key file when built) raise the one-line
    :class:`~repa.storage.faults.StorageError` naming ``operation``, the URL and the fix.
    """
    from fsspec.core import url_to_fs  # here, not at import: config code uses is_local without fsspec

    url, options = _split(where)
    if url.startswith("hf://"):  # read through the Hugging Face cache (repa.hf_cache)
        from repa.hf_cache import cached_hf_path

        return url_to_fs(cached_hf_path(url))
    try:
        return url_to_fs(url, **fs_options(url, options))
    except Exception as e:
        if is_access_error(e):
            raise access_error(operation, url, e) from e
        raise


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


def local_copy(url: str | Location, *, kind: str = "files") -> str:
    """A local path holding the file at ``url``: a local path as is, a remote object copied once.

    For libraries that only read paths (torch-fidelity, diffusers, ``np.load``). Copies live under
    ``cache_dir()/kind/<hash of the URL>-<name>``; a copy whose size differs from the remote object
    is refreshed, and the copy is written atomically, so concurrent pods never read half a file.
    """
    text = url.url if isinstance(url, Location) else str(url)
    if text.startswith("hf://"):  # already a local file in the Hugging Face cache
        return filesystem(text)[1]
    path = local_path(text)
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{text}: not found")
        return path
    remote_size = size(url)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    name = text.rstrip("/").rsplit("/", 1)[-1] or "file"
    local = os.path.join(cache_dir(), kind, f"{key}-{name}")
    if not (os.path.exists(local) and os.path.getsize(local) == remote_size):
        logger.info("copying %s to %s", text, local)
        write_bytes_atomic(local, read_bytes(url))
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


def exists(where: str | Location) -> bool:
    url, _ = _split(where)
    fs, path = filesystem(where, operation="exists")
    return run(lambda left: fs.exists(path, **_attempt(fs, left)), what=url, operation="exists")


def size(where: str | Location) -> int:
    """Size in bytes of the file/object at ``where`` (FileNotFoundError naming the URL if absent)."""
    url, _ = _split(where)
    fs, path = filesystem(where, operation="size")
    try:
        return int(run(lambda left: fs.size(path, **_attempt(fs, left)), what=url, operation="size"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: not found") from e


def listdir(where: str | Location) -> list[str]:
    """Names (not full paths) directly under ``where``, sorted; empty if it does not exist."""
    return [entry.name for entry in list_entries(where)]


@dataclass(frozen=True)
class Entry:
    """One item directly under a folder URL (``list_entries``)."""

    name: str
    is_dir: bool
    size: int | None  # bytes for files; None (or 0) for folders


def list_entries(where: str | Location) -> list[Entry]:
    """Items directly under ``where`` with their kind and size, sorted by name; empty if absent.

    One listing call (object stores: one LIST per 1000 keys), so callers can check many files'
    existence and size without a request each.
    """
    url, _ = _split(where)
    fs, path = filesystem(where, operation="list")

    def ls(left: float) -> list[dict[str, Any]]:
        if _supports_refresh(fs):
            return fs.ls(path, detail=True, refresh=True, **_attempt(fs, left))
        return fs.ls(path, detail=True)

    try:
        infos = run(ls, what=url, operation="list")
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


def cleanup_temps(where: str | Location, names: Iterable[str]) -> int:
    """Remove leftovers of interrupted ``write_bytes_atomic`` calls for ``names`` in folder ``where``.

    Only temporaries of the given target names are touched, so a worker never deletes a file that
    another worker is writing right now. Object stores have no temporaries (a PUT is atomic).
    Returns how many were removed.
    """
    fs, _ = filesystem(where, operation="list")
    if not _is_local(fs):
        return 0
    wanted = set(names)
    removed = 0
    for entry in list_entries(where):
        m = _TEMP_RE.match(entry.name)
        if m and m.group(1) in wanted:
            remove(join(where, entry.name))
            removed += 1
    return removed


def _supports_refresh(fs: fsspec.AbstractFileSystem) -> bool:
    # Object-store filesystems cache listings; a watcher must see new objects, so ask for a refresh.
    return fs.protocol not in ("file", "local", "memory") and not (
        isinstance(fs.protocol, tuple) and ("file" in fs.protocol or "memory" in fs.protocol)
    )


@contextmanager
def open_url(where: str | Location, mode: str = "rb") -> Iterator[IO]:
    """Open a URL for reading or (non-atomic) writing; parent folders are created for local files."""
    url, _ = _split(where)
    operation = "write" if "w" in mode else "open"
    fs, path = filesystem(where, operation=operation)
    if "w" in mode and _is_local(fs):
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        f = fs.open(path, mode)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: not found") from e
    except Exception as e:
        if is_access_error(e):
            raise access_error(operation, url, e) from e
        raise
    with f:
        yield f


def read_bytes(where: str | Location, *, attempts: int | None = None) -> bytes:
    """The whole file/object in one request; transient errors are retried (see
    ``repa.storage.faults.retry``) until the deadline, or ``attempts`` times."""
    url, _ = _split(where)
    fs, path = filesystem(where, operation="read")
    # s3fs splits objects > 50 MB into concurrent ranged GETs plus a HEAD and reassembles them in a
    # bytearray: twice the CPU of one streamed GET (measured on moto, benchmarks/loader.py).
    kwargs = {"max_concurrency": 1} if "s3" in _protocols(fs) else {}

    def read(left: float) -> bytes:
        try:
            return fs.cat_file(path, **kwargs, **_attempt(fs, left))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{url}: not found") from e

    return run(read, what=url, operation="read", attempts=attempts)


_HASH_CHUNK = 16 << 20


def read_bytes_hashed(where: str | Location) -> tuple[bytes, str]:
    """``(content, sha256 hex)`` of a file/object, hashed while it is read (one pass over the bytes).

    Streams 16 MiB reads into one buffer, so verifying a multi-GB
    checkpoint costs no second pass; the whole read is retried under the deadline like
    :func:`read_bytes`.
    """
    url, _ = _split(where)
    fs, path = filesystem(where, operation="read")

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

    return run(read, what=url, operation="read")


def write_bytes_atomic(where: str | Location, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole object.

    Local files: write a temporary sibling, fsync, then ``os.replace`` (atomic on POSIX).
    Object stores (S3, GCS): a single PUT is already atomic, an object is visible only once
    complete, so we upload directly.
    """
    url, _ = _split(where)
    fs, path = filesystem(where, operation="write")
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
        run(lambda left: fs.pipe_file(path, data, **_attempt(fs, left)), what=url, operation="write")


def remove(where: str | Location, recursive: bool = False) -> None:
    url, _ = _split(where)
    fs, path = filesystem(where, operation="remove")

    def rm(left: float) -> None:
        if fs.exists(path, **_attempt(fs, left)):
            fs.rm(path, recursive=recursive, **_attempt(fs, left))

    run(rm, what=url, operation="remove")


def move(src: str | Location, dst: str | Location) -> None:
    """Move a file or folder (object stores: server-side copy, then delete) under the deadline.

    Both ends are on the same store: ``src``'s options (a Location's) reach it.
    """
    src_url, options = _split(src)
    dst_url = dst.url if isinstance(dst, Location) else str(dst)
    fs, path = filesystem(src, operation="move")
    _, target = filesystem(Location(dst_url, options), operation="move")
    if _is_local(fs):
        os.makedirs(os.path.dirname(target.rstrip("/")) or ".", exist_ok=True)
    run(
        lambda left: fs.mv(path, target, recursive=True, **_attempt(fs, left)), what=src_url, operation="move"
    )


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = _protocols(fs)
    return "file" in protocol or "local" in protocol
