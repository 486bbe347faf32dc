"""What checkpoints cost against training: the default run on the bundled mini model, one subject.

    python benchmarks/checkpoint_cost.py                                  # dotted heart, default recipe, 1 thread
    python benchmarks/checkpoint_cost.py --subject striped_star --set sample_count=4 --json cost.json

Trains through the engine's own ``train()`` and times, in process CPU seconds and wall seconds, the training
(checkpoints left out) and each part of the checkpoints: the scorer's probe images, the checker reading them, the
sample images, the weights, the resume state, and the rest (sample PNGs, the table). CPU seconds with one torch
thread are the figure to quote on a machine shared with other work: wall seconds stretch with the load. The base
model's probes, rendered once before training starts, are reported on their own line.

Prints two Markdown tables headed by the hardware, torch version, commit and date: the costs, and every
checkpoint's scores with the recommended step (so two settings can be compared on the same, deterministic run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import personalization.snapshots as snapshots_module  # noqa: E402
import personalization.trainer as trainer_module  # noqa: E402
from benchmarks.speed import commit  # noqa: E402
from personalization.checkpoints import read_table  # noqa: E402
from personalization.config import TrainingConfig  # noqa: E402
from personalization.device import BUNDLED_MINI_MODEL, choose_placement, resolve_base_model_path  # noqa: E402
from personalization.images import load_subject_images  # noqa: E402
from personalization.mini_world.checker import read_image  # noqa: E402
from personalization.mini_world.scoring import MiniWorldScorer  # noqa: E402
from personalization.trainer import default_resolution  # noqa: E402

PARTS = ("probes", "reading", "samples", "weights", "resume state")


@dataclass
class Part:
    cpu: float = 0.0
    wall: float = 0.0
    images: int = 0


@dataclass
class CostClock:
    """CPU and wall seconds of each part of the run, gathered by wrapping the engine's own functions."""

    parts: dict[str, Part] = field(default_factory=lambda: {name: Part() for name in PARTS})
    checkpoints: Part = field(default_factory=Part)
    stages: Part = field(default_factory=Part)
    base_probes: Part = field(default_factory=Part)
    in_checkpoint: bool = False

    @contextlib.contextmanager
    def timing(self, part: Part, images: int = 0) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            part.cpu += time.process_time() - cpu
            part.wall += time.perf_counter() - wall
            part.images += images

    @contextlib.contextmanager
    def watching(self) -> Iterator[CostClock]:
        clock = self
        take_checkpoint, render_samples = trainer_module.take_checkpoint, trainer_module._render_samples
        render_batch, save_state = trainer_module.render_batch, trainer_module.save_resume_state
        save_weights, run_stages = snapshots_module.save_weights, trainer_module._run_stages
        score, prepare = MiniWorldScorer.score, MiniWorldScorer.prepare

        def timed_take_checkpoint(*args: Any, **kwargs: Any) -> None:
            clock.in_checkpoint = True
            try:
                with clock.timing(clock.checkpoints, 1):
                    take_checkpoint(*args, **kwargs)
            finally:
                clock.in_checkpoint = False

        def timed_render_batch(comps: Any, config: Any, prompts: Any, *args: Any, **kwargs: Any) -> Any:
            if not clock.in_checkpoint:  # the base model's probes: timed with the rest of prepare()
                clock.base_probes.images += len(prompts)
                return render_batch(comps, config, prompts, *args, **kwargs)
            with clock.timing(clock.parts["probes"], len(prompts)):
                return render_batch(comps, config, prompts, *args, **kwargs)

        def timed_score(scorer: MiniWorldScorer, render: Callable) -> Any:
            # What score() spends outside render_batch is the checker reading the images.
            probes = clock.parts["probes"].cpu, clock.parts["probes"].wall
            with clock.timing(clock.parts["reading"]):
                scores = score(scorer, render)
            clock.parts["reading"].cpu -= clock.parts["probes"].cpu - probes[0]
            clock.parts["reading"].wall -= clock.parts["probes"].wall - probes[1]
            return scores

        def timed_prepare(scorer: MiniWorldScorer, render_base: Callable) -> None:
            with clock.timing(clock.base_probes):
                prepare(scorer, render_base)

        def timed_samples(*args: Any, **kwargs: Any) -> Iterator[Any]:
            images = render_samples(*args, **kwargs)
            while True:
                with clock.timing(clock.parts["samples"]):
                    image = next(images, None)
                if image is None:
                    return
                clock.parts["samples"].images += 1
                yield image

        def timed_weights(*args: Any, **kwargs: Any) -> None:
            with clock.timing(clock.parts["weights"]):
                save_weights(*args, **kwargs)

        def timed_state(*args: Any, **kwargs: Any) -> None:
            with clock.timing(clock.parts["resume state"]):
                save_state(*args, **kwargs)

        def timed_stages(*args: Any, **kwargs: Any) -> Any:
            with clock.timing(clock.stages):
                return run_stages(*args, **kwargs)

        # patch.object refuses a name the engine no longer has: the benchmark fails rather than mis-time.
        with contextlib.ExitStack() as stack:
            for owner, name, wrapper in (
                (trainer_module, "take_checkpoint", timed_take_checkpoint),
                (trainer_module, "_render_samples", timed_samples),
                (trainer_module, "render_batch", timed_render_batch),
                (trainer_module, "save_resume_state", timed_state),
                (trainer_module, "_run_stages", timed_stages),
                (snapshots_module, "save_weights", timed_weights),
                (MiniWorldScorer, "score", timed_score),
                (MiniWorldScorer, "prepare", timed_prepare),
            ):
                stack.enter_context(mock.patch.object(owner, name, wrapper))
            yield self

    def training(self) -> Part:
        """The stages' time with the checkpoints and the base model's probes taken out."""
        return Part(self.stages.cpu - self.checkpoints.cpu - self.base_probes.cpu,
                    self.stages.wall - self.checkpoints.wall - self.base_probes.wall)

    def other(self) -> Part:
        parts = self.parts.values()
        return Part(self.checkpoints.cpu - sum(p.cpu for p in parts),
                    self.checkpoints.wall - sum(p.wall for p in parts))


def probe_scorer(config: TrainingConfig, subject: Path, probe_steps: int, **counts: int) -> MiniWorldScorer:
    """The scorer the trainer builds for the mini world (references at the run's resolution, their colours read by
    the checker), with its probes at ``probe_steps``; ``counts``: other probe counts (``trigger_seeds``,
    ``class_probes``)."""
    config = config.resolved()
    resolution = config.resolution or default_resolution(resolve_base_model_path(config.base_model))
    references = load_subject_images(subject, resolution).images
    colors = sorted({color for image in references if (color := read_image(image).color)})
    return MiniWorldScorer(references, config.trigger_token, config.class_noun, colors, probe_steps=probe_steps,
                           **counts)


def run(subject: Path, changes: dict[str, Any], scratch: Path, probe_steps: int | None = None) -> dict[str, Any]:
    """Train the default recipe (with ``changes``) on ``subject``; return the costs and the checkpoint table.

    ``probe_steps``: the scorer's probes at this many denoising steps instead of its default."""
    info = json.loads((subject / "subject.json").read_text(encoding="utf-8"))
    config = TrainingConfig(class_noun=info["class_noun"], base_model=BUNDLED_MINI_MODEL, **changes)
    scorer = probe_scorer(config, subject, probe_steps) if probe_steps else None
    clock = CostClock()
    with clock.watching():
        result = trainer_module.train(config, subject, scratch / "out", scorer=scorer)
    table = read_table(result.output_dir)
    assert table is not None
    training = clock.training()
    rows = [{"part": "training (checkpoints left out)", "cpu_s": training.cpu, "wall_s": training.wall,
             "images": None}]
    rows.append({"part": f"checkpoints, all {clock.checkpoints.images}", "cpu_s": clock.checkpoints.cpu,
                 "wall_s": clock.checkpoints.wall, "images": sum(p.images for p in clock.parts.values())})
    labels = {"probes": "scoring: probe images", "reading": "scoring: the checker reading them",
              "samples": "sample images", "weights": "weights", "resume state": "resume state"}
    for name, part in clock.parts.items():
        rows.append({"part": f"· {labels[name]}", "cpu_s": part.cpu, "wall_s": part.wall,
                     "images": part.images or None})
    other = clock.other()
    rows.append({"part": "· other (sample PNGs, table)", "cpu_s": other.cpu, "wall_s": other.wall, "images": None})
    base = clock.base_probes
    rows.append({"part": "base model's probes, rendered and read (once, before training)", "cpu_s": base.cpu,
                 "wall_s": base.wall, "images": base.images})
    return {"config": dict(changes), "subject": subject.name, "probe_steps": probe_steps,
            "final_losses": [stage.final_loss for stage in result.stages],
            "training_cpu_s": training.cpu, "training_wall_s": training.wall,
            "checkpoints_cpu_s": clock.checkpoints.cpu, "checkpoints_wall_s": clock.checkpoints.wall,
            "fraction_cpu": clock.checkpoints.cpu / training.cpu,
            "fraction_wall": clock.checkpoints.wall / training.wall,
            "rows": rows, "recommended_step": table.recommended_step, "kept_step": table.kept_step,
            "checkpoints": [{"step": c.step, "stage": c.stage, **c.scores} for c in table.checkpoints]}


def markdown(report: dict[str, Any], threads: int) -> str:
    lines = [f"mini model, `{report['subject']}`, default recipe"
             + (f" with {', '.join(f'{k}={v}' for k, v in report['config'].items())}" if report["config"] else "")
             + (f", probes at {report['probe_steps']} steps" if report["probe_steps"] else "")
             + f"; {choose_placement().describe()}, {threads} torch thread(s); torch {torch.__version__}; "
             f"commit {commit()}; {time.strftime('%Y-%m-%d')}", "",
             "| part | CPU s | wall s | images | CPU share of training |", "|---|---|---|---|---|"]
    training = report["training_cpu_s"]
    for row in report["rows"]:
        share = "" if row["part"].startswith("training") else f"{100 * row['cpu_s'] / training:.1f} %"
        lines.append(f"| {row['part']} | {row['cpu_s']:.1f} | {row['wall_s']:.1f} | {row['images'] or ''} | "
                     f"{share} |")
    lines += ["", f"Checkpoints cost **{100 * report['fraction_cpu']:.1f} %** of training in CPU seconds "
              f"({100 * report['fraction_wall']:.1f} % in wall seconds).", "",
              "| step | stage | fidelity | drift ± SE | leak | recommended |", "|---|---|---|---|---|---|"]
    for point in report["checkpoints"]:
        lines.append(f"| {point['step']} | {point['stage']} | {point.get('fidelity', 0):.3f} | "
                     f"{point.get('drift', 0):.3f} ± {point.get('drift_se', 0):.3f} | {point.get('leak', 0):.3f} | "
                     f"{'yes' if point['step'] == report['recommended_step'] else ''} |")
    return "\n".join(lines)


def parse_changes(pairs: list[str]) -> dict[str, Any]:
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", default="dotted_heart", help="a folder of examples/ (or any subject folder)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config changes, e.g. sample_count=1")
    parser.add_argument("--probe-steps", type=int, help="denoising steps of the scoring probes (default: the "
                        "scorer's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    subject = Path(args.subject) if Path(args.subject).is_dir() else ROOT / "examples" / args.subject
    with tempfile.TemporaryDirectory() as scratch:
        report = run(subject, parse_changes(args.set), Path(scratch), args.probe_steps)
    report.update(threads=args.threads, commit=commit(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  hardware=choose_placement().describe())
    print(markdown(report, args.threads))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
