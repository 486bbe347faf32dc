import json
import subprocess
import sys
from pathlib import Path

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


def test_quality_benchmark_resumes_from_its_json_file(tmp_path):
    """A second, larger run reuses the runs already in --json instead of training them again."""
    out, svg = tmp_path / "runs.json", tmp_path / "plot.svg"
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--methods", "two_stage (lora)",
               "--seeds", "1", "--steps-scale", "0.01", "--score-seeds", "1", "--json", str(out), "--svg", str(svg)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    first = subprocess.run([*command, "--subjects", "striped_star"], capture_output=True, text=True, timeout=300,
                           env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    first_rows = json.loads(out.read_text())
    assert [(row["subject"], row["seed"]) for row in first_rows] == [("striped_star", 0)]

    second = subprocess.run([*command, "--subjects", "striped_star", "dotted_heart"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert rows[0] == first_rows[0]  # kept as it was, training time included: not trained again
    assert [(row["subject"], row["seed"]) for row in rows] == [("striped_star", 0), ("dotted_heart", 0)]
    assert "| two_stage (lora) | 2 |" in second.stdout
    assert svg.read_text().startswith("<svg")


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
