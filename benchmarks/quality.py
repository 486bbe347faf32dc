"""Quality benchmark on the mini world: every method x every bundled subject x several seeds.

    python benchmarks/quality.py                       # all methods, all subjects, 3 seeds (CPU: about an hour)
    python benchmarks/quality.py --seeds 1 --subjects striped_star --methods "two_stage (lora)" textual_inversion

Each run trains with the method's default recipe on the bundled mini model, then the analytic checker scores it
(personalization/mini_world/scoring.py): subject fidelity (trigger prompts vs the references), background accuracy
(the prompt's background honoured), and drift (class prompts without the trigger, colour/shape accuracy vs the base
model). Prints a Markdown table (mean ± spread over subjects and seeds) with hardware, date and commit, and writes an
SVG plot of fidelity against training time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.speed import RECIPES, commit  # noqa: E402
from personalization.config import TrainingConfig  # noqa: E402
from personalization.device import BUNDLED_MINI_MODEL, choose_placement  # noqa: E402
from personalization.generation import Generator  # noqa: E402
from personalization.images import load_subject_images  # noqa: E402
from personalization.mini_world.scoring import score_personalization  # noqa: E402
from personalization.trainer import train  # noqa: E402

EXAMPLES = ROOT / "examples"
METRICS = ("subject_fidelity", "background_accuracy", "color_drift", "shape_drift")


def run_one(label: str, changes: dict, subject: Path, seed: int, scratch: Path, generator: Generator,
            score_seeds: int, steps_scale: float, base_model: str) -> dict:
    info = json.loads((subject / "subject.json").read_text())
    config = TrainingConfig(class_noun=info["class_noun"], base_model=base_model, seed=seed, sample_count=0,
                            **changes).resolved()
    if steps_scale != 1.0:
        config = TrainingConfig.from_dict({**config.to_dict(),
                                           "stage1_steps": round(config.stage1_steps * steps_scale),
                                           "stage2_steps": round(config.stage2_steps * steps_scale)})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = scratch / f"{label.replace(' ', '_')}-{subject.name}-{seed}"
    cpu_started = time.process_time()
    result = train(config, subject, out)
    cpu_seconds = time.process_time() - cpu_started
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    references = load_subject_images(subject, config.resolution or 32).images
    scores = score_personalization(generator, out, references, info.get("colors", ()), seeds=score_seeds,
                                   base_model=base_model)
    return {"method": label, "subject": subject.name, "seed": seed, "train_s": result.seconds_training,
            "cpu_s": cpu_seconds, "threads": torch.get_num_threads(), "peak_gib": peak, **scores.as_dict()}


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    recipe_order = [label for label, _ in RECIPES]

    def position(label: str) -> int:  # "two_stage (full) [stage2_steps=500]" sorts with its recipe
        recipe = label.split(" [")[0]
        return recipe_order.index(recipe) if recipe in recipe_order else len(recipe_order)

    for label in sorted(dict.fromkeys(row["method"] for row in rows), key=position):
        chosen = [row for row in rows if row["method"] == label]
        entry = {"method": label, "runs": len(chosen)}
        for metric in (*METRICS, "base_subject_fidelity", "train_s", "cpu_s"):
            values = [row[metric] for row in chosen]
            entry[metric] = (statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| method | runs | subject fidelity | (base model) | background right | colour drift (pts) | "
             "shape drift (pts) | training s | CPU s of the run |", "|---|---|---|---|---|---|---|---|---|"]
    def cell(entry: dict, name: str, scale: float = 1.0, digits: int = 3) -> str:
        mean, spread = entry[name]
        return f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}"

    for entry in table:
        lines.append(f"| {entry['method']} | {entry['runs']} | {cell(entry, 'subject_fidelity')} | "
                     f"{cell(entry, 'base_subject_fidelity')} | {cell(entry, 'background_accuracy', 100, 0)} % | "
                     f"{cell(entry, 'color_drift', 100, 0)} | {cell(entry, 'shape_drift', 100, 0)} | "
                     f"{cell(entry, 'train_s', 1, 1)} | {cell(entry, 'cpu_s', 1, 0)} |")
    return "\n".join(lines)


def svg_plot(table: list[dict], path: Path) -> None:
    """Fidelity (y) against training time (x), one labelled point per method, with spread bars."""
    width, height, margin = 640, 400, 60
    xs = [entry["train_s"][0] for entry in table]
    ys = [entry["subject_fidelity"][0] for entry in table]
    x_max = max(xs) * 1.15 or 1.0
    y_max = max(max(ys) * 1.2, 0.1)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (margin + x / x_max * (width - 2 * margin), height - margin - y / y_max * (height - 2 * margin))

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
             "font-size='12'>", "<rect width='100%' height='100%' fill='white'/>",
             f"<line x1='{margin}' y1='{height - margin}' x2='{width - margin}' y2='{height - margin}' "
             "stroke='black'/>",
             f"<line x1='{margin}' y1='{margin}' x2='{margin}' y2='{height - margin}' stroke='black'/>",
             f"<text x='{width / 2}' y='{height - 20}' text-anchor='middle'>training time (s)</text>",
             f"<text x='18' y='{height / 2}' transform='rotate(-90 18 {height / 2})' text-anchor='middle'>"
             "subject fidelity</text>"]
    for tick in range(5):
        x_value, y_value = x_max * tick / 4, y_max * tick / 4
        x_px, _ = to_px(x_value, 0)
        _, y_px = to_px(0, y_value)
        parts.append(f"<text x='{x_px}' y='{height - margin + 16}' text-anchor='middle'>{x_value:.0f}</text>")
        parts.append(f"<text x='{margin - 6}' y='{y_px + 4}' text-anchor='end'>{y_value:.2f}</text>")
    colors = ["#6366f1", "#ec4899", "#10b981", "#f59e0b", "#ef4444", "#0ea5e9"]
    for index, entry in enumerate(table):
        x, y = entry["train_s"][0], entry["subject_fidelity"][0]
        spread = entry["subject_fidelity"][1]
        x_px, y_px = to_px(x, y)
        _, low = to_px(x, max(y - spread, 0))
        _, high = to_px(x, y + spread)
        color = colors[index % len(colors)]
        parts.append(f"<line x1='{x_px}' y1='{low}' x2='{x_px}' y2='{high}' stroke='{color}'/>")
        parts.append(f"<circle cx='{x_px}' cy='{y_px}' r='6' fill='{color}'/>")
        parts.append(f"<text x='{x_px + 9}' y='{y_px - 6}' fill='{color}'>{entry['method']}</text>")
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def parse_overrides(pairs: list[str]) -> dict:
    """FIELD=VALUE pairs; values are read as JSON (numbers, true/false, null) and otherwise kept as text."""
    overrides = {}
    for pair in pairs:
        name, separator, text = pair.partition("=")
        if not separator or name not in TrainingConfig.__dataclass_fields__:
            raise SystemExit(f"--set {pair}: expected FIELD=VALUE with a TrainingConfig field")
        try:
            overrides[name] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name] = text
    return overrides


def hardware_name() -> str:
    placement = choose_placement()
    return placement.describe() if placement.device.type == "cuda" else f"CPU ({platform.processor() or 'x86'}, fp32)"


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", help="recipe labels (default: all)")
    parser.add_argument("--subjects", nargs="*", help="example subject folders (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed+seeds-1")
    parser.add_argument("--score-seeds", type=int, default=4, help="images per scored prompt")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's steps (quick runs)")
    parser.add_argument("--json", type=Path, help="every run's scores; runs already in this file are reused")
    parser.add_argument("--base-model", default=BUNDLED_MINI_MODEL,
                        help="a mini-world model folder (default: the bundled one); pin a snapshot while it trains")
    parser.add_argument("--svg", type=Path, default=ROOT / "docs" / "quality.svg")
    parser.add_argument("--set", nargs="*", metavar="FIELD=VALUE",
                        help="config changes for every chosen recipe, e.g. stage2_steps=500 (labels say so): "
                             "how candidate defaults are compared")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, all cores)")
    parser.add_argument("--shard", default="1/1",
                        help="K/N: run every N-th run starting at the K-th, so N processes (each with its own --json "
                             "and --threads 1, pinned with taskset) share a grid")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shard_index, shard_count = (int(part) for part in args.shard.split("/"))

    subjects = [p for p in sorted(EXAMPLES.iterdir()) if (p / "subject.json").is_file()
                and (not args.subjects or p.name in args.subjects)]
    recipes = [(label, changes) for label, changes in RECIPES if not args.methods or label in args.methods]
    if args.set:
        overrides = parse_overrides(args.set)
        suffix = " [" + ", ".join(f"{name}={value}" for name, value in overrides.items()) + "]"
        recipes = [(label + suffix, {**changes, **overrides}) for label, changes in recipes]
    # --json doubles as a resume file: runs already in it are kept and skipped, and it is rewritten after every
    # run, so a grid of hours survives an interrupted session.
    rows = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = {(row["method"], row["subject"], row["seed"]) for row in rows}
    generator = Generator()
    with tempfile.TemporaryDirectory() as scratch_name:
        # Seeds outermost: a grid cut short still covers every method and subject evenly.
        grid = [(seed, subject, label, changes) for seed in range(args.first_seed, args.first_seed + args.seeds)
                for subject in subjects for label, changes in recipes]
        for seed, subject, label, changes in grid[shard_index - 1::shard_count]:
            if (label, subject.name, seed) in done:
                continue
            row = run_one(label, changes, subject, seed, Path(scratch_name), generator, args.score_seeds,
                          args.steps_scale, args.base_model)
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            if args.json:
                write_atomically(args.json, json.dumps(rows, indent=2))
    wanted = {(label, subject.name, seed) for seed, subject, label, _ in grid}
    rows = [row for row in rows if (row["method"], row["subject"], row["seed"]) in wanted]
    table = summarize(rows)
    threads = sorted({row["threads"] for row in rows if "threads" in row}) or [torch.get_num_threads()]
    print(f"\nmini world, {len(subjects)} subjects x {args.seeds} seeds, on {hardware_name()} "
          f"(runs used {'/'.join(map(str, threads))} torch thread(s)); {os.cpu_count()} cores; torch "
          f"{torch.__version__}; {time.strftime('%Y-%m-%d')}; commit {commit()}\n")
    print(markdown(table))
    svg_plot(table, args.svg)
    print(f"\nplot: {args.svg}")


if __name__ == "__main__":
    main()
