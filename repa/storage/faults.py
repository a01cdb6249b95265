"""The fault policy: what repa does when a storage operation fails. Errors, transient tables, deadline
retry, first failure.

The seam (``repa.storage.location``) runs every remote call through :func:`run` (the retry loop
with one wall-clock deadline); this module decides which failures are worth retrying
(:func:`is_transient`: network errors, throttling, 5xx), which are the user's to fix at once
(:func:`is_access_error`: missing or wrong credentials, 401/403), and how each is reported: one
:class:`StorageError` line naming the operation, the URL and the likely fix (docs/kubernetes.md,
"Exit codes"). During an outage the retries are quiet: at most one progress line every
``PROGRESS_EVERY_SECONDS`` for the whole process, however many operations are waiting.

The timeouts (:class:`Policy`) are the ``storage.*`` config keys; a verb installs its config's with
:func:`configure` when it starts (``repa.config.config_from_args``), never a config load.
"""

from __future__ import annotations

import errno
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger("repa.storage")

T = TypeVar("T")

__all__ = [
    "PROGRESS_EVERY_SECONDS",
    "Policy",
    "StorageError",
    "access_fix",
    "configure",
    "exception_chain",
    "first_failure",
    "is_access_error",
    "is_transient",
    "policy",
    "reset_failures",
    "retry",
    "run",
    "unreachable_fix",
]


class StorageError(RuntimeError):
    """A storage operation failed; the message names the operation and the URL.

    ``operation`` and ``url`` name the first operation that failed (a later failure while cleaning
    up must not hide it; see ``repa.train.trainer``); either is "" when unknown. ``kind`` is
    ``"unreachable"`` (ran out of its deadline), ``"access"`` (credentials missing or refused: not
    retried) or ``""``.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        url: str = "",
        failing_since: float | None = None,
        kind: str = "",
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.url = url
        self.failing_since = failing_since  # time.monotonic() of the operation's first failed attempt
        self.kind = kind


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
    global _first_failure, _last_progress
    with _failure_lock:
        _first_failure = None
        _last_progress = None


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
    new: Policy | None = None,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    deadline: float | None = None,
) -> Policy:
    """Install this process's storage timeouts: ``new``, or the current ones with the given values
    replaced (None keeps a value); returns the policy now in force.

    A verb calls it once when it starts, with its config's ``storage.*`` keys
    (``StorageConfig.policy()``); loading a config never does.
    """
    global _policy
    current = new if new is not None else _policy
    _policy = Policy(
        connect_timeout=current.connect_timeout if connect_timeout is None else float(connect_timeout),
        read_timeout=current.read_timeout if read_timeout is None else float(read_timeout),
        deadline=current.deadline if deadline is None else float(deadline),
    )
    return _policy


def policy() -> Policy:
    """The storage timeouts in force (:func:`configure`)."""
    return _policy


# ----------------------------------------------------------------------------------------------
# Which failures are transient
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
# urllib3/requests and fsspec; matched by name so this module needs none of them installed.
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


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else unsuppressed context)."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in out):
        out.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return out


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) is worth retrying.

    Transient: connection reset/refused/aborted, timeouts, ``OSError`` with a network errno,
    botocore/aiohttp/urllib3 connection errors, HTTP 429 and 5xx, and S3 throttling codes
    (``SlowDown``, ``Throttling``, ``RequestTimeout``, ``InternalError``, ``ServiceUnavailable``).
    Never transient: not found, permission denied, and any other error (bad input must fail fast).
    """
    for link in exception_chain(exc):
        if isinstance(link, _NEVER_TRANSIENT):
            return False
        if _is_transient_one(link):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Which failures are the credentials' (never retried: fail at once, naming the fix)
# ----------------------------------------------------------------------------------------------

# botocore (NoCredentialsError ...) and google-auth (DefaultCredentialsError, RefreshError) classes.
_ACCESS_CLASS_NAMES = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "UnauthorizedSSOTokenError",
        "DefaultCredentialsError",
        "RefreshError",
    }
)
# S3 error codes of a request that was understood and refused for who sent it.
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "InvalidClientTokenId",
    }
)


def is_access_error(exc: BaseException) -> bool:
    """True if ``exc`` (or what it was raised from) says the credentials are missing, wrong or not
    allowed: botocore's ``NoCredentialsError``, google-auth's ``DefaultCredentialsError``, S3
    ``AccessDenied``/``InvalidAccessKeyId``/``SignatureDoesNotMatch``, HTTP 401/403, ``PermissionError``
    from a remote filesystem (s3fs translates 403 to it)."""
    for link in exception_chain(exc):
        if any(cls.__name__ in _ACCESS_CLASS_NAMES for cls in type(link).__mro__):
            return True
        if _error_code(link) in _ACCESS_CODES or _status_code(link) in (401, 403):
            return True
        if isinstance(link, OSError) and str(link).startswith("Forbidden"):  # gcsfs's 403
            return True
        # s3fs's PermissionError for AccessDenied names no local file (a local EACCES does)
        if isinstance(link, PermissionError) and link.filename is None and link.errno in (None, errno.EACCES):
            text = str(link)
            if any(word in text for word in ("Access Denied", "Forbidden", "403", "401", "credentials")):
                return True
    return False


def access_fix(url: str) -> str:
    """The likely fix for missing or refused credentials of ``url``'s store (docs/kubernetes.md)."""
    chart = (
        "in the Helm chart: storageAuth.existingSecret (a Secret of these variables) or "
        "serviceAccount.annotations (workload identity)"
    )
    if url.startswith(("s3://", "s3a://")):
        return (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or IRSA / EKS Pod Identity "
            f"on the pod's ServiceAccount) with access to this bucket; {chart}"
        )
    if url.startswith(("gs://", "gcs://")):
        return (
            "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or use GKE workload "
            f"identity) with access to this bucket; {chart}"
        )
    if url.startswith("hf://") or "huggingface" in url:
        return "set HF_TOKEN to a Hugging Face token that may read this repository"
    return f"check the credentials of this store; {chart}"


def unreachable_fix(url: str) -> str:
    """The likely fix when ``url``'s store does not answer (docs/kubernetes.md, "Exit codes")."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = "AWS_ENDPOINT_URL_S3 or storage_options.client_kwargs.endpoint_url"
    elif url.startswith(("gs://", "gcs://")):
        endpoint = "STORAGE_EMULATOR_HOST or storage_options.endpoint_url"
    else:
        endpoint = "the URL's host"
    return f"check that the store is reachable from here ({endpoint}, network policy, proxy), then rerun"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def access_error(operation: str, url: str, exc: BaseException) -> StorageError:
    """The one-line error of a refused or unauthenticated storage call (not retried)."""
    root = next((link for link in reversed(exception_chain(exc)) if is_access_error(link)), exc)
    label = f"{operation} {url}" if operation else url
    return StorageError(
        f"{label}: access denied or no credentials ({_short(root)[:200]}); {access_fix(url)}",
        operation=operation,
        url=url,
        kind="access",
    )


# ----------------------------------------------------------------------------------------------
# The retry loop: one deadline over all attempts, quiet progress
# ----------------------------------------------------------------------------------------------

PROGRESS_EVERY_SECONDS = 30.0
"""At most one "still retrying" WARNING line per this many seconds for the whole process."""

_last_progress: float | None = None


def _progress(message: str, now: float) -> bool:
    """True if a progress line may be printed now (the process-wide throttle), and take the slot."""
    global _last_progress
    with _failure_lock:
        if _last_progress is not None and now - _last_progress < PROGRESS_EVERY_SECONDS:
            return False
        _last_progress = now
    logger.warning("%s", message)
    return True


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
    errors (``is_transient`` is False) propagate unchanged at once, except missing or refused
    credentials (:func:`is_access_error`), which become a :class:`StorageError` naming the fix.
    Retries stop when the next one would start past ``deadline`` seconds after the first call
    (default: the policy's, see :func:`configure`) or after ``attempts`` calls (default: no count
    limit); then a ``StorageError`` naming ``operation`` and ``what`` (the URL) is raised from the
    last error.
    """
    return run(
        lambda _left: fn(),
        what=what,
        operation=operation,
        attempts=attempts,
        deadline=deadline,
        base_delay=base_delay,
        max_delay=max_delay,
        sleep=sleep,
    )


def run(
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
                if not isinstance(e, StorageError) and is_access_error(e):
                    raise access_error(operation, what, e) from e
                raise
            if failing_since is None:
                failing_since = time.monotonic()
            attempt += 1
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            delay = delay / 2 + random.uniform(0, delay / 2)
            elapsed = clock() - start
            out_of_attempts = attempts is not None and attempt >= attempts
            label = f"{operation} {what}" if operation else what
            if out_of_attempts or elapsed + delay >= limit:
                why = (
                    f"failed after {attempt} attempts"
                    if out_of_attempts
                    else f"failed after {attempt} attempts: no answer within the {limit:g} s deadline "
                    "(storage.deadline_seconds)"
                )
                error = StorageError(
                    f"{label}: {why} in {elapsed:.1f} s; last error: {type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300] or 'timed out'}; {unreachable_fix(what)}",
                    operation=operation,
                    url=what,
                    failing_since=failing_since,
                    kind="unreachable",
                )
                _record_failure(error)
                raise error from e
            message = (
                f"{label}: store not answering ({_short(e)[:160]}); retrying quietly, "
                f"{limit - elapsed:.0f} s of the {limit:g} s deadline (storage.deadline_seconds) left"
            )
            if not _progress(message, time.monotonic()):
                logger.debug("%s: retry %d in %.1f s", message, attempt, delay)
            sleep(delay)
