"""The exit-code table of docs/kubernetes.md and ``repa.cli.EXIT_CODES`` agree, and failures land on
the code the table gives them."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from repa import cli, storage
from repa.data.format import ManifestError

DOC = Path(__file__).resolve().parents[2] / "docs" / "kubernetes.md"


def documented_codes() -> dict[int, str]:
    """``{code: meaning}`` of the table under "### Exit codes"."""
    text = DOC.read_text(encoding="utf-8").split("### Exit codes", 1)[1]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(.+?)\s*\|", text.split("\n\n", 2)[1], re.MULTILINE)
    return {int(code): meaning for code, meaning in rows}


def test_the_documented_table_and_the_code_list_the_same_codes():
    assert documented_codes().keys() == cli.EXIT_CODES.keys()


class _ClientError(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (ManifestError("file:///d/manifest.json: not found"), cli.EXIT_INPUT, "missing"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/ckpt/step-1/state.pt"), cli.EXIT_INPUT, "missing"),
        (
            storage.StorageError(
                "read s3://b/x: access denied ...", operation="read", url="s3://b/x", kind="access"
            ),
            cli.EXIT_INPUT,
            "credentials",
        ),
        (_ClientError("AccessDenied", 403), cli.EXIT_INPUT, "credentials"),
        (
            storage.StorageError(
                "read s3://b/x: failed", operation="read", url="s3://b/x", kind="unreachable"
            ),
            cli.EXIT_STORAGE,
            "did not answer",
        ),
        (RuntimeError("a bug"), cli.EXIT_FAILURE, "unexpected"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_failures_exit_with_the_code_whose_row_describes_them(exc, code, words):
    storage.reset_failures()
    got, message = cli.describe_failure(exc)
    assert got == code, message
    assert words in documented_codes()[code], documented_codes()[code]
    assert "\n" not in message
