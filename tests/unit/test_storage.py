"""repa.storage: transient-error classification, retry with backoff, listings and temp cleanup."""

from __future__ import annotations

import errno
import uuid

import pytest

from repa import storage
from repa.storage.faults import run


class _ClientError(Exception):
    """Shaped like botocore.exceptions.ClientError (``response`` dict), without importing botocore."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):  # same class name as botocore's
    pass


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset by peer"),
        ConnectionRefusedError("refused"),
        TimeoutError("read timed out"),
        OSError(errno.ECONNRESET, "Connection reset by peer"),
        _ClientError("SlowDown", 503),
        _ClientError("InternalError", 500),
        _ClientError("Whatever", 502),
        _ClientError("TooManyRequestsException", 429),
        EndpointConnectionError("Could not connect to the endpoint URL"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:20],
)
def test_network_and_throttling_errors_are_transient(exc):
    assert storage.is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError("s3://b/x"),
        PermissionError("denied"),
        ValueError("bad input"),
        _ClientError("AccessDenied", 403),
        _ClientError("NoSuchBucket", 404),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:20],
)
def test_client_errors_are_not_transient(exc):
    assert not storage.is_transient(exc)


def test_transient_cause_is_found_through_exception_chaining():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as e:
            raise OSError(errno.EIO, "s3fs wrapped it") from e
    except OSError as wrapped:
        assert storage.is_transient(wrapped)


def test_retry_recovers_from_transient_errors_with_growing_capped_delays():
    calls, delays = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError("reset")
        return "ok"

    assert storage.retry(flaky, what="s3://b/k", base_delay=1.0, max_delay=3.0, sleep=delays.append) == "ok"
    assert len(calls) == 4 and len(delays) == 3
    for k, d in enumerate(delays):  # equal jitter: in [cap/2, cap] with cap = min(max, base * 2**k)
        cap = min(3.0, 1.0 * 2**k)
        assert cap / 2 <= d <= cap


def test_retry_gives_up_with_a_storage_error_naming_the_url():
    delays = []

    def always():
        raise TimeoutError("read timed out")

    with pytest.raises(storage.StorageError, match=r"s3://bucket/shard-000001\.tar: failed after 3 attempts"):
        storage.retry(always, what="s3://bucket/shard-000001.tar", attempts=3, sleep=delays.append)
    assert len(delays) == 2


def test_retry_does_not_retry_permanent_errors():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/nope")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, what="s3://b/nope", sleep=lambda d: None)
    assert len(calls) == 1


def test_list_entries_sizes_and_temp_cleanup(tmp_path):
    url = f"file://{tmp_path}"
    storage.write_bytes_atomic(f"{url}/a.tar", b"12345")
    (tmp_path / "sub").mkdir()
    mine = tmp_path / f".tmp-{uuid.uuid4().hex}-a.tar"
    other = tmp_path / f".tmp-{uuid.uuid4().hex}-b.tar"
    mine.write_bytes(b"x")
    other.write_bytes(b"x")
    entries = {e.name: e for e in storage.list_entries(url)}
    assert entries["a.tar"].size == 5 and not entries["a.tar"].is_dir and entries["sub"].is_dir
    assert storage.size(f"{url}/a.tar") == 5
    assert storage.cleanup_temps(url, ["a.tar"]) == 1
    assert not mine.exists() and other.exists()  # another worker's temp file is left alone
    with pytest.raises(FileNotFoundError, match="not found"):
        storage.size(f"{url}/nope")


def test_memory_listing_and_missing_folder():
    url = f"memory://st-{uuid.uuid4().hex}"
    assert storage.list_entries(url) == []
    storage.write_bytes_atomic(f"{url}/x/y.bin", b"abc")
    assert [(e.name, e.is_dir) for e in storage.list_entries(url)] == [("x", True)]
    assert storage.cleanup_temps(url, ["y.bin"]) == 0  # object-like stores have no temporaries
    storage.remove(url, recursive=True)


def test_retry_stops_at_the_deadline_naming_operation_and_url():
    storage.reset_failures()
    now = [0.0]

    def clock() -> float:
        return now[0]

    def sleep(d: float) -> None:
        now[0] += d

    def silent(left: float):
        now[0] += min(left, 1.5)  # an attempt ends by its read timeout
        raise TimeoutError("read timed out")

    with pytest.raises(storage.StorageError) as info:
        run(silent, what="s3://b/run/state.pt", operation="write", deadline=10, sleep=sleep, clock=clock)
    assert now[0] <= 10.0
    assert info.value.operation == "write" and info.value.url == "s3://b/run/state.pt"
    assert str(info.value).startswith("write s3://b/run/state.pt: failed after") and "10 s deadline" in str(
        info.value
    )
    assert storage.first_failure() is info.value
    storage.reset_failures()


def test_remote_filesystems_get_socket_timeouts_and_no_retries_of_their_own():
    before = storage.policy()
    try:
        storage.configure(connect_timeout=3, read_timeout=7)
        s3 = storage.fs_options("s3://b/k", {"config_kwargs": {"read_timeout": 99}})["config_kwargs"]
        assert s3["connect_timeout"] == 3 and s3["read_timeout"] == 99  # the user's value wins
        assert s3["retries"]["total_max_attempts"] == 1
        gcs = storage.fs_options("gs://b/k")["requests_timeout"]
        assert (gcs.sock_connect, gcs.sock_read, gcs.total) == (3, 7, None)
        assert storage.fs_options("file:///x") == {}
    finally:
        storage.configure(
            connect_timeout=before.connect_timeout, read_timeout=before.read_timeout, deadline=before.deadline
        )


def test_loading_configs_touches_no_global_and_a_verb_start_installs_its_timeouts():
    from types import SimpleNamespace

    from repa.config import config_from_args, load_config

    before = storage.policy()
    try:
        fast = load_config(None, ["storage.deadline_seconds=5", "storage.connect_timeout_seconds=1"])
        slow = load_config(None, ["storage.deadline_seconds=900", "storage.read_timeout_seconds=120"])
        assert storage.policy() == before  # loading is pure
        assert fast.storage.policy() == storage.Policy(connect_timeout=1, read_timeout=60, deadline=5)
        assert slow.storage.policy() == storage.Policy(connect_timeout=10, read_timeout=120, deadline=900)
        args = SimpleNamespace(config=None, overrides=["storage.deadline_seconds=7"])
        assert config_from_args(args).storage.deadline_seconds == 7
        assert storage.policy().deadline == 7  # a verb's start installs its config's timeouts
        assert fast.storage.policy().deadline == 5 and slow.storage.policy().deadline == 900
    finally:
        storage.configure(before)


def test_every_url_of_a_config_is_a_location_with_the_options_that_reach_it():
    from repa.config import load_config

    data_opts = "data.storage_options.client_kwargs.endpoint_url=http://data:9000"
    run_opts = "storage.storage_options.client_kwargs.endpoint_url=http://run:9000"
    cfg = load_config(None, ["data.url=s3://d/imagenet", "storage.run_url=s3://r/run", data_opts, run_opts])
    data = {"client_kwargs": {"endpoint_url": "http://data:9000"}}
    run_ = {"client_kwargs": {"endpoint_url": "http://run:9000"}}
    assert (
        cfg.storage.locate(cfg.data.url) == storage.Location("s3://d/imagenet", data) == cfg.data.location()
    )
    assert cfg.storage.locate("s3://d/imagenet/manifest.json").options == data
    assert cfg.storage.locate("s3://d/imagenet-other/x").options == run_  # a sibling, not below data.url
    assert cfg.storage.locate(cfg.storage.run_url) == storage.Location("s3://r/run", run_)
    assert cfg.storage.locate(None) is None
    here = storage.Location("s3://x/y", {"anon": True})
    assert cfg.storage.locate(here) is here
    cfg.data = type(cfg.data)(url="s3://d2/set")  # replacing a section keeps the link
    assert cfg.storage.locate("s3://d2/set/a").options == {}


@pytest.mark.parametrize(
    "exc",
    [
        type("NoCredentialsError", (Exception,), {})("Unable to locate credentials"),
        type("DefaultCredentialsError", (Exception,), {})("File /k.json was not found"),
        _ClientError("AccessDenied", 403),
        _ClientError("InvalidAccessKeyId", 403),
        _ClientError("SignatureDoesNotMatch", 403),
        OSError("Forbidden: https://storage.googleapis.com/b/o\ncaller does not have access"),  # gcsfs
        PermissionError(errno.EACCES, "Access Denied"),  # s3fs's translation of AccessDenied
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:20],
)
def test_credential_errors_fail_at_once_naming_url_and_fix(exc):
    calls = []

    def refused(left: float):
        calls.append(left)
        raise exc

    assert storage.is_access_error(exc) and not storage.is_transient(exc)
    with pytest.raises(storage.StorageError) as info:
        run(refused, what="s3://b/run/state.pt", operation="write", sleep=lambda d: None)
    assert len(calls) == 1 and info.value.kind == "access"  # not retried
    message = str(info.value)
    assert message.startswith("write s3://b/run/state.pt: access denied or no credentials")
    assert "AWS_ACCESS_KEY_ID" in message and "storageAuth.existingSecret" in message
    assert "\n" not in message


def test_local_permission_and_missing_files_are_not_credential_errors(tmp_path):
    assert not storage.is_access_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path)))
    assert not storage.is_access_error(FileNotFoundError("s3://b/x"))
    assert not storage.is_access_error(_ClientError("NoSuchBucket", 404))
    assert "GOOGLE_APPLICATION_CREDENTIALS" in storage.access_fix("gs://b/x")


def test_an_outage_prints_at_most_one_progress_line_per_interval(caplog):
    from repa.storage import faults as P

    storage.reset_failures()
    now = [0.0]

    def sleep(d: float) -> None:
        now[0] += d

    def down(left: float):
        now[0] += 1.0
        raise ConnectionResetError("reset")

    clock = lambda: now[0]  # noqa: E731
    caplog.set_level("DEBUG", logger="repa.storage")
    real = P.time.monotonic
    P.time.monotonic = clock  # the throttle reads the monotonic clock
    try:
        with pytest.raises(storage.StorageError) as info:
            run(down, what="s3://b/x", operation="read", deadline=100, sleep=sleep, clock=clock)
    finally:
        P.time.monotonic = real
        storage.reset_failures()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    retries = [r for r in caplog.records if r.name == "repa.storage"]
    assert len(retries) > 10 and 1 <= len(warnings) <= 100 / P.PROGRESS_EVERY_SECONDS + 1
    assert info.value.kind == "unreachable" and "AWS_ENDPOINT_URL_S3" in str(info.value)


def test_third_party_loggers_are_quiet_unless_debug():
    import logging

    from repa.cli import THIRD_PARTY_LOGGERS, quiet_third_party_logs

    try:
        quiet_third_party_logs("INFO")
        assert all(not logging.getLogger(n).isEnabledFor(logging.CRITICAL) for n in THIRD_PARTY_LOGGERS)
        quiet_third_party_logs("DEBUG")
        assert all(logging.getLogger(n).isEnabledFor(logging.DEBUG) for n in THIRD_PARTY_LOGGERS)
    finally:
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
