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
         "--recipes", "two_stage (lora)", "textual_inversion", "--reference-repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| two_stage (lora) | stage 1 · trigger embedding |" in result.stdout
    assert "| two_stage (lora) | stage 2 · U-Net lora |" in result.stdout
    assert "| reference: diffusers DreamBooth step |" in result.stdout
    assert "commit" in result.stdout and "64 px" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert all(row["ms_per_step"] > 0 for row in rows)
