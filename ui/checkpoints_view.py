"""The Train tab's checkpoints: the curve of fidelity and drift against step, the same sample at every checkpoint,
the recommended step marked, and the picker that makes another step the run's model (engine:
`personalization.checkpoints`, `personalization.snapshots.pick_step`)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from personalization.artifacts import CHECKPOINT_NAME, CHECKPOINTS_DIR, SAMPLE_NAME, SAMPLES_DIR, ArtifactError
from personalization.checkpoints import RULE, CheckpointError, CheckpointTable, read_table
from personalization.snapshots import pick_step
from ui.services import Session

WIDTH, HEIGHT, PAD = 460, 180, 36


def _polyline(points: list[tuple[float, float]], colour: str) -> str:
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{colour}'/>" for x, y in points)
    return f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{path}'/>{dots}"


def curve_svg(table: CheckpointTable) -> str:
    """Fidelity (blue) and drift (orange) against step, on one 0-1 axis; the recommended step has a green line."""
    scored = [point for point in table.checkpoints if point.scored]
    if not scored:
        return ""
    last = max(point.step for point in table.checkpoints)

    def x(step: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * step / last

    def y(value: float) -> float:
        return HEIGHT - PAD + (2 * PAD - HEIGHT) * min(max(value, 0.0), 1.0)

    fidelity = [(x(p.step), y(p.scores["fidelity"])) for p in scored]
    drift = [(x(p.step), y(p.scores["drift"])) for p in scored]
    recommended = table.recommended_step
    mark = "" if recommended is None else (
        f"<line x1='{x(recommended):.1f}' x2='{x(recommended):.1f}' y1='{PAD / 2}' y2='{HEIGHT - PAD}' "
        f"stroke='#2a9d3a' stroke-dasharray='4 3'/><text x='{x(recommended) + 4:.1f}' y='{PAD / 2 + 10}' "
        f"font-size='11' fill='#2a9d3a'>recommended: {recommended}</text>")
    ticks = "".join(f"<text x='{x(p.step):.1f}' y='{HEIGHT - PAD + 14}' font-size='10' text-anchor='middle'>"
                    f"{p.step}</text>" for p in table.checkpoints)
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' role='img' "
            f"aria-label='fidelity and drift against step'>"
            f"<line x1='{PAD}' x2='{WIDTH - PAD}' y1='{HEIGHT - PAD}' y2='{HEIGHT - PAD}' stroke='#888'/>"
            f"<text x='4' y='{y(1.0) + 4:.1f}' font-size='10'>1</text><text x='4' y='{y(0.0):.1f}' font-size='10'>0"
            f"</text>{ticks}{mark}{_polyline(fidelity, '#1f6feb')}{_polyline(drift, '#e8590c')}"
            f"<text x='{PAD}' y='12' font-size='11' fill='#1f6feb'>fidelity</text>"
            f"<text x='{PAD + 60}' y='12' font-size='11' fill='#e8590c'>drift</text></svg>")


def summary_html(table: CheckpointTable) -> str:
    """The curve and one line on how the recommendation was made (or why there is none)."""
    if table.scorer is None:
        return ("<p class='checkpoints-note'>Checkpoints are not scored on this base model: compare their samples "
                "below and pick one.</p>")
    tolerance = f"{table.drift_tolerance:.3f}" if table.drift_tolerance is not None else "-"
    return (f"<div id='checkpoint-curve'>{curve_svg(table)}</div><p class='checkpoints-note'>Scored by the "
            f"{html.escape(table.scorer)}. Recommended: {html.escape(RULE)} (tolerance {tolerance}).</p>")


def checkpoint_gallery(folder: Path, table: CheckpointTable) -> list[tuple[str, str]]:
    """The first sample (same prompt and seed) at every checkpoint, captioned with its step and scores."""
    items = []
    for point in table.checkpoints:
        image = folder / CHECKPOINTS_DIR / CHECKPOINT_NAME.format(step=point.step) / SAMPLES_DIR / SAMPLE_NAME.format(
            index=0)
        if not image.is_file():
            continue
        caption = f"step {point.step}"
        if point.scored:
            caption += f" · fidelity {point.scores['fidelity']:.2f} · drift {point.scores['drift']:.2f}"
        if point.step == table.recommended_step:
            caption += " · recommended"
        if not point.weights:
            caption += " · weights not kept"
        items.append((str(image), caption))
    return items


def _choices(table: CheckpointTable) -> list[tuple[str, str]]:
    labels = []
    for point in table.checkpoints:
        if point.weights:
            label = f"step {point.step}" + (" (recommended)" if point.step == table.recommended_step else "")
            labels.append((label, str(point.step)))
    return labels


def checkpoint_view(session: Session | None) -> tuple[Any, Any, Any, Any]:
    """The finished run's checkpoint summary, gallery, step picker and pick button; hidden without a run."""
    hidden = gr.update(visible=False)
    job = session.job if session is not None else None
    table = read_table(job.output_dir) if job is not None and job.result is not None else None
    if table is None or not table.checkpoints:
        return hidden, gr.update(value=None, visible=False), hidden, hidden
    folder = job.output_dir
    picker = gr.update(choices=_choices(table), value=str(table.kept_step), visible=True)
    return (gr.update(value=summary_html(table), visible=True),
            gr.update(value=checkpoint_gallery(folder, table), visible=True), picker, gr.update(visible=True))


def pick(session: Session | None, step: str | None) -> str:
    """Make ``step`` the session's run model (what Generate loads and Hub pushes); a sentence saying so."""
    job = session.job if session is not None else None
    if job is None or job.result is None or job.state != "ended":
        raise gr.Error("Train a model first: there is no finished run to pick a step of.", print_exception=False)
    if not isinstance(step, str) or not step.strip():
        raise gr.Error("Choose a step.", print_exception=False)
    try:
        kept = pick_step(job.output_dir, step.strip())
    except (CheckpointError, ArtifactError) as error:
        raise gr.Error(str(error), print_exception=False) from None
    return f"The run now holds the checkpoint at step {kept}: the Generate and Hub tabs use it."
