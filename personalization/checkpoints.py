"""Checkpoints through a run: when they are taken, their table (``checkpoints/checkpoints.json``), and the rule
that recommends one.

A run takes ``config.checkpoints`` checkpoints spread evenly over its last stage (the last at its end), plus the end
of every earlier stage (two-stage's stage 1: the trigger alone). Each is scored when taken (fidelity to the
references and drift of the class, see the scorers in :mod:`personalization.mini_world.scoring` and
:mod:`personalization.evaluation`); :func:`recommend` picks one by a written rule; the artifact folder's top level
holds the kept step (``config.keep_step``: ``best``, ``last`` or a step) and :func:`personalization.snapshots.pick_step`
switches it afterwards. The files of each checkpoint are laid out by :mod:`personalization.artifacts`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts

KEEP_CHOICES = ("best", "last")

RULE = ("among the checkpoints that learned the subject (fidelity at least 0.05 above the base model's), the highest "
        "fidelity whose drift stays within the tolerance (the earliest on a tie); when none stays within it, the one "
        "with the least drift; when none learned, the same among all; without scores, the last")
# A checkpoint whose fidelity is within this of the base model's has not learned the subject: recommending it for
# its zero drift would hand the user the base model (two-stage's stage 1 on a subject the U-Net must learn).
LEARNED_MARGIN = 0.05


class CheckpointError(ValueError):
    """A step that is not a checkpoint of the run, or a checkpoint whose weights were not kept."""


def checkpoint_steps(stage_steps: Sequence[int], count: int) -> list[int]:
    """The global steps (1-based, counted over all stages) at which checkpoints are taken.

    The end of every stage but the last, and ``count`` steps evenly spread over the last stage, ending at its end
    (``count`` 0: the end of the run only). Stages of 0 steps are skipped.
    """
    stages = [steps for steps in stage_steps if steps > 0]
    if not stages:
        return []
    total = sum(stages)
    boundaries, done = set(), 0
    for steps in stages[:-1]:
        done += steps
        boundaries.add(done)
    last = stages[-1]
    points = max(1, min(count, last))
    spread = {total - last + round(last * index / points) for index in range(1, points + 1)}
    return sorted(boundaries | spread)


def check_keep_step(keep_step: str, steps: Sequence[int]) -> None:
    """Refuse, before training, a ``keep_step`` that names no checkpoint of the schedule."""
    if keep_step in KEEP_CHOICES:
        return
    if not keep_step.isdigit() or int(keep_step) not in steps:
        raise CheckpointError(f"keep_step must be best, last or one of the checkpoint steps "
                              f"{', '.join(map(str, steps))}; got {keep_step!r}")


@dataclass
class Checkpoint:
    """One checkpoint: where it was taken, whether its weights are on disk, and its scores.

    ``scores`` holds at least ``fidelity`` and ``drift`` when the run was scored, plus what the scorer adds.
    ``training_s``: seconds of training up to this step (scoring excluded), for curves against time.
    """

    step: int
    stage: str
    weights: bool
    training_s: float
    scoring_s: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return "fidelity" in self.scores and "drift" in self.scores


@dataclass
class CheckpointTable:
    """Every checkpoint of a run, the scorer that read them, the recommended step and the step the folder holds."""

    checkpoints: list[Checkpoint]
    scorer: str | None
    drift_tolerance: float | None
    kept_step: int | None = None
    note: str | None = None

    @property
    def recommended_step(self) -> int | None:
        return recommend(self.checkpoints, self.drift_tolerance)

    @property
    def steps(self) -> list[int]:
        return [checkpoint.step for checkpoint in self.checkpoints]

    def get(self, step: int) -> Checkpoint:
        for checkpoint in self.checkpoints:
            if checkpoint.step == step:
                return checkpoint
        raise CheckpointError(f"step {step} is not a checkpoint of this run (checkpoints: "
                              f"{', '.join(map(str, self.steps)) or 'none'})")

    def resolve(self, keep_step: str | int) -> int:
        """The step ``best`` / ``last`` / a number names; it must be a checkpoint whose weights were kept."""
        if not self.checkpoints:
            raise CheckpointError("this run has no checkpoints")
        if keep_step == "last":
            step = self.checkpoints[-1].step
        elif keep_step == "best":
            step = self.recommended_step or self.checkpoints[-1].step
        elif isinstance(keep_step, int) or str(keep_step).isdigit():
            step = int(keep_step)
        else:
            raise CheckpointError(f"step must be best, last or a number, got {keep_step!r}")
        if not self.get(step).weights:
            raise CheckpointError(f"step {step}: its weights were not kept (full U-Net checkpoints of large models "
                                  "keep only the recommended and the last step)")
        return step

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "drift_tolerance": self.drift_tolerance, "rule": RULE,
                "recommended_step": self.recommended_step, "kept_step": self.kept_step, "note": self.note,
                "checkpoints": [asdict(checkpoint) for checkpoint in self.checkpoints]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CheckpointTable:
        try:
            points = [Checkpoint(**entry) for entry in values["checkpoints"]]
            return cls(points, values.get("scorer"), values.get("drift_tolerance"), values.get("kept_step"),
                       values.get("note"))
        except (KeyError, TypeError) as error:
            raise artifacts.ArtifactError(f"{artifacts.CHECKPOINTS_FILE} is damaged ({error})") from None

    def markdown(self) -> str:
        """The table the CLI prints and the card shows."""
        recommended = self.recommended_step
        lines = ["| step | stage | fidelity | drift | training s | weights |", "|---|---|---|---|---|---|"]
        for point in self.checkpoints:
            marks = " (recommended)" if point.step == recommended else ""
            marks += " (kept)" if point.step == self.kept_step else ""
            fidelity = f"{point.scores['fidelity']:.3f}" if point.scored else "-"
            drift = _drift_text(point.scores) if point.scored else "-"
            lines.append(f"| {point.step}{marks} | {point.stage} | {fidelity} | {drift} | {point.training_s:.1f} | "
                         f"{'yes' if point.weights else 'no'} |")
        return "\n".join(lines)


def _drift_text(scores: dict[str, float]) -> str:
    if "drift_se" in scores:
        return f"{scores['drift']:.3f} ± {scores['drift_se']:.3f}"
    return f"{scores['drift']:.3f}"


def recommend(checkpoints: Sequence[Checkpoint], drift_tolerance: float | None) -> int | None:
    """The recommended step by :data:`RULE`, among checkpoints whose weights were kept; None without scores.

    The rule ranks each checkpoint by its own scores alone (no margins between checkpoints), so adding a checkpoint
    either keeps the recommendation or moves it to the new one: a run that can keep only one large U-Net keeps the
    right one. ``base_fidelity`` in the scores (the base model's fidelity) says whether a checkpoint learned.
    """
    scored = [point for point in checkpoints if point.scored and point.weights]
    if not scored or drift_tolerance is None:
        return None

    def rank(point: Checkpoint) -> tuple[bool, bool, float, int]:
        fidelity, drift = point.scores["fidelity"], point.scores["drift"]
        learned = fidelity >= point.scores.get("base_fidelity", float("-inf")) + LEARNED_MARGIN
        within = drift <= drift_tolerance
        return learned, within, fidelity if within else -drift, -point.step

    return max(scored, key=rank).step


def read_table(folder: Path | str) -> CheckpointTable | None:
    """The checkpoint table of an artifact folder, or None for a folder written without checkpoints."""
    path = Path(folder) / artifacts.CHECKPOINTS_DIR / artifacts.CHECKPOINTS_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise artifacts.ArtifactError(f"{path.parent.name}/{path.name} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise artifacts.ArtifactError(f"{path.parent.name}/{path.name} is not a JSON object")
    return CheckpointTable.from_dict(values)


def write_table(checkpoints_dir: Path, table: CheckpointTable) -> None:
    """Write the table atomically (a kill mid-write leaves the previous one)."""
    path = checkpoints_dir / artifacts.CHECKPOINTS_FILE
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps(table.to_dict(), indent=2), encoding="utf-8")
    staging.replace(path)
