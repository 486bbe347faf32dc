"""Do the checker's readings of a checkpoint depend on how many denoising steps its probes take?

    python benchmarks/probe_steps.py --steps 25 10 5 --other-seeds --large --seeds 0 --json seed0.json
    python benchmarks/probe_steps.py --report seed0.json seed1.json          # the tables of finished runs

Trains the default recipe on the bundled mini model (one torch thread) and, at every checkpoint, renders the
trainer's probe set (:class:`MiniWorldScorer` with its default counts) at each step count from the same weights (the
base model's probes at the same count); the first count is the reference. ``--other-seeds`` adds the same prompts on
other seeds at every count (variants ``25b``, ``10b``...): what the choice of seeds alone changes, the yardstick for
what the steps change. ``--large`` scores every checkpoint with a 4x larger set on seeds of its own at the reference
steps and judges each variant's recommendation on it (its place in the rule's order there).

Per checkpoint: fidelity and drift of every variant; against the reference steps on the same seeds, image by image,
the mean absolute difference of the trigger images' fidelity and the share of class probes whose verdict (drawn right
or not) changes. Per run: each variant's recommended step (:func:`personalization.checkpoints.recommend`). Training
is the same whatever the probes (they render under a forked random state), so every variant reads the same
checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import personalization.trainer as trainer_module  # noqa: E402
from benchmarks.checkpoint_cost import parse_changes, probe_scorer  # noqa: E402
from benchmarks.speed import commit  # noqa: E402
from personalization.checkpoints import Checkpoint, recommend  # noqa: E402
from personalization.config import TrainingConfig  # noqa: E402
from personalization.device import BUNDLED_MINI_MODEL, choose_placement  # noqa: E402
from personalization.mini_world.scoring import MiniWorldScorer  # noqa: E402

# The second probe set (``--other-seeds``): the same prompts with seeds apart from the default set's, to measure how
# much the recommendation moves with the choice of seeds alone. The large set's seeds are apart from both.
OTHER_SEEDS, LARGE_SEEDS = 50, 100
LARGE = 4  # the large set: 4x the default set's trigger seeds and class probes


def with_seeds(scorer: MiniWorldScorer, offset: int) -> MiniWorldScorer:
    """``scorer``'s prompts with every seed moved by ``offset``."""
    scorer.trigger_seeds = [seed + offset for seed in scorer.trigger_seeds]
    scorer.class_seeds = [seed + offset for seed in scorer.class_seeds]
    return scorer


@dataclass(frozen=True)
class Variant:
    """One way of rendering the default probe set: denoising steps and which seeds (``b``: the other seeds)."""

    steps: int
    other_seeds: bool = False

    @property
    def label(self) -> str:
        return f"{self.steps}{'b' if self.other_seeds else ''}"


class VariantsScorer:
    """Scores each checkpoint once per variant (the first one's scores go into the run's table), keeping every
    image's reading, and with the large set when asked."""

    name = MiniWorldScorer.name
    drift_tolerance = MiniWorldScorer.drift_tolerance

    def __init__(self, make_scorer: Callable[[int], MiniWorldScorer], variants: Sequence[Variant],
                 large: MiniWorldScorer | None = None) -> None:
        self.variants = list(variants)
        self.probe_steps = self.variants[0].steps
        self.scorers = {v.label: with_seeds(make_scorer(v.steps), OTHER_SEEDS if v.other_seeds else 0)
                        for v in self.variants}
        self.large = large
        self.render_at: Callable[[Sequence[str], Sequence[int], int], list[Any]] | None = None
        self.rows: list[dict[str, Any]] = []

    def prepare(self, render_base: Callable) -> None:
        assert self.render_at is not None
        for variant in self.variants:
            self.scorers[variant.label].prepare(
                lambda prompts, seeds, steps=variant.steps: self.render_at(prompts, seeds, steps))
        if self.large is not None:
            self.large.prepare(lambda prompts, seeds: self.render_at(prompts, seeds, self.variants[0].steps))

    def score(self, render: Callable) -> Any:
        assert self.render_at is not None
        results, per_image = {}, {}
        for variant in self.variants:
            scorer, images = self.scorers[variant.label], []

            def keep(prompts: Sequence[str], seeds: Sequence[int], steps: int = variant.steps,
                     images: list = images) -> list:
                images.extend(self.render_at(prompts, seeds, steps))
                return images

            results[variant.label] = scorer.score(keep)
            trigger = images[:len(scorer.trigger_prompts)]
            classes = scorer._read_class(images[len(scorer.trigger_prompts):])
            per_image[variant.label] = {"fidelity": [scorer.references.fidelity(image) for image in trigger],
                                        "class_right": [reading.right for reading in classes]}
        row: dict[str, Any] = {}
        for variant in self.variants:
            mine = per_image[variant.label]
            # Image by image against the first variant with the same seeds (the reference steps).
            same = per_image[next(v.label for v in self.variants if v.other_seeds == variant.other_seeds)]
            row[variant.label] = {
                **{key: value for key, value in results[variant.label].as_dict().items() if isinstance(value, float)},
                "fidelity_se": statistics.stdev(mine["fidelity"]) / math.sqrt(len(mine["fidelity"])),
                "image_fidelity_mad": statistics.fmean(abs(a - b) for a, b in zip(mine["fidelity"], same["fidelity"],
                                                                                    strict=True)),
                "class_verdicts_changed": statistics.fmean(float(a != b) for a, b in zip(
                    mine["class_right"], same["class_right"], strict=True)),
            }
        if self.large is not None:
            large = self.large.score(lambda prompts, seeds: self.render_at(prompts, seeds, self.variants[0].steps))
            row["large"] = {key: value for key, value in large.as_dict().items() if isinstance(value, float)}
        self.rows.append(row)
        return results[self.variants[0].label]


@contextmanager
def capturing_components(scorer: VariantsScorer, config: TrainingConfig) -> Iterator[None]:
    """Hand the scorer a renderer at any step count on the run's own modules (the trainer builds its renderer at
    one step count)."""
    load = trainer_module.load_components
    accelerator: list[Any] = []

    def load_and_keep(*args: Any, **kwargs: Any) -> Any:
        comps = load(*args, **kwargs)

        def render_at(prompts: Sequence[str], seeds: Sequence[int], steps: int) -> list[Any]:
            if not accelerator:
                from accelerate import Accelerator

                accelerator.append(Accelerator(cpu=True))
            return trainer_module.render_batch(comps, config, prompts, seeds, accelerator[0], steps=steps)

        scorer.render_at = render_at
        return comps

    with mock.patch.object(trainer_module, "load_components", load_and_keep):
        yield


def run(subject: Path, seed: int, variants: Sequence[Variant], scratch: Path,
        changes: dict[str, Any] | None = None, large: bool = False) -> dict[str, Any]:
    """Train ``subject`` with ``seed``; score every checkpoint with every variant (and the large set)."""
    info = json.loads((subject / "subject.json").read_text(encoding="utf-8"))
    config = TrainingConfig(class_noun=info["class_noun"], base_model=BUNDLED_MINI_MODEL, seed=seed, sample_count=0,
                            **(changes or {}))
    resolved = config.resolved()
    large_set = None
    if large:
        large_set = with_seeds(probe_scorer(config, subject, variants[0].steps,
                                            trigger_seeds=LARGE * MiniWorldScorer.DEFAULT_TRIGGER_SEEDS,
                                            class_probes=LARGE * MiniWorldScorer.DEFAULT_CLASS_PROBES), LARGE_SEEDS)
    scorer = VariantsScorer(lambda steps: probe_scorer(config, subject, steps), variants, large_set)
    started = time.process_time()
    with capturing_components(scorer, resolved):
        result = trainer_module.train(config, subject, scratch / f"{subject.name}-{seed}", scorer=scorer)
    from personalization.checkpoints import read_table

    table = read_table(result.output_dir)
    assert table is not None and len(table.checkpoints) == len(scorer.rows)
    return {"subject": subject.name, "seed": seed, "changes": changes or {}, "cpu_s": time.process_time() - started,
            "hardware": choose_placement().describe(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "commit": commit(), "date": time.strftime("%Y-%m-%d"), "large_seeds_apart": True,
            "checkpoints": [{"step": point.step, "stage": point.stage, "by_variant": row}
                            for point, row in zip(table.checkpoints, scorer.rows, strict=True)]}


def _rows(run_: dict[str, Any]) -> list[dict[str, Any]]:
    """Each checkpoint's scores by variant label, with ``held_out`` (the large set's, on seeds of its own) when the
    run has it. Runs written before the large set had seeds of its own ("by_steps", "truth") shared the default set's
    8 + 8 images among its 32 + 32; those are taken out."""
    rows = []
    for point in run_["checkpoints"]:
        old = "by_variant" not in point
        values = point["by_steps"] if old else point["by_variant"]
        by = {key: value for key, value in values.items() if key not in ("truth", "large")}
        row: dict[str, Any] = {"step": point["step"], "by": by}
        large = values.get("truth" if old else "large")
        if large is not None and old:
            reference = by[next(iter(by))]
            trigger, probes = 2 * MiniWorldScorer.DEFAULT_TRIGGER_SEEDS, MiniWorldScorer.DEFAULT_CLASS_PROBES

            def rest(key: str, shared: int, large: dict = large, reference: dict = reference) -> float:
                return (LARGE * shared * large[key] - shared * reference[key]) / ((LARGE - 1) * shared)

            large = {"fidelity": rest("fidelity", trigger), "drift": rest("drift", probes),
                     "base_fidelity": large["base_fidelity"]}
        if large is not None:
            row["held_out"] = large
        rows.append(row)
    return rows


def _recommended(rows: Sequence[dict[str, Any]], scores: Callable[[dict[str, Any]], dict[str, float]]) -> int | None:
    return recommend([Checkpoint(row["step"], "", True, 0.0, scores=scores(row)) for row in rows],
                     MiniWorldScorer.drift_tolerance)


def held_out_order(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The steps as the rule ranks them on the held-out scores: its recommendation, then its recommendation among
    the rest, and so on."""
    left, order = list(rows), []
    while left:
        best = _recommended(left, lambda row: row["held_out"])
        order.append(best)
        left = [row for row in left if row["step"] != best]
    return order


def _compared_with(label: str, labels: Sequence[str]) -> str:
    """A variant is compared with the reference steps on the same seeds; the other seeds at the reference steps with
    the reference itself (what the seeds alone change)."""
    others = [x for x in labels if x.endswith("b")]
    if label.endswith("b") and label != others[0]:
        return others[0]
    return labels[0]


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Per checkpoint, per run and overall tables; the first variant is the reference."""
    labels = list(_rows(runs[0])[0]["by"])
    reference = labels[0]
    changes = ", ".join(f"{key}={value}" for key, value in runs[0].get("changes", {}).items())
    recipe = f"default recipe with {changes}" if changes else "default recipe"
    judged = all("held_out" in row for run_ in runs for row in _rows(run_))
    first = runs[0]
    where = (f"{first['hardware']}, {first['threads']} torch thread(s); torch {first['torch']}; commit "
             f"{first['commit']}; {first['date']}" if "hardware" in first else "where and when: not recorded")
    lines = [f"mini model, {recipe}; the trainer's default probe set (8 trigger images, 8 class probes) rendered as "
             f"{', '.join(labels)} (denoising steps; b: other seeds), reference {reference}"
             + ("; held out: a 4x larger set at the reference steps on seeds of its own" if judged else "")
             + f"; {where}", "",
             "| subject | seed | step | " + " | ".join(f"fidelity {label}" for label in labels)
             + f" | SE {reference}" + (" | held out" if judged else "") + " | "
             + " | ".join(f"drift {label}" for label in labels) + (" | held out" if judged else "") + " |",
             "|---" * (3 + 2 * len(labels) + 1 + 2 * judged) + "|"]
    for run_ in runs:
        for row in _rows(run_):
            by = row["by"]
            lines.append(
                f"| {run_['subject']} | {run_['seed']} | {row['step']} | "
                + " | ".join(f"{by[label]['fidelity']:.3f}" for label in labels)
                + f" | {by[reference]['fidelity_se']:.3f}"
                + (f" | {row['held_out']['fidelity']:.3f}" if judged else "") + " | "
                + " | ".join(f"{by[label]['drift']:.3f}" for label in labels)
                + (f" | {row['held_out']['drift']:.3f}" if judged else "") + " |")

    lines += ["", "| subject | seed | " + " | ".join(f"recommended {label}" for label in labels)
              + (" | the rule's order on the held-out set | held-out fidelity / drift of each recommendation"
                 if judged else "") + " |", "|---" * (2 + len(labels) + 2 * judged) + "|"]
    places: dict[str, list[int]] = {label: [] for label in labels}
    picks_by_run = []
    for run_ in runs:
        rows = _rows(run_)
        picks = {label: _recommended(rows, lambda row, label=label: row["by"][label]) for label in labels}
        picks_by_run.append(picks)
        line = f"| {run_['subject']} | {run_['seed']} | " + " | ".join(str(picks[label]) for label in labels)
        if judged:
            by_step = {row["step"]: row["held_out"] for row in rows}
            order = held_out_order(rows)
            for label in labels:
                places[label].append(order.index(picks[label]))
            line += f" | {' > '.join(map(str, order))} | " + ", ".join(
                f"{label}: {by_step[picks[label]]['fidelity']:.3f} / {by_step[picks[label]]['drift']:.3f}"
                for label in labels)
        lines.append(line + " |")

    lines += ["", "| variant | compared with | mean abs fidelity difference | max | mean abs per-image difference | "
              "mean abs drift difference | max | class verdicts changed | recommendation differs"
              + (" | recommendation = held-out one | mean place in the held-out order (0: first) | worst"
                 if judged else "") + " |", "|---" * (9 + 3 * judged) + "|"]
    points = [row["by"] for run_ in runs for row in _rows(run_)]
    for label in labels:
        base = _compared_with(label, labels)
        same_seeds = label.endswith("b") == base.endswith("b")
        fidelity = [abs(p[label]["fidelity"] - p[base]["fidelity"]) for p in points]
        drift = [abs(p[label]["drift"] - p[base]["drift"]) for p in points]
        changed = sum(picks[label] != picks[base] for picks in picks_by_run)
        per_image = (f"{statistics.fmean(p[label]['image_fidelity_mad'] for p in points):.3f}" if same_seeds
                     else "-")
        verdicts = (f"{statistics.fmean(p[label]['class_verdicts_changed'] for p in points):.3f}" if same_seeds
                    else "-")
        line = (f"| {label} | {base if label != base else '-'} | {statistics.fmean(fidelity):.3f} | "
                f"{max(fidelity):.3f} | {per_image} | {statistics.fmean(drift):.3f} | {max(drift):.3f} | "
                f"{verdicts} | {changed} of {len(runs)}")
        if judged:
            line += (f" | {places[label].count(0)} of {len(runs)} | {statistics.fmean(places[label]):.2f} | "
                     f"{max(places[label])}")
        lines.append(line + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", nargs="*", default=["dotted_heart", "striped_star", "smiley_circle",
                                                          "split_square"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--steps", nargs="*", type=int, default=[25, 10, 8, 5], help="the first is the reference")
    parser.add_argument("--other-seeds", action="store_true", help="also render the probe set on other seeds at "
                        "every step count: how far the seeds alone move the scores and the recommendation")
    parser.add_argument("--large", action="store_true", help="also score every checkpoint with a 4x larger probe "
                        "set on seeds of its own at the reference steps, and judge each recommendation on it")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config changes (a quick run: "
                        "stage1_steps=20 stage2_steps=30)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the runs as JSON (after each run, so a cut-off grid keeps "
                        "what it finished)")
    parser.add_argument("--report", nargs="*", type=Path, help="only print the tables of these JSON files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.report:
        print(markdown([run_ for path in args.report for run_ in json.loads(path.read_text())]))
        return
    variants = [Variant(steps) for steps in args.steps]
    variants += [Variant(steps, other_seeds=True) for steps in args.steps] if args.other_seeds else []
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for name in args.subjects:
                subject = Path(name) if Path(name).is_dir() else ROOT / "examples" / name
                runs.append(run(subject, seed, variants, Path(scratch), parse_changes(args.set), args.large))
                print(f"done: {name} seed {seed}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(runs, indent=2))
    print(markdown(json.loads(json.dumps(runs))))


if __name__ == "__main__":
    main()
