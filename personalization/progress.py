"""What a running training reports, and how it is asked to stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
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


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
