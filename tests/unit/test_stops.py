"""The stop conditions of the training loop (repa.train.stops): signals, a failed upload, a lost lease."""

from __future__ import annotations

import logging
import signal
from types import SimpleNamespace

import pytest

from repa.lease import LeaseError
from repa.train import stops as S


class _Saver:
    def __init__(self, failed: bool = False, busy: bool = False) -> None:
        self._failed, self.busy, self.step = failed, busy, 9

    def failed(self) -> bool:
        return self._failed

    def wait(self) -> None:
        raise OSError("upload of step 9 failed: s3://bucket/run")


def _stops(saver=None, lease=None, is_main=True) -> S.Stops:
    return S.Stops(
        saver or _Saver(), lambda: lease, lambda: "step 8 (file:///run/step-0000008)", is_main=is_main
    )


def test_nothing_set_goes_on():
    stops = _stops()
    assert stops.flags() == [0.0, 0.0, 0.0, 0.0] and stops.poll(stops.flags()) is None


def test_sigterm_stops_with_143_and_sigint_with_130(monkeypatch):
    stops = _stops()
    stops._on_signal(signal.SIGTERM, None)
    assert stops.flags() == [1.0, 0.0, 0.0, 0.0] and stops.poll(stops.flags()) == 143
    stops._on_signal(signal.SIGINT, None)
    assert stops.poll(stops.flags()) == 130  # Ctrl-C wins: the user is waiting
    other_rank = _stops(is_main=False)
    assert other_rank.poll([0.0, 0.5, 0.0, 0.0]) == 130  # set on one rank of two: mean 0.5


def test_a_second_ctrl_c_aborts_at_once_naming_the_last_commit(monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(S.time, "monotonic", lambda: clock[0])
    stops = _stops(saver=_Saver(busy=True))
    stops._on_signal(signal.SIGINT, None)
    clock[0] += 0.2  # the same keypress, forwarded by torchrun: not a second Ctrl-C
    stops._on_signal(signal.SIGINT, None)
    clock[0] += 5.0
    with caplog.at_level(logging.ERROR), pytest.raises(KeyboardInterrupt):
        stops._on_signal(signal.SIGINT, None)
    assert "last committed: step 8 (file:///run/step-0000008)" in caplog.text
    assert "upload of step 9 is abandoned" in caplog.text


def test_a_failed_upload_and_a_lost_lease_raise_on_every_rank():
    main = _stops(saver=_Saver(failed=True))
    assert main.flags()[2] == 1.0
    with pytest.raises(OSError, match="s3://bucket/run"):  # rank 0: the upload's own error
        main.poll(main.flags())
    with pytest.raises(S.UploadFailedError):
        _stops(is_main=False).poll([0.0, 0.0, 0.5, 0.0])
    lease = SimpleNamespace(lost="the lease of file:///run was taken over by job b")
    holder = _stops(lease=lease)
    assert holder.flags()[3] == 1.0
    with pytest.raises(LeaseError, match="taken over by job b"):
        holder.poll(holder.flags())
