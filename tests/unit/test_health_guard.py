"""The health guard's statistics and bookkeeping (repa/train/health.py), without a model."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from repa.config import HealthConfig
from repa.train.health import BadStep, HealthGuard, merge_ranges, robust_threshold


def guard(**kw) -> HealthGuard:
    return HealthGuard(HealthConfig(**kw))


def bad(step: int, start: int, checks=("loss_nonfinite",), loss=float("nan")) -> BadStep:
    return BadStep(step, start, start + 4, list(checks), loss, 1.0, [f"k{start}"])


def test_robust_threshold_is_median_plus_k_robust_sigmas_with_a_floor():
    values = [1.0, 2.0, 3.0, 4.0, 100.0]  # the outlier barely moves median (3) and MAD (1)
    assert robust_threshold(values, 10) == pytest.approx(3 + 10 * 1.4826)
    assert robust_threshold([2.0] * 5, 10) == pytest.approx(2 + 10 * 0.02)  # MAD 0: 1 % of the median


def test_finite_checks_from_the_first_step_spike_checks_once_the_window_is_full():
    g = guard(window_steps=4, spike_k=5)
    assert g.judge(float("nan"), 1.0) == ["loss_nonfinite"]
    assert g.judge(1.0, float("inf")) == ["grad_nonfinite"]
    assert g.judge(1.0, 1.0, nonfinite_loss_ranks=0.5) == ["loss_nonfinite"]  # another rank's loss
    for v in (1.0, 1.1, 0.9):
        g.accept(v, v)
    assert g.judge(1e6, 1e6) == [] and g.thresholds() == {"loss": None, "grad_norm": None}
    g.accept(1.05, 1.05)
    assert g.judge(1e6, 1.0) == ["loss_spike"] and g.judge(1.0, 1e6) == ["grad_spike"]
    assert g.judge(1.2, 1.2) == []
    assert guard(window_steps=4, spike_k=0).thresholds()["loss"] is None  # k = 0: spikes off
    off = guard(enabled=False)
    assert off.judge(float("nan"), float("nan")) == []


def test_noisy_healthy_values_stay_below_the_default_threshold():
    rng = random.Random(0)
    g = guard()
    for _ in range(2000):
        loss, norm = 1 + 0.1 * rng.gauss(0, 1), 0.5 * rng.lognormvariate(0, 0.3)
        assert g.judge(loss, norm) == []
        g.accept(loss, norm)
    assert max(g.max_scores.values()) < 6  # Gaussian and log-normal tails: far below k = 12


def test_m_bad_steps_within_the_window_ask_for_a_rollback():
    g = guard(max_bad_steps=3, bad_step_window=10)
    assert not g.record_bad(bad(5, 20))
    assert not g.record_bad(bad(20, 80))  # step 5 is out of the window by now
    assert not g.record_bad(bad(21, 88))
    assert g.record_bad(bad(21, 92))
    assert g.episode() == (20, 80, 96)
    assert g.skip_ranges == [[20, 24], [80, 84], [88, 96]]


def test_rollbacks_keep_history_and_are_limited_within_the_horizon():
    g = guard(max_bad_steps=1, max_rollbacks=2, rollback_horizon_steps=100)
    for i, step in enumerate((10, 50)):
        assert g.record_bad(bad(step, 40 * i)) and g.may_roll_back(step)
        history = g.history()
        g.load_state_dict(None)  # what the reloaded checkpoint holds (here: nothing)
        assert g.rolled_back(history, step, step - 5) == [40 * i, 40 * i + 4]
    assert len(g.rollbacks) == 2 and g.skipped_steps == 2 and g.recent == []
    assert not g.may_roll_back(60)
    assert g.may_roll_back(151)  # the first rollback (step 10) left the horizon


def test_next_position_jumps_over_skipped_and_configured_ranges():
    g = guard()
    g.record_bad(bad(3, 12))
    assert g.next_position(11) == 11 and g.next_position(12) == 16
    assert g.next_position(12, extra=[[16, 20], [30, 31]]) == 20
    assert merge_ranges([[8, 12], [0, 4], [4, 6], [10, 14]]) == [[0, 6], [8, 14]]


def test_state_dict_round_trips_through_torch_save_weights_only(tmp_path):
    g = guard(window_steps=3)
    for v in (1.0, 2.0, 3.0, 2.5):
        g.accept(v, v / 2)
    g.record_bad(bad(4, 16, ["loss_spike"], loss=1e6))
    torch.save(g.state_dict(), tmp_path / "h.pt")
    h = guard(window_steps=3)
    h.load_state_dict(torch.load(tmp_path / "h.pt", weights_only=True))
    assert h.state_dict() == g.state_dict()
    assert list(h.losses) == [2.0, 3.0, 2.5] and statistics.median(h.grad_norms) == 1.25
    with pytest.raises(ValueError, match="version"):
        h.load_state_dict({**g.state_dict(), "version": 99})
