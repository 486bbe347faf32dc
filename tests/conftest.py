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


def make_mixed_upload(folder: Path) -> dict[str, str]:
    """A folder as people really hand it over: good photos among damaged, non-photo and system files.

    Returns the expected outcome per file name: "used", "refused" (with a reason) or "skipped" (with a note).
    """
    make_subject_images(folder)
    expected = {f"subject_{index}.png": "used" for index in range(3)}
    noise = np.random.default_rng(1).integers(0, 255, (TINY_RESOLUTION, TINY_RESOLUTION, 3), dtype=np.uint8)
    # A real photo with a hostile, hidden-looking name is still a photo.
    Image.fromarray(noise).save(folder / "..%2f..%2fevil.png", format="PNG")
    expected["..%2f..%2fevil.png"] = "used"
    # Noise keeps the PNG large enough that half of it stops inside the image data.
    whole = (folder / "..%2f..%2fevil.png").read_bytes()
    (folder / "damaged.png").write_bytes(whole[: len(whole) // 2])
    (folder / "drawing.svg").write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
                                        'width="64" height="64"><circle cx="32" cy="32" r="20"/></svg>\n')
    (folder / "readme.txt").write_text("photos of my dog\n")
    expected |= {"damaged.png": "refused", "drawing.svg": "refused", "readme.txt": "refused"}
    # Thumbs.db is an OLE compound file; its signature is enough to be what Windows leaves behind.
    (folder / "Thumbs.db").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + bytes(504))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(56))
    expected |= {"Thumbs.db": "skipped", ".DS_Store": "skipped"}
    return expected
