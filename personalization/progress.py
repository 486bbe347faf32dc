"""What a running training reports, and how it is asked to stop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


class TrainingCancelled(RuntimeError):
    """Raised inside the loop when the cancel flag is set; nothing is written."""


@dataclass
class ProgressEvent:
    """One report from the loop. ``step``/``total_steps`` count over all stages; ``stage_*`` within the current one."""

    stage: str
    step: int
    total_steps: int
    stage_step: int
    stage_total: int
    loss: float | None
    elapsed_s: float
    eta_s: float | None
    message: str = ""
    preview: Image.Image | None = None

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 1.0

    def describe(self) -> str:
        """A short human line: 'stage 1 (trigger) 120/400 · loss 0.132 · ETA 0:41'."""
        parts = [f"{self.stage} {self.stage_step}/{self.stage_total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eta_s is not None:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        if self.message:
            parts.append(self.message)
        return " · ".join(parts)


ProgressCallback = Callable[[ProgressEvent], None]


class CancelFlag:
    """A thread-safe flag the UI sets and the loop checks every step.

    With ``signal_file`` the flag also reads as set once that file exists, so a run in another process (ZeroGPU runs
    the GPU work in a forked worker) can be cancelled from the server process.
    """

    def __init__(self, signal_file: Path | None = None) -> None:
        self._event = threading.Event()
        self.signal_file = signal_file

    def cancel(self) -> None:
        self._event.set()
        if self.signal_file is not None:
            self.signal_file.parent.mkdir(parents=True, exist_ok=True)
            self.signal_file.touch()

    def reset(self) -> None:
        self._event.clear()
        if self.signal_file is not None:
            self.signal_file.unlink(missing_ok=True)

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self.signal_file is not None and self.signal_file.exists())

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise TrainingCancelled("training was cancelled; no model was written")


class EtaClock:
    """The time left in a run's training stages, honest from the first step.

    ``planned``: each stage's steps and estimated seconds per step (the estimate the page showed before Start). Until
    a stage has run ``warmup_steps`` steps past its first ones, its steps cost the estimate, scaled by how far the
    stages measured so far ran from their own estimates; after that, its measured step time, warm-up excluded (the
    first steps carry compilation, caches and allocator growth). A new stage so starts at a corrected estimate, and
    the clock does not jump when the kind of step changes.
    """

    def __init__(self, planned: Sequence[tuple[int, float]], tail_s: float = 0.0, warmup_steps: int = 2) -> None:
        self.planned = [(int(steps), float(step_s)) for steps, step_s in planned]
        self.tail_s, self.warmup_steps = tail_s, warmup_steps
        self._origin: dict[int, tuple[int, float]] = {}  # stage -> (its step that ended the warm-up, when)
        self._rate: dict[int, float] = {}  # stage -> measured seconds per step
        self._done = [0] * len(self.planned)

    def step_done(self, stage: int, stage_step: int, now: float) -> float:
        """Record that ``stage`` (index into ``planned``) finished its step ``stage_step`` (from 1) at ``now``;
        return the seconds left."""
        self._done[stage] = stage_step
        if stage_step == self.warmup_steps:
            self._origin[stage] = (stage_step, now)
        elif stage in self._origin and stage_step > self._origin[stage][0]:
            first, at = self._origin[stage]
            self._rate[stage] = (now - at) / (stage_step - first)
        return self.remaining_s()

    def remaining_s(self) -> float:
        scale = self._scale()
        left = self.tail_s
        for stage, (steps, step_s) in enumerate(self.planned):
            rate = self._rate.get(stage, step_s * scale)
            left += max(0, steps - self._done[stage]) * rate
        return left

    def _scale(self) -> float:
        """Measured over estimated step time, of the stages measured so far (1 before any)."""
        measured = [(self._rate[s], self.planned[s][1]) for s in self._rate if self.planned[s][1] > 0]
        if not measured:
            return 1.0
        return sum(rate for rate, _ in measured) / sum(estimate for _, estimate in measured)


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
