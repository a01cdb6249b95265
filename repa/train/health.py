"""The training health guard: which steps to skip, when to roll back, when to give up.

Long diffusion runs blow up numerically: REPA's official code goes NaN in fp16 after 70K-160K steps
(sihyun-yu/REPA #46), LightningDiT and RAE in bf16 after ~200K, iREPA sees grad-norm spikes. A NaN
that reaches AdamW and the EMA poisons every later checkpoint. The trainer therefore asks this guard
before every optimiser update whether the step is healthy (docs/training-health.md):

- **finite**: the loss of every rank and the (global) gradient norm are finite;
- **no spike**: neither the loss nor the gradient norm exceeds ``median + k * 1.4826 * MAD`` of the
  last ``W`` applied steps (a robust z-score; the MAD is floored at 1 % of the median so a flat curve
  does not turn noise into spikes). Off until ``W`` steps have been applied.

A bad step is skipped (no update, no EMA; the data position moves on) and its stream range is added
to the ranges the reader jumps over, so no replay (after a rollback or a resume) trains on it. After
``M`` bad steps within ``bad_step_window`` optimiser steps the trainer rolls back to the newest
checkpoint written before the first of them and the whole window from the first to the last bad batch
is skipped; a further rollback beyond ``R`` within ``rollback_horizon_steps`` stops the run
(:data:`HEALTH_EXIT_CODE`).

The guard sees the same all-reduced numbers on every rank, so every rank takes the same decision
without a further collective. It is a Stateful object: ``state_dict()`` goes into every checkpoint
(running windows, counters, skipped ranges), so a resumed run continues it exactly. Plain Python:
no torch, no I/O.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from repa.config import HealthConfig

__all__ = ["CHECKS", "HEALTH_EXIT_CODE", "BadStep", "HealthGuard", "merge_ranges", "robust_threshold"]

# Exit code of a run the guard stopped. 1-127: with restartPolicy ExitCode the Training Operator fails
# the job instead of recreating the pod (docs/kubernetes.md), because a restart would hit the same wall.
HEALTH_EXIT_CODE = 3

CHECKS = ("loss_nonfinite", "grad_nonfinite", "loss_spike", "grad_spike")
MAD_TO_STD = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation
MAD_FLOOR = 0.01  # fraction of |median| the scale never drops below
STATE_VERSION = 1


def robust_threshold(values: Sequence[float], k: float) -> float:
    """``median + k * max(1.4826 * MAD, 1 % of |median|)`` of ``values``."""
    median = statistics.median(values)
    mad = statistics.median([abs(v - median) for v in values])
    return median + k * max(MAD_TO_STD * mad, MAD_FLOOR * abs(median))


def merge_ranges(ranges: Sequence[Sequence[int]]) -> list[list[int]]:
    """Sorted union of ``[start, end)`` ranges (overlapping or touching ones merged)."""
    out: list[list[int]] = []
    for start, end in sorted((int(a), int(b)) for a, b in ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


@dataclass
class BadStep:
    """One skipped step: the optimiser step it would have been, its global stream range, what failed."""

    step: int
    start: int
    end: int
    checks: list[str]
    loss: float
    grad_norm: float
    # sample keys, gathered from every rank: those of the ranks whose loss was not finite (all ranks'
    # for a spike or a non-finite gradient, which belong to the whole batch)
    keys: list[str] = field(default_factory=list)

    def describe(self) -> str:
        keys = ", ".join(self.keys[:8]) + (", ..." if len(self.keys) > 8 else "")
        return (
            f"step {self.step}: {'+'.join(self.checks)} (loss {self.loss:.4g}, "
            f"grad norm {self.grad_norm:.4g}); samples [{self.start}, {self.end}) skipped "
            f"(keys: {keys})"
        )


class HealthGuard:
    """Per-step verdicts, bad-step bookkeeping and the ranges of the stream that are never trained on."""

    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window_steps)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window_steps)
        self.max_scores = {"loss": 0.0, "grad_norm": 0.0}  # largest robust z of an applied step
        self.recent: list[BadStep] = []  # bad steps of the current episode (within bad_step_window)
        self.skipped: list[BadStep] = []  # every skipped step of the run
        self.rollbacks: list[dict[str, int]] = []  # {step, to_step, start, end}
        self.skip_ranges: list[list[int]] = []  # stream ranges the guard skipped (merged)

    # -------------------------------------------------------------- the per-step verdict
    def thresholds(self) -> dict[str, float | None]:
        """Current spike thresholds (None while the window is not full or spikes are off)."""
        if not self.cfg.spike_k or len(self.losses) < self.cfg.window_steps:
            return {"loss": None, "grad_norm": None}
        return {
            "loss": robust_threshold(self.losses, self.cfg.spike_k),
            "grad_norm": robust_threshold(self.grad_norms, self.cfg.spike_k),
        }

    def judge(self, loss: float, grad_norm: float, nonfinite_loss_ranks: float = 0.0) -> list[str]:
        """The failed checks of a step (``[]``: apply it). ``nonfinite_loss_ranks`` > 0 when any rank's
        local loss was not finite (the all-reduced flag)."""
        if not self.cfg.enabled:
            return []
        failed = []
        if nonfinite_loss_ranks > 0 or not _finite(loss):
            failed.append("loss_nonfinite")
        if not _finite(grad_norm):
            failed.append("grad_nonfinite")
        if failed:
            return failed
        limits = self.thresholds()
        if limits["loss"] is not None and loss > limits["loss"]:
            failed.append("loss_spike")
        if limits["grad_norm"] is not None and grad_norm > limits["grad_norm"]:
            failed.append("grad_spike")
        return failed

    def accept(self, loss: float, grad_norm: float) -> None:
        """An applied step enters the running windows."""
        if not self.cfg.enabled:
            return
        if len(self.losses) == self.cfg.window_steps:
            pairs = (("loss", loss, self.losses), ("grad_norm", grad_norm, self.grad_norms))
            for name, value, window in pairs:
                self.max_scores[name] = max(self.max_scores[name], _score(window, value))
        self.losses.append(float(loss))
        self.grad_norms.append(float(grad_norm))

    def record_bad(self, bad: BadStep) -> bool:
        """Count a skipped step; True when it is the ``max_bad_steps``-th of the window (roll back)."""
        self.skipped.append(bad)
        self.skip_ranges = merge_ranges([*self.skip_ranges, [bad.start, bad.end]])
        self.recent = [b for b in self.recent if b.step > bad.step - self.cfg.bad_step_window] + [bad]
        return len(self.recent) >= self.cfg.max_bad_steps

    # -------------------------------------------------------------- rollback
    def episode(self) -> tuple[int, int, int]:
        """``(first bad step, start, end)`` of the current episode: the stream window to skip."""
        return self.recent[0].step, self.recent[0].start, self.recent[-1].end

    def may_roll_back(self, step: int) -> bool:
        """Whether one more rollback stays within ``max_rollbacks`` in the horizon ending at ``step``."""
        horizon = step - self.cfg.rollback_horizon_steps
        return sum(1 for r in self.rollbacks if r["step"] > horizon) < self.cfg.max_rollbacks

    def history(self) -> dict[str, Any]:
        """What a rollback keeps, taken before it loads the checkpoint (which restores the running
        windows): the episode being rolled back, every skipped step, the rollbacks, the skipped ranges."""
        return {
            "episode": self.episode(),
            "skipped": list(self.skipped),
            "rollbacks": list(self.rollbacks),
            "ranges": list(self.skip_ranges),
        }

    def rolled_back(self, history: dict[str, Any], step: int, to_step: int) -> list[int]:
        """After the checkpoint's state was loaded: restore ``history``, skip the episode's window,
        record the rollback; returns the window ``[start, end)``."""
        _, start, end = history["episode"]
        self.skipped = history["skipped"]
        rollback = {"step": step, "to_step": to_step, "start": start, "end": end}
        self.rollbacks = [*history["rollbacks"], rollback]
        self.skip_ranges = merge_ranges([*history["ranges"], [start, end]])
        self.recent = []
        return [start, end]

    # -------------------------------------------------------------- data positions
    def next_position(self, position: int, extra: Sequence[Sequence[int]] = ()) -> int:
        """The first stream position >= ``position`` outside the skipped ranges (the guard's and
        ``extra``, e.g. ``health.skip_sample_ranges``)."""
        for start, end in merge_ranges([*self.skip_ranges, *extra]):
            if start <= position < end:
                position = end
        return position

    # -------------------------------------------------------------- reporting
    @property
    def skipped_steps(self) -> int:
        return len(self.skipped)

    def scalars(self) -> dict[str, float | None]:
        """TensorBoard scalars: counters and the spike thresholds (None until the window is full)."""
        limits = self.thresholds()
        return {
            "health/skipped_steps": float(self.skipped_steps),
            "health/rollbacks": float(len(self.rollbacks)),
            "health/loss_threshold": limits["loss"],
            "health/grad_norm_threshold": limits["grad_norm"],
        }

    # -------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, floats, strings): loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "max_scores": dict(self.max_scores),
            "recent": [asdict(b) for b in self.recent],
            "skipped": [asdict(b) for b in self.skipped],
            "rollbacks": [dict(r) for r in self.rollbacks],
            "skip_ranges": [list(r) for r in self.skip_ranges],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's guard state; None (a checkpoint without one) starts fresh."""
        self.__init__(self.cfg)  # type: ignore[misc]
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"health guard state version {state.get('version')!r}, expected {STATE_VERSION}")
        self.losses.extend(float(v) for v in state["losses"])
        self.grad_norms.extend(float(v) for v in state["grad_norms"])
        self.max_scores = {k: float(v) for k, v in state["max_scores"].items()}
        self.recent = [BadStep(**b) for b in state["recent"]]
        self.skipped = [BadStep(**b) for b in state["skipped"]]
        self.rollbacks = [dict(r) for r in state["rollbacks"]]
        self.skip_ranges = [list(r) for r in state["skip_ranges"]]


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def _score(window: Sequence[float], value: float) -> float:
    """Robust z-score of ``value`` against ``window`` (the quantity compared with ``spike_k``)."""
    median = statistics.median(window)
    mad = statistics.median([abs(v - median) for v in window])
    scale = max(MAD_TO_STD * mad, MAD_FLOOR * abs(median))
    return (value - median) / scale if scale > 0 else 0.0
