"""Shared by the CUDA tests: the SD-1.5-shaped base (random weights, 512 px, built once per session) and the folder
their measurements go to. Without CUDA every test here is skipped (see each module's ``pytestmark``)."""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import make_subject_images

ROOT = Path(__file__).resolve().parents[2]


def results_dir() -> Path:
    """Where measurements are written: the device's return folder ($OUT) when there is one."""
    folder = Path(os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_results(name: str, rows: list[dict]) -> None:
    from benchmarks.speed import commit

    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit()}
    (results_dir() / name).write_text(json.dumps({**header, "rows": rows}, indent=2))


@pytest.fixture(scope="session")
def sd15_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD-1.5's modules with random weights, saved as a diffusers folder (benchmarks/speed.py's sd15-random)."""
    from benchmarks.speed import build_random_pipeline

    # tests/conftest.py keeps the tiny CPU tests on one thread; building 1.1 B random weights wants them all.
    torch.set_num_threads(os.cpu_count() or 1)
    return build_random_pipeline(tmp_path_factory.mktemp("sd15-random"), "sd15")


@pytest.fixture(scope="session")
def subject_512(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subject_images(tmp_path_factory.mktemp("subject"), count=4, size=512)


@pytest.fixture(autouse=True)
def _free_cuda_memory() -> Iterator[None]:
    """Each test starts from an empty allocator, so peaks and memory caps are its own."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
