"""Storage failures as a user meets them: one stderr line naming the URL and the fix, the documented
exit code, credentials refused at once, an unreachable store retried quietly up to the deadline.

Each case runs the real CLI in a subprocess (stderr is what a pod log shows) against a local server:
moto S3 (the session's, and one started with ``INITIAL_NO_AUTH_ACTION_COUNT=0`` so it checks
credentials), a GCS endpoint that refuses every caller (the emulator has no auth), a closed port
(unreachable), and the fake Hub's absence for ``repa weights fetch``. Times are compared with a
baseline run of the same verb that fails at once on a local path (interpreter start-up and imports),
so they do not depend on the machine's speed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from repa.cli import EXIT_INPUT, EXIT_STORAGE

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 3  # stderr lines without --log-level DEBUG
FAST = 5.0  # seconds beyond the baseline for a refused credential (no retries)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """The test process's environment without any cloud credentials, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "GOOGLE_", "STORAGE_EMULATOR", "FSSPEC_GS", "HF_"))
    }
    env.update(
        PYTHONPATH=str(ROOT),
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        NO_GCE_CHECK="True",
    )
    env.update(extra)
    return env


def _repa(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, list[str], float]:
    """``(exit code, stderr lines, seconds)`` of ``repa ARGS``."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "repa", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stderr.splitlines(), time.monotonic() - start


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> float:
    """Seconds of a `repa prepare verify` that fails at once (a local folder without a manifest)."""
    missing = tmp_path_factory.mktemp("baseline") / "nothing"
    code, lines, seconds = _repa("prepare", "verify", f"file://{missing}", env=_env())
    assert code == EXIT_INPUT and len(lines) == 1 and "manifest.json: not found" in lines[0], lines
    return seconds


@pytest.fixture(scope="module")
def moto_with_auth() -> str:
    """A moto S3 server that checks credentials (every key is unknown to it: 403)."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _Refuse(BaseHTTPRequestHandler):
    """Answers every request as GCS answers a caller without access: 401 for an anonymous caller (no
    credentials found: gcsfs falls back to anonymous access), 403 for one without the permission."""

    def _answer(self) -> None:
        status = self.server.status  # type: ignore[attr-defined]
        who = "Anonymous caller" if status == 401 else "caller"
        body = json.dumps(
            {"error": {"code": status, "message": f"{who} does not have storage.objects.get access"}}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module", params=[401, 403], ids=["anonymous-401", "forbidden-403"])
def gcs_refusing(request) -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    server.status = request.param  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _assert_one_line(lines: list[str], url: str, *fix: str) -> None:
    assert 1 <= len(lines) <= MAX_LINES, lines
    assert not any("Traceback" in line for line in lines), lines
    error = lines[-1]
    assert error.startswith("repa prepare: error: ") and url in error, error
    for word in fix:
        assert word in error, error


# ----------------------------------------------------------------------------------------------
# Credentials: refused at once, exit 3, the fix named
# ----------------------------------------------------------------------------------------------


def test_s3_without_credentials_fails_at_once_naming_the_env_vars_and_the_chart_value(s3_server, baseline):
    code, lines, seconds = _repa(
        "prepare", "verify", "s3://no-creds/data", env=_env(AWS_ENDPOINT_URL_S3=s3_server)
    )
    assert code == EXIT_INPUT
    _assert_one_line(
        lines, "s3://no-creds/data/manifest.json", "NoCredentialsError", "AWS_ACCESS_KEY_ID", "existingSecret"
    )
    assert len(lines) == 1 and seconds < baseline + FAST, (seconds, baseline)


def test_s3_with_wrong_credentials_403_fails_at_once(moto_with_auth, baseline):
    env = _env(AWS_ENDPOINT_URL_S3=moto_with_auth, AWS_ACCESS_KEY_ID="wrong", AWS_SECRET_ACCESS_KEY="wrong")
    code, lines, seconds = _repa("prepare", "verify", "s3://bucket/data", env=env)
    assert code == EXIT_INPUT
    _assert_one_line(
        lines, "s3://bucket/data/manifest.json", "InvalidAccessKeyId", "serviceAccount.annotations"
    )
    assert len(lines) == 1 and seconds < baseline + FAST, (seconds, baseline)


def test_gcs_without_credentials_401_or_refusing_the_caller_403_fails_at_once(gcs_refusing, baseline):
    env = _env(STORAGE_EMULATOR_HOST=gcs_refusing, FSSPEC_GS_TOKEN="anon")
    code, lines, seconds = _repa("prepare", "verify", "gs://bucket/data", env=env)
    assert code == EXIT_INPUT
    _assert_one_line(
        lines, "gs://bucket/data/manifest.json", "does not have", "GOOGLE_APPLICATION_CREDENTIALS"
    )
    assert len(lines) == 1 and seconds < baseline + FAST, (seconds, baseline)


# ----------------------------------------------------------------------------------------------
# Unreachable: retried quietly up to the deadline, exit 4, the endpoint named
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "env_key", "fix"),
    [
        ("s3://bucket/data", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_S3"),
        ("gs://bucket/data", "STORAGE_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"),
    ],
)
def test_an_unreachable_store_is_retried_quietly_until_the_deadline(url, env_key, fix, baseline):
    deadline = 4
    env = _env(
        **{env_key: f"http://127.0.0.1:{_free_port()}"},
        AWS_ACCESS_KEY_ID="k",
        AWS_SECRET_ACCESS_KEY="s",
        FSSPEC_GS_TOKEN="anon",
    )
    sets = ["--set", f"data.url={url}", "--set", f"storage.deadline_seconds={deadline}"]
    code, lines, seconds = _repa("prepare", "verify", *sets, url, env=env)
    assert code == EXIT_STORAGE
    _assert_one_line(lines, f"{url}/manifest.json", "storage.deadline_seconds", fix)
    assert seconds < baseline + deadline + 15, (seconds, baseline)  # bounded by the deadline


def test_the_hub_unreachable_is_one_line_without_retry_spam(tmp_path):
    env = _env(HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}", HF_HOME=str(tmp_path / "hf"))
    args = ("weights", "fetch", str(tmp_path / "dest"), "--only", "sd-vae-ft-ema", "--no-progress")
    code, lines, _ = _repa(*args, env=env)
    assert code == EXIT_STORAGE and len(lines) == 1, lines
    assert "hf://stabilityai/sd-vae-ft-ema" in lines[0] and "HF_ENDPOINT" in lines[0], lines
    assert "HF_HUB_OFFLINE" in lines[0]


def test_a_remote_config_without_credentials_is_a_credentials_failure(s3_server, baseline):
    env = _env(AWS_ENDPOINT_URL_S3=s3_server)
    code, lines, seconds = _repa("config", "show", "--config", "s3://no-creds/run.yaml", env=env)
    assert code == EXIT_INPUT and len(lines) == 1, lines
    assert lines[0].startswith("repa config: error: read s3://no-creds/run.yaml: access denied"), lines
    assert "AWS_ACCESS_KEY_ID" in lines[0] and seconds < baseline + FAST
