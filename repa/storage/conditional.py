"""Conditional writes: create an object only if it is absent, replace or delete it only if it is
still the version one read. The run lease (``repa.lease``) is built on these; nothing else needs them.

Each store has its own compare-and-swap, and the version token it compares:

- **S3**: ``PUT`` with ``If-None-Match: *`` (create) or ``If-Match: <ETag>`` (replace), answered
  ``412 Precondition Failed`` (or ``409 ConditionalRequestConflict`` for two writes in flight) when
  the condition does not hold (https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html).
  s3fs forwards extra keyword arguments of ``pipe_file`` to ``put_object`` and returns its response,
  so both go through fsspec. Reads use the client's ``get_object``, which returns the body and its
  ETag in one response (``cat_file`` + ``info`` would be two, and a write in between would pair old
  bytes with a new ETag). Conditional deletes (``If-Match`` on DELETE) are not offered by every
  S3-compatible store, so :func:`delete` checks and deletes (documented there).
- **GCS**: the JSON API's ``ifGenerationMatch=0`` (create) or ``=<generation>`` (replace, delete)
  (https://cloud.google.com/storage/docs/request-preconditions). gcsfs offers only the first
  (``pipe_file(mode="create")``) and returns no generation, so the upload is made through gcsfs's own
  authenticated ``_call`` (media upload) whose JSON answer carries the new generation.
- **Local or mounted file systems**: create is ``os.link`` of a complete temporary file (fails with
  ``EEXIST``: atomic, and no reader sees a half-written file, which ``O_EXCL`` alone would allow);
  replace and delete compare the content's sha256 under an ``flock`` of a ``.<name>.lock`` sibling.
  A file system without hard links or ``flock`` (gcsfuse, some FUSE mounts) is unsupported.
- **memory://** (tests): a process-wide lock around compare and write.

Any other store raises :class:`Unsupported`. A store that *accepts* the headers but ignores them
(older S3-compatible servers) is caught by :func:`check`, which the lease runs once before relying on
them: a second create of one object must fail.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from repa import storage
from repa.storage import Location
from repa.storage.faults import _error_code, _status_code

__all__ = [
    "PreconditionFailed",
    "Unsupported",
    "Versioned",
    "check",
    "create",
    "delete",
    "read",
    "replace",
    "write_fenced",
]

T = TypeVar("T")

log = logging.getLogger(__name__)


class PreconditionFailed(RuntimeError):
    """The object exists (create) or is no longer the version the caller read (replace, delete)."""


class Unsupported(RuntimeError):
    """The store offers no conditional write repa can use; the message names the store and the opt-out."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the store's version token of exactly those bytes (ETag, generation, sha256)."""

    data: bytes
    token: str


def _kind(where: Location) -> tuple[str, Any, str]:
    """``(kind, filesystem, path)``; kind is ``local``, ``memory``, ``s3`` or ``gcs``."""
    fs, path = storage.filesystem(where)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if storage.local_path(where.url) is not None or "file" in protocols or "local" in protocols:
        return "local", fs, path
    for kind, names in (("memory", ("memory",)), ("s3", ("s3", "s3a")), ("gcs", ("gs", "gcs"))):
        if any(p in names for p in protocols):
            return kind, fs, path
    raise Unsupported(
        f"{where.url}: conditional writes are not available on {protocols[0]}:// stores (repa knows S3, "
        "GCS and local file systems); set storage.lease_conditional_writes=false to run with a lease that "
        "cannot exclude a second trainer started at the same moment"
    )


def _failed_precondition(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):  # s3fs (If-None-Match) and gcsfs map 412 to it
        return True
    return any(
        _status_code(e) in (409, 412)
        or _error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict")
        for e in storage.exception_chain(exc)
    )


def _remote(where: Location, operation: str, fn: Callable[[], T]) -> T:
    """``fn`` retried on transient errors within the storage deadline; a failed condition is
    :class:`PreconditionFailed` at once (retrying cannot make it hold)."""

    def attempt() -> T:
        try:
            return fn()
        except PreconditionFailed:
            raise
        except FileNotFoundError as e:
            if operation not in ("replace", "delete"):
                raise
            # If-Match / ifGenerationMatch=<n> on an object that is gone: 404 on S3 (and on GCS for a delete)
            raise PreconditionFailed(f"{where.url}: {operation}: the object is gone") from e
        except Exception as e:
            if _failed_precondition(e):
                raise PreconditionFailed(f"{where.url}: {operation}: the condition did not hold") from e
            raise

    return storage.retry(attempt, what=where.url, operation=operation)


def _sync(fs: Any, coro: Any) -> Any:
    from fsspec.asyn import sync

    return sync(fs.loop, lambda: coro, timeout=max(1.0, storage.policy().deadline))


# ---------------------------------------------------------------------------------------------- local
_memory_lock = threading.Lock()


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``path`` (released when the process dies)."""
    import fcntl

    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    fd = os.open(os.path.join(directory, f".{name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise Unsupported(f"{path}: this file system has no flock ({e.strerror})") from e
        yield
    finally:
        os.close(fd)


def _local_read(path: str) -> Versioned | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return Versioned(data, hashlib.sha256(data).hexdigest())


def _local_write(path: str, data: bytes, *, exclusive: bool, fence: Callable[[], None] | None = None) -> None:
    """Write a complete temporary sibling, run ``fence``, then link (exclusive) or rename it over
    ``path``. A write error names ``path``. (The content's token is the caller's to compute: a fenced
    checkpoint file needs none, and hashing a multi-GB state.pt here would repeat the marker's hash.)"""
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(
        directory, f".tmp-{uuid.uuid4().hex}-{name}"
    )  # storage.cleanup_temps removes leftovers
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if fence is not None:
            fence()
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PreconditionFailed(f"{path}: exists") from None
            except OSError as e:
                if e.errno in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
                    raise Unsupported(f"{path}: this file system has no hard links ({e.strerror})") from e
                raise
    except OSError as e:
        if e.filename is None:  # write()/fsync() errors (ENOSPC, EIO) name no file: name it
            raise type(e)(e.errno, e.strerror or str(e), path) from e
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _memory_read(fs: Any, path: str) -> Versioned | None:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return Versioned(data, hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------------------------------------- GCS
def _gcs_meta(fs: Any, path: str) -> dict[str, Any] | None:
    bucket, key, _ = fs.split_path(path)
    try:
        return _sync(fs, fs._call("GET", "b/{}/o/{}", bucket, key, json_out=True))
    except FileNotFoundError:
        return None


def _gcs_read(fs: Any, path: str) -> Versioned | None:
    """Metadata, bytes, metadata again: equal generations before and after mean the bytes are that
    generation's (the emulator's download carries no generation header, so this works on both)."""
    bucket, key, _ = fs.split_path(path)
    while True:
        before = _gcs_meta(fs, path)
        if before is None:
            return None
        try:
            _, data = _sync(fs, fs._call("GET", "b/{}/o/{}", bucket, key, alt="media"))
        except FileNotFoundError:
            continue  # deleted in between: look again
        after = _gcs_meta(fs, path)
        if after is not None and after["generation"] == before["generation"]:
            return Versioned(bytes(data), str(after["generation"]))


def _gcs_upload(fs: Any, path: str, data: bytes, generation: str) -> str:
    bucket, key, _ = fs.split_path(path)
    out = _sync(
        fs,
        fs._call(
            "POST",
            f"{fs._location}/upload/storage/v1/b/{bucket}/o",
            uploadType="media",
            name=key,
            ifGenerationMatch=generation,
            headers={"Content-Type": "application/octet-stream"},
            data=data,
            json_out=True,
        ),
    )
    fs.invalidate_cache(path)
    return str(out["generation"])


# ---------------------------------------------------------------------------------------------- S3
def _s3_read(fs: Any, path: str) -> Versioned | None:
    bucket, key, _ = fs.split_path(path)

    async def get() -> Versioned | None:
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        async with response["Body"] as body:
            data = await body.read()
        return Versioned(data, response["ETag"])

    return _sync(fs, get())


def _s3_put(fs: Any, path: str, data: bytes, **condition: str) -> str:
    out = fs.pipe_file(path, data, **condition)
    return str(out["ETag"])


# ---------------------------------------------------------------------------------------------- API
def read(where: Location) -> Versioned | None:
    """The object's bytes and version token, or None if it does not exist."""
    kind, fs, path = _kind(where)
    if kind == "local":
        return _local_read(path)
    if kind == "memory":
        with _memory_lock:
            return _memory_read(fs, path)
    reader = _s3_read if kind == "s3" else _gcs_read
    return _remote(where, "read", lambda: reader(fs, path))


def create(where: Location, data: bytes) -> str:
    """Write ``data`` only if the object does not exist; its version token (PreconditionFailed if it
    exists). A retry after a lost answer may find its own write: callers compare the content."""
    kind, fs, path = _kind(where)
    if kind == "local":
        with _local_lock(path):
            _local_write(path, data, exclusive=True)
        return hashlib.sha256(data).hexdigest()
    if kind == "memory":
        with _memory_lock:
            if fs.exists(path):
                raise PreconditionFailed(f"{where.url}: exists")
            fs.pipe_file(path, data)
            return hashlib.sha256(data).hexdigest()
    if kind == "s3":
        return _remote(where, "create", lambda: _s3_put(fs, path, data, IfNoneMatch="*"))
    return _remote(where, "create", lambda: _gcs_upload(fs, path, data, "0"))


@contextlib.contextmanager
def _held_locally(where: Location, kind: str, fs: Any, path: str, token: str) -> Iterator[None]:
    """Under the local or process lock: PreconditionFailed unless the object's version is ``token``."""
    with _local_lock(path) if kind == "local" else _memory_lock:
        current = _local_read(path) if kind == "local" else _memory_read(fs, path)
        if current is None or current.token != token:
            raise PreconditionFailed(f"{where.url}: changed since it was read")
        yield


def replace(where: Location, data: bytes, token: str) -> str:
    """Overwrite the object only if its version is still ``token``; the new token."""
    kind, fs, path = _kind(where)
    if kind in ("local", "memory"):
        with _held_locally(where, kind, fs, path, token):
            if kind == "local":
                _local_write(path, data, exclusive=False)
            else:
                fs.pipe_file(path, data)
        return hashlib.sha256(data).hexdigest()
    if kind == "s3":
        return _remote(where, "replace", lambda: _s3_put(fs, path, data, IfMatch=token))
    return _remote(where, "replace", lambda: _gcs_upload(fs, path, data, token))


def delete(where: Location, token: str) -> None:
    """Delete the object only if its version is still ``token`` (PreconditionFailed otherwise).

    On S3 the check and the delete are two requests (``DeleteObject`` with ``If-Match`` is recent and
    not implemented by every S3-compatible store); a lease is deleted only by its holder at exit, and a
    takeover in that instant needs the holder's lease to be stale while it is still running.
    """
    kind, fs, path = _kind(where)
    if kind in ("local", "memory"):
        with _held_locally(where, kind, fs, path, token):
            fs.rm_file(path)
        return
    if kind == "s3":
        current = read(where)
        if current is None or current.token != token:
            raise PreconditionFailed(f"{where.url}: changed since it was read")
        _remote(where, "delete", lambda: fs.rm_file(path))
        return
    bucket, key, _ = fs.split_path(path)

    def rm() -> None:
        _sync(fs, fs._call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=token))
        fs.invalidate_cache(path)

    _remote(where, "delete", rm)


def check(where: Location) -> None:
    """Raise :class:`Unsupported` unless the store refuses a second create of one object (a store that
    ignores ``If-None-Match`` would let two trainers both win). Uses a throw-away object beside ``where``."""
    if _kind(where)[0] in ("local", "memory"):
        return  # link(2) and the locks above cannot be ignored
    probe = Location(where.url.rsplit("/", 1)[0] + f"/.conditional-probe-{uuid.uuid4().hex}", where.options)
    create(probe, b"1")
    try:
        create(probe, b"2")
    except PreconditionFailed:
        pass
    else:
        raise Unsupported(
            f"{where.url}: the store accepted a second create of one object (it ignores If-None-Match / "
            "ifGenerationMatch=0), so two trainers could both take the lease; use a store with conditional "
            "writes or set storage.lease_conditional_writes=false"
        )
    finally:
        with contextlib.suppress(Exception):
            storage.remove(probe)


def write_fenced(where: Location, data: bytes, fence: Callable[[], None], *, exclusive: bool = False) -> None:
    """``storage.write_bytes_atomic`` with ``fence()`` (``Lease.check_held``) run right before the
    bytes become visible: before the rename of the complete temporary file (local), before every
    attempt of the PUT (object stores; a retry after a lost connection is a new write, and must not land
    after a takeover).

    A writer frozen between its fence and its write (or with a PUT in flight) can still land that one
    write after a takeover. With ``exclusive`` (checkpoint files) the write is a create-if-absent, so
    that late write can never replace the new owner's file; when the new owner finds such a file in its
    way it checks its own lease, removes the intruder and writes again.
    """
    for attempt in range(3):
        try:
            _write_fenced_once(where, data, fence, exclusive)
            return
        except PreconditionFailed:
            if attempt == 2:
                raise
            fence()  # still ours: the object is a late write of an evicted writer (or our own retry)
            log.warning(
                "%s: replacing an object this process did not write (an evicted writer's?)", where.url
            )
            storage.remove(where)


def _write_fenced_once(where: Location, data: bytes, fence: Callable[[], None], exclusive: bool) -> None:
    kind, fs, path = _kind(where)
    if kind == "local":
        _local_write(path, data, exclusive=exclusive, fence=fence)
        return
    if kind == "memory":
        fence()
        with _memory_lock:
            if exclusive and fs.exists(path):
                raise PreconditionFailed(f"{where.url}: exists")
            fs.pipe_file(path, data)
        return
    write = _s3_write_fenced if kind == "s3" else _gcs_write_fenced
    _remote(where, "create" if exclusive else "write", lambda: write(fs, path, data, fence, exclusive))
    fs.invalidate_cache(path)


# s3fs and gcsfs retry a failed request themselves (s3fs's _error_wrapper, gcsfs's retry_request), after
# a lost connection too: such a retry of the request that makes an object visible would skip the fence.
# So that request goes to the client below them, and repa.storage.retry (fence first) is the only retry.
_S3_SINGLE_PUT = 64 << 20  # larger objects: multipart upload (one PUT holds at most 5 GB)
_GCS_SIMPLE_UPLOAD = 32 << 20  # gcsfs's own limit for its single-request upload is 50 MB


def _s3_write_fenced(fs: Any, path: str, data: bytes, fence: Callable[[], None], exclusive: bool) -> None:
    # The fence reads the lease through fsspec's event loop, so it runs between the coroutines, not in one.
    bucket, key, _ = fs.split_path(path)
    condition = {"IfNoneMatch": "*"} if exclusive else {}
    _sync(fs, fs.set_session())
    if len(data) <= _S3_SINGLE_PUT:
        fence()
        _sync(fs, fs._s3.put_object(Bucket=bucket, Key=key, Body=data, **condition))
        return
    upload_id = _sync(fs, fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key))["UploadId"]

    async def parts() -> list[dict[str, Any]]:
        done = []
        for number, start in enumerate(range(0, len(data), _S3_SINGLE_PUT), start=1):
            out = await fs._call_s3(  # parts are invisible until completed: s3fs may retry them
                "upload_part",
                Bucket=bucket,
                Key=key,
                PartNumber=number,
                UploadId=upload_id,
                Body=data[start : start + _S3_SINGLE_PUT],
            )
            done.append({"PartNumber": number, "ETag": out["ETag"]})
        return done

    try:
        uploaded = _sync(fs, parts())
        fence()
        _sync(
            fs,
            fs._s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": uploaded}, **condition
            ),
        )
    except BaseException:
        with contextlib.suppress(Exception):
            _sync(fs, fs._s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id))
        raise


def _gcs_write_fenced(fs: Any, path: str, data: bytes, fence: Callable[[], None], exclusive: bool) -> None:
    fence()
    if len(data) > _GCS_SIMPLE_UPLOAD:
        # A resumable upload becomes visible with its last chunk, which gcsfs sends (and may retry)
        # itself: this write is fenced once, before it starts.
        fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")
        return
    bucket, key, _ = fs.split_path(path)
    request = getattr(type(fs)._request, "__wrapped__", None)  # gcsfs's request without its retries
    args = ("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o")
    kwargs = {"uploadType": "media", "name": key, "headers": {"Content-Type": "application/octet-stream"}}
    if exclusive:
        kwargs["ifGenerationMatch"] = "0"
    if request is not None:
        _sync(fs, request(fs, *args, data=data, **kwargs))
    else:
        _sync(fs, fs._call(*args, data=data, **kwargs))
