import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import quality

ROOT = Path(__file__).resolve().parent.parent


def test_speed_benchmark_prints_its_table(tmp_path):
    """The speed benchmark runs end to end on tiny shapes and reports every step type it timed."""
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--model", "tiny", "--steps", "5",
         "--recipes", "two_stage (lora)", "textual_inversion",
         "two_stage (full) + 8-bit Adam + checkpointing", "--reference-repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| two_stage (lora) | stage 1 · trigger embedding |" in result.stdout
    assert "| two_stage (lora) | stage 2 · U-Net lora |" in result.stdout
    assert "| two_stage (full) + 8-bit Adam + checkpointing | stage 2 · U-Net full |" in result.stdout
    assert "| reference: diffusers DreamBooth step |" in result.stdout
    assert "commit" in result.stdout and "64 px" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert all(row["ms_per_step"] > 0 for row in rows)


def _subject_folder(root: Path, name: str = "my_star", info: dict | None = None) -> Path:
    """A subject outside examples/: the striped star's references under another name, with its own subject.json."""
    folder = root / name
    folder.mkdir(parents=True)
    for image in sorted((ROOT / "examples" / "striped_star").glob("*.png")):
        shutil.copy(image, folder / image.name)
    (folder / "subject.json").write_text(json.dumps(info if info is not None else {"class_noun": "star"}))
    return folder


def test_subjects_come_from_any_folder(tmp_path):
    """Every subfolder with subject.json and images is a subject; colours are optional; mistakes are refused."""
    _subject_folder(tmp_path, "my_star")
    _subject_folder(tmp_path, "painted_star", {"class_noun": " star ", "colors": ["red", "white"]})
    (tmp_path / "notes").mkdir()  # no subject.json: not a subject
    (tmp_path / "notes" / "readme.txt").write_text("not a subject")

    subjects = quality.load_subjects(tmp_path)
    assert [(s.name, s.class_noun, s.colors) for s in subjects] == [
        ("my_star", "star", None), ("painted_star", "star", ("red", "white"))]
    assert subjects[0].folder == tmp_path / "my_star"
    assert [s.name for s in quality.load_subjects(tmp_path, ["painted_star"])] == ["painted_star"]
    with pytest.raises(SystemExit, match="named missing_one"):
        quality.load_subjects(tmp_path, ["my_star", "missing_one"])

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "subject.json").write_text(json.dumps({"colors": ["red"]}))
    with pytest.raises(SystemExit, match="class_noun"):
        quality.load_subjects(tmp_path)
    (broken / "subject.json").write_text(json.dumps({"class_noun": "star"}))
    with pytest.raises(SystemExit, match="no image files"):
        quality.load_subjects(tmp_path)
    with pytest.raises(SystemExit, match="no such folder"):
        quality.load_subjects(tmp_path / "absent")


def _run(method: str, subject: str, seed: int, points: list[tuple[int, float, float, float]], kept: int,
         base: float = 0.03) -> list[dict]:
    """Synthetic checkpoint rows of one run: (step, training_s, drift, fidelity) per checkpoint."""
    return [{"method": method, "subject": subject, "seed": seed, "step": step, "training_s": seconds, "drift": drift,
             "drift_se": 0.05, "fidelity": fidelity, "base_subject_fidelity": base, "kept": step == kept,
             "last": index == len(points) - 1, "background_accuracy": 1.0, "subject_absent": 0.0, "leak": 0.0,
             "color_drift": drift, "shape_drift": 0.0}
            for index, (step, seconds, drift, fidelity) in enumerate(points)]


REF, BASE = "two_stage (full)", "dreambooth"
SYNTHETIC = [
    *_run(REF, "a", 0, [(100, 20, 0.0, 0.30), (200, 40, 0.03, 0.50), (300, 70, 0.2, 0.60)], kept=200),
    *_run(REF, "b", 0, [(100, 25, 0.1, 0.40), (200, 50, 0.3, 0.55), (300, 80, 0.5, 0.65)], kept=100),
    *_run(BASE, "a", 0, [(100, 62, 0.25, 0.45), (200, 120, 0.5, 0.70)], kept=100),
    *_run(BASE, "b", 0, [(100, 61, 0.3, 0.50), (200, 121, 0.6, 0.72)], kept=100, base=0.05),
]


def test_matched_drift_and_time_on_synthetic_curves():
    runs = quality.group_runs(list(reversed(SYNTHETIC)))  # any row order: each run sorted by step
    a, b = runs[(REF, "a", 0)], runs[(REF, "b", 0)]
    assert [row["step"] for row in a] == [100, 200, 300]
    # Matched drift: the best fidelity within the budget, else the base model (step 0).
    assert quality.fidelity_at_drift(a, 0.125) == (0.50, True)
    assert quality.fidelity_at_drift(b, 0.125) == (0.40, True)
    assert quality.fidelity_at_drift(b, 0.05) == (0.03, False)
    assert quality.fidelity_at_drift(a, 1.0) == (0.60, True)
    # Matched time: the last checkpoint within the budget, not the best one.
    assert quality.fidelity_at_time(a, 60) == (0.50, True)
    assert quality.fidelity_at_time(b, 60) == (0.55, True)
    assert quality.fidelity_at_time(a, 19.9) == (0.03, False)
    # The time axis is CPU seconds where every row has them (a loaded machine stretches wall seconds).
    assert quality.time_key(SYNTHETIC) == "training_s"
    with_cpu = [{**row, "training_cpu_s": row["training_s"] / 2} for row in a]
    assert quality.time_key(with_cpu) == "training_cpu_s"
    assert quality.fidelity_at_time(with_cpu, 20, key="training_cpu_s") == (0.50, True)

    kept = {entry["method"]: entry for entry in quality.summarize(SYNTHETIC, "kept", 0.125, 60)}
    assert kept[REF]["runs"] == 2 and kept[REF]["steps"] == [100, 200]
    assert kept[REF]["fidelity"][0] == pytest.approx((0.50 + 0.40) / 2)
    assert kept[REF]["drift_se"] == pytest.approx((0.05**2 * 2) ** 0.5 / 2)
    at_drift, at_time = kept[REF]["at_drift"], kept[REF]["at_time"]
    assert (at_drift.mean, at_drift.reached, at_drift.runs) == (pytest.approx(0.45), 2, 2)
    assert (at_time.mean, at_time.reached) == (pytest.approx(0.525), 2)
    # DreamBooth never gets within 0.125 drift nor 60 s: both runs are worth their base models.
    assert kept[BASE]["at_drift"].mean == pytest.approx(0.04) and kept[BASE]["at_drift"].reached == 0
    assert kept[BASE]["at_time"].mean == pytest.approx(0.04) and kept[BASE]["at_time"].reached == 0
    last = {entry["method"]: entry for entry in quality.summarize(SYNTHETIC, "last")}
    assert last[REF]["fidelity"][0] == pytest.approx(0.625) and last[REF]["steps"] == [300]
    table = quality.markdown(quality.summarize(SYNTHETIC, "kept", 0.125, 60), 0.125, 60, True)
    assert "fidelity at drift ≤ 0.125" in table and "0.450 ± 0.050 (2/2)" in table and "0.040 ± 0.010 (0/2)" in table


def test_frontier_comparison_is_paired_and_worded_from_the_numbers(tmp_path):
    by_drift = quality.compare_frontiers(SYNTHETIC, REF, BASE, quality.fidelity_at_drift, [0.125, 1.0])
    # <= 0.125: (0.50 - 0.03) and (0.40 - 0.05); <= 1.0: (0.60 - 0.70) and (0.65 - 0.72).
    assert [c.difference for c in by_drift] == [pytest.approx(0.41), pytest.approx(-0.085)]
    assert by_drift[0].se == pytest.approx(0.06)  # stdev of (0.47, 0.35) / sqrt(2) = 0.12 / 2
    assert [c.verdict for c in by_drift] == ["ahead", "behind"]
    assert quality.frontier_verdict(by_drift) == "crosses"

    def comparisons(*differences: float) -> list:
        return [quality.BudgetComparison(index, difference, 0.01) for index, difference in enumerate(differences)]

    assert quality.frontier_verdict(comparisons(0.1, 0.0)) == "dominates"
    assert quality.frontier_verdict(comparisons(-0.1, 0.01)) == "trails"
    assert quality.frontier_verdict(comparisons(0.015, -0.019)) == "matches"
    assert quality.frontier_verdict([quality.BudgetComparison(0, 0.05, 0.03)]) == "matches"  # within 2 SE
    assert quality.frontier_verdict([]) == "no paired runs"

    assert quality.time_grid(SYNTHETIC) == quality.TIME_GRID  # the slowest run (121 s) is covered
    assert quality.time_grid([{**SYNTHETIC[0], "training_s": 300.0}])[-1] == 480.0
    lines = quality.frontier_statements(SYNTHETIC)
    assert len(lines) == 1 and lines[0].startswith(f"- {REF} vs {BASE}: fidelity vs drift: ")
    assert "fidelity vs training s (wall): crosses" in lines[0]  # no CPU seconds in these rows

    svg = tmp_path / "curves.svg"
    quality.svg_plot(SYNTHETIC, svg)
    text = svg.read_text()
    assert text.startswith("<svg") and text.count("<polyline") == 4  # two panels x two methods
    assert "training s (wall)" in text and "drift (share" in text


# Runs the benchmark with every file write (and rename) it makes recorded, to check where they go.
AUDITED = """
import atexit, json, os, runpy, sys
writes = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(os.fsdecode(args[0]))
    elif event == "os.rename":
        writes.append(os.fsdecode(args[1]))
sys.addaudithook(hook)
atexit.register(lambda: print("WRITES " + json.dumps(writes), file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_quality_benchmark_resumes_and_writes_no_tracked_file(tmp_path):
    """One training run gives a row per checkpoint; a run already in --json is not trained again; without --svg
    nothing is written inside the repository."""
    subjects = tmp_path / "subjects"
    _subject_folder(subjects, "my_star")
    out = tmp_path / "runs.json"
    # Seed 0 is already in the resume file (numbers no training would give): only seed 1 trains.
    earlier = [{**row, "training_cpu_s": row["training_s"], "threads": 1, "class_probes": 2, "trigger_seeds": 1}
               for row in _run("two_stage (lora)", "my_star", 0, [(3, 1234.5, 0.0, 0.9), (6, 2345.6, 0.0, 0.95)],
                               kept=6)]
    out.write_text(json.dumps(earlier))
    command = [sys.executable, "-B", "-c", AUDITED, str(ROOT / "benchmarks" / "quality.py"),
               "--methods", "two_stage (lora)", "--subjects-dir", str(subjects), "--steps-scale", "0.01",
               "--score-seeds", "1", "--class-probes", "2", "--seeds", "2", "--json", str(out)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PERSONALIZATION_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]

    rows = json.loads(out.read_text())
    assert rows[:2] == earlier  # kept as they were: not trained again
    new = rows[2:]
    assert {(row["subject"], row["seed"]) for row in new} == {("my_star", 1)}
    steps = [row["step"] for row in new]
    assert len(steps) >= 3 and steps == sorted(steps)  # stage 1's end and stage 2's checkpoints: a curve
    assert sum(row["kept"] for row in new) == 1 and new[-1]["last"]
    assert all({"fidelity", "drift", "drift_se", "leak", "subject_absent", "background_accuracy", "training_s"}
               <= row.keys() and row["class_probes"] == 2 for row in new)
    assert [row["training_s"] for row in new] == sorted(row["training_s"] for row in new)
    cpu = [row["training_cpu_s"] for row in new]  # CPU seconds of training, checkpoints left out
    assert cpu[0] > 0 and cpu == sorted(cpu)
    assert "fidelity at ≤ 60 training CPU s" in result.stdout
    assert "| two_stage (lora) | 2 |" in result.stdout
    assert "fidelity at drift ≤ 0.125" in result.stdout and "At the last step" in result.stdout

    written = json.loads(result.stderr.rsplit("WRITES ", 1)[1].splitlines()[0])
    assert str(out) in written  # the hook sees the benchmark's own writes
    inside = [path for path in written if Path(path).resolve().is_relative_to(ROOT)]
    assert not inside, inside
    assert "plot:" not in result.stdout


def test_speed_benchmark_runs_sdxl_shapes_with_the_24_gb_plan(tmp_path):
    """The SDXL path of the benchmark (tiny SDXL shapes here, sdxl-random on a GPU) trains the 24 GB plan's recipe."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--model", "sdxl-tiny", "--steps", "3",
         "--recipes", "two_stage (lora) + checkpointing + 8-bit Adam"],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| two_stage (lora) + checkpointing + 8-bit Adam | stage 2 · U-Net lora |" in result.stdout
    assert "sdxl-tiny at 64 px" in result.stdout and "reference" not in result.stdout


def test_checkpoint_cost_benchmark_splits_the_cost_of_checkpoints(tmp_path):
    """A short default-recipe run: every part of the checkpoints timed, the parts adding up to the whole."""
    out = tmp_path / "cost.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "checkpoint_cost.py"), "--set", "stage1_steps=4",
         "stage2_steps=4", "checkpoints=1", "sample_count=2", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PERSONALIZATION_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {row["part"]: row for row in report["rows"]}
    assert rows["checkpoints, all 2"]["images"] == 2 * (16 + 2)  # stage 1's end and stage 2's: probes + samples
    assert rows["· scoring: probe images"]["images"] == 2 * 16 and rows["· sample images"]["images"] == 4
    parts = [row["cpu_s"] for name, row in rows.items() if name.startswith("·")]
    assert sum(parts) == pytest.approx(report["checkpoints_cpu_s"]) and all(part >= 0 for part in parts[:-1])
    assert report["fraction_cpu"] == pytest.approx(report["checkpoints_cpu_s"] / report["training_cpu_s"])
    assert [point["step"] for point in report["checkpoints"]] == [4, 8]
    assert "Checkpoints cost **" in result.stdout and "commit" in result.stdout


def test_probe_steps_benchmark_reads_the_same_checkpoints_at_each_setting(tmp_path):
    """Every variant scores the same checkpoints; the reference against itself changes nothing; --report reprints."""
    out = tmp_path / "agreement.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "probe_steps.py"), "--subjects", "dotted_heart",
               "--steps", "6", "3", "--other-seeds", "--large", "--set", "stage1_steps=4", "stage2_steps=4",
               "checkpoints=1", "--json", str(out)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PERSONALIZATION_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    [run] = json.loads(out.read_text())
    assert [point["step"] for point in run["checkpoints"]] == [4, 8]
    for point in run["checkpoints"]:
        assert set(point["by_variant"]) == {"6", "3", "6b", "3b", "large"}
        assert point["by_variant"]["6"]["image_fidelity_mad"] == 0.0
        assert point["by_variant"]["6"]["class_verdicts_changed"] == 0.0
    assert "| 6 | - | 0.000 | 0.000 | 0.000 |" in result.stdout and "| 3b | 6b |" in result.stdout
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_steps.py"), "--report", str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.stdout.strip() == result.stdout.split("done: dotted_heart seed 0\n", 1)[1].strip()
