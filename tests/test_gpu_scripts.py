"""The device scripts carry the project's pins: the wheels fetched for the GPU machine and the versions its set-up
accepts as already installed are those of requirements.txt, so a pin bumped there cannot leave the GPU check on
another version."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups() for line in lines if "==" in line)


def test_the_fetched_wheels_are_the_pinned_versions():
    fetched = dict(re.findall(r"\b([a-z_-]+)==([0-9][^\s\"']*)", (ROOT / "scripts/fetch_gpu_wheels.sh").read_text()))
    assert set(fetched) == {"diffusers", "peft", "bitsandbytes"}
    assert fetched == {name: pins()[name] for name in fetched}


def test_the_device_set_up_accepts_only_the_pinned_versions():
    text = (ROOT / "scripts/gpu_env.sh").read_text().replace("\\\n", "")
    names, versions = re.search(r"assert \(([^)]*)\) == \(([^)]*)\)", text).groups()
    checked = [name.strip().split(".")[0] for name in names.split(",")]
    expected = [version.strip().strip("'") for version in versions.split(",")]
    assert expected == [pins()[name] for name in checked]
