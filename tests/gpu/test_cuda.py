"""Every recipe on CUDA with SD-1.5's shapes at 512 px (random weights), in bf16 and in fp16 with loss scaling (what a
T4 runs): losses finite, each stage leaves what it does not train bit-identical (the text encoder and the VAE after
stage 2) and moves what it trains, the samples and the generated images are not black (a NaN decodes to black; fp16
VAE decoding is the classic trap), and the written folder reloads with plain diffusers loaders on CUDA.

The same checks as tests/test_precision.py (tests/mixed_precision.py), on the real device. Skipped without CUDA;
`bash scripts/gpu_check.sh` runs it on a GPU machine and writes gpu-correctness.json there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from personalization import trainer
from personalization.config import TrainingConfig
from personalization.device import Placement
from personalization.generation import Generator
from personalization.recipes import recipe_for
from tests.gpu.conftest import write_results
from tests.mixed_precision import (
    AUTOCAST_DTYPES,
    MEMORY_VARIANTS,
    RECIPES,
    StageWatch,
    assert_finite_losses,
    check_artifact,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on one)")

STEPS = 20  # per stage: enough for fp16's loss scaler to skip its first overflowing steps and still train
SAMPLE_STEPS = 10
RESOLUTION = 512
CASES = [pytest.param(precision, changes, id=f"{precision}-{name}")
         for precision in ("bf16", "fp16") for name, changes in RECIPES]
# A T4 trains fp16 with 8-bit Adam and checkpointing; LoRA with checkpointing is the 8 GB cards' plan.
CASES += [pytest.param(precision, changes, id=f"{precision}-{name}")
          for precision, (name, changes) in zip(("fp16", "bf16"), MEMORY_VARIANTS, strict=True)]
# Checkpoints (samples, scores, the resume state: 10 GB for a full SD-1.5 U-Net) run in the two-stage LoRA cases;
# the others train with the stage ends only, so the whole module fits fewer device calls.
WITH_CHECKPOINTS = dict(RECIPES)["two_stage-lora"]
ROWS: list[dict] = []


@pytest.fixture(scope="module")
def generators() -> Iterator[dict[str, Generator]]:
    """One base pipeline per dtype for the whole module (artifacts are swapped on it, as the app does)."""
    yield {precision: Generator(torch.device("cuda"), dtype) for precision, dtype in AUTOCAST_DTYPES.items()}


@pytest.mark.parametrize(("precision", "changes"), CASES)
def test_each_recipe_trains_on_cuda_and_its_artifact_generates(sd15_base: Path, subject_512: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               generators: dict[str, Generator], precision: str,
                                                               changes: dict) -> None:
    watch = StageWatch("cuda").install(monkeypatch)
    config = TrainingConfig(class_noun="object", base_model=str(sd15_base), stage1_steps=STEPS, stage2_steps=STEPS,
                            class_images=2, sample_count=1, sample_steps=SAMPLE_STEPS,
                            checkpoints=4 if changes == WITH_CHECKPOINTS else 0, **changes)
    events: list = []
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train(config, subject_512, tmp_path / "out", progress=events.append,
                           placement=Placement(torch.device("cuda"), precision))
    seconds = time.perf_counter() - started
    row = {"precision": precision, **{k: v for k, v in changes.items()}, "seconds": round(seconds, 1),
           "seconds_training": round(result.seconds_training, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "notes": result.notes,
           "final_losses": [stage.final_loss for stage in result.stages]}
    ROWS.append(row)
    write_results("gpu-correctness.json", ROWS)  # now, not at the module's end: a device call cut off keeps it

    assert [record.name for record in watch.records] == [stage.name for stage in recipe_for(config.resolved()).stages]
    watch.assert_ran(precision)
    assert_finite_losses(events, result.config.stage1_steps + result.config.stage2_steps)
    started = time.perf_counter()
    check_artifact(result.output_dir, str(sd15_base), generators[precision], RESOLUTION, steps=SAMPLE_STEPS)
    row.update(checked=True, seconds_check=round(time.perf_counter() - started, 1))
    write_results("gpu-correctness.json", ROWS)


def test_fp16_generation_of_the_base_model_is_not_black(sd15_base: Path, generators: dict[str, Generator]) -> None:
    """What the app's Generate tab runs on every GPU: the base pipeline in fp16, decoded by its fp16 VAE."""
    from personalization.generation import GenerationRequest
    from tests.mixed_precision import assert_drawn

    generator = generators["fp16"]
    generator.use_base(str(sd15_base))
    images = generator.generate(GenerationRequest(prompt="a photo of an object", steps=SAMPLE_STEPS, num_images=2,
                                                  resolution=RESOLUTION))
    assert len(images) == 2 and images[0].size == (RESOLUTION, RESOLUTION)
    for image in images:
        assert_drawn(image, "fp16 base image")
