from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_pipeline import TINY_RESOLUTION, build_tiny_pipeline

# Tests never reach the network; a loopback fake Hub is reached through explicit endpoints.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One thread: the tiny models gain nothing from more, and oversubscribed OpenMP threads stall each other.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONALIZATION_CACHE", str(tmp_path / "cache"))


def make_subject_images(folder: Path, count: int = 3, size: int = TINY_RESOLUTION) -> Path:
    """Small photos of a 'subject': a striped square at different places."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        array = np.full((size, size, 3), (40, 90, 200), dtype=np.uint8)
        x, y = rng.integers(0, size // 3, size=2)
        array[y:y + size // 2, x:x + size // 2] = (230, 40, 40)
        array[y:y + size // 2:4, x:x + size // 2] = (250, 250, 250)
        Image.fromarray(array).save(folder / f"subject_{index}.png")
    return folder


@pytest.fixture
def subject_dir(tmp_path: Path) -> Path:
    return make_subject_images(tmp_path / "subject")
