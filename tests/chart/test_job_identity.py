"""`repa.lease.job_identity`: what the run lease calls "the same job" (docs/kubernetes.md)."""

from __future__ import annotations

import os
import socket

import pytest

from repa.lease import job_identity


@pytest.fixture
def no_ids(monkeypatch):
    monkeypatch.delenv("REPA_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    return monkeypatch


def test_repa_job_id_wins_over_the_rendezvous_id(no_ids) -> None:
    no_ids.setenv("REPA_JOB_ID", "trainjob/ns/myrun-repa/uid-1")
    no_ids.setenv("TORCHELASTIC_RUN_ID", "none")
    assert job_identity() == "trainjob/ns/myrun-repa/uid-1"


def test_a_named_rendezvous_id_is_the_job(no_ids) -> None:
    no_ids.setenv("TORCHELASTIC_RUN_ID", "myrun-repa")
    assert job_identity() == "myrun-repa"


def test_torchruns_default_run_id_none_is_never_an_identity(no_ids) -> None:
    """Every plain torchrun (and every TrainJob) has run id "none": the job is this launch, the torchrun
    agent (the worker's parent) on this host, not a name all launches share."""
    no_ids.setenv("TORCHELASTIC_RUN_ID", "none")
    job = job_identity()
    assert job != "none" and job == f"torchrun-{socket.gethostname()}-{os.getppid()}"


def test_outside_torchrun_there_is_no_job(no_ids) -> None:
    assert job_identity() is None
