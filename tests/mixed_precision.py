"""What every recipe must satisfy in mixed precision, shared by the CPU test (tests/test_precision.py, tiny model)
and the CUDA one (tests/gpu/test_cuda.py, SD-1.5 shapes): the same checks in CI and on the GPU.

:class:`StageWatch` wraps the trainer's ``run_stage`` and ``diffusion_loss`` for one ``train()`` call. Around each
stage it compares every weight of the text encoder, the VAE and the U-Net before and after, bit for bit: what the
stage does not train must not move (a cast in place, an optimizer given a frozen module, a write-back in the wrong
dtype would), and what it trains must move (a loss scaler that skips every step would leave it still). Each loss
records the autocast it ran under, so a precision that silently falls back to fp32 fails too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from personalization import trainer
from personalization.generation import GenerationRequest, Generator
from personalization.recipes import StagePlan

# (test id, config changes): every method, DreamBooth with and without prior preservation (with it, the text encoder
# trains too, the one recipe where it may move), and the memory options a T4 / an 8 GB card switch on.
RECIPES = [
    ("two_stage-lora", {"method": "two_stage", "stage2_mode": "lora"}),
    ("two_stage-full", {"method": "two_stage", "stage2_mode": "full"}),
    ("textual_inversion", {"method": "textual_inversion"}),
    ("dreambooth-prior-text", {"method": "dreambooth", "prior_preservation": True, "train_text_encoder": True}),
    ("dreambooth", {"method": "dreambooth"}),
    ("dreambooth_lora", {"method": "dreambooth_lora"}),
]
MEMORY_VARIANTS = [
    ("two_stage-full-8bit-checkpointing",
     {"method": "two_stage", "stage2_mode": "full", "use_8bit_adam": True, "gradient_checkpointing": True}),
    ("two_stage-lora-checkpointing", {"method": "two_stage", "stage2_mode": "lora", "gradient_checkpointing": True}),
]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))[:5]
    return [name for name in before if not torch.equal(before[name], after[name])]


def under_adapter(name: str, after: dict[str, torch.Tensor]) -> str:
    """The key a base weight has once a LoRA adapter wraps its layer."""
    if name in after:
        return name
    return name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")


@dataclass
class StageRecord:
    name: str
    steps: int
    autocast: set[tuple[bool, torch.dtype]] = field(default_factory=set)
    scaler: bool = False


class StageWatch:
    """Checks each stage of a ``train()`` call (see the module's docstring); ``records`` tells what ran."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.records: list[StageRecord] = []
        self._run_stage: Callable = trainer.run_stage
        self._loss: Callable = trainer.diffusion_loss

    def install(self, monkeypatch: pytest.MonkeyPatch) -> StageWatch:
        monkeypatch.setattr(trainer, "run_stage", self.run_stage)
        monkeypatch.setattr(trainer, "diffusion_loss", self.diffusion_loss)
        return self

    def diffusion_loss(self, *args, **kwargs) -> torch.Tensor:
        state = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))
        self.records[-1].autocast.add(state)
        return self._loss(*args, **kwargs)

    def run_stage(self, stage: StagePlan, ctx: trainer.StageContext) -> trainer.StageSummary:
        comps = ctx.components
        self.records.append(StageRecord(stage.name, stage.steps, scaler=ctx.accelerator.scaler is not None))
        before = {part: snapshot(getattr(comps, part)) for part in ("text_encoder", "vae", "unet")}
        summary = self._run_stage(stage, ctx)
        after = {part: snapshot(getattr(comps, part)) for part in ("text_encoder", "vae", "unet")}
        check_stage(stage, ctx.trigger_id, before, after)
        del before, after
        return summary

    def assert_ran(self, mixed_precision: str) -> None:
        """Every loss of every stage ran under the autocast of ``mixed_precision``; fp16 with a loss scaler."""
        expected = {(True, AUTOCAST_DTYPES[mixed_precision])}
        assert self.records, "no stage ran"
        for record in self.records:
            assert record.autocast == expected, f"{record.name}: losses ran under {record.autocast}"
            assert record.scaler == (mixed_precision == "fp16"), f"{record.name}: loss scaler {record.scaler}"


def check_stage(stage: StagePlan, trigger_id: int | None, before: dict[str, dict[str, torch.Tensor]],
                after: dict[str, dict[str, torch.Tensor]]) -> None:
    """What ``stage`` does not train is bit-identical after it; what it trains moved."""
    where = f"{stage.name}:"
    assert not changed(before["vae"], after["vae"]), f"{where} the VAE moved"
    text_moved = changed(before["text_encoder"], after["text_encoder"])
    if stage.trainable == "embedding":
        assert not changed(before["unet"], after["unet"]), f"{where} the U-Net moved"
        [table] = [name for name in after["text_encoder"] if name.endswith("token_embedding.weight")]
        assert text_moved == [table], f"{where} text encoder weights besides the embedding table moved: {text_moved}"
        rows = ~torch.all(after["text_encoder"][table] == before["text_encoder"][table], dim=1)
        assert rows.nonzero().flatten().tolist() == [trigger_id], f"{where} rows other than the trigger's moved"
        return
    if stage.train_text_encoder:
        assert text_moved, f"{where} the text encoder was to train and did not move"
    else:
        assert not text_moved, f"{where} the frozen text encoder moved: {text_moved[:3]}"
    if stage.trainable == "unet_full":
        assert changed(before["unet"], after["unet"]), f"{where} the U-Net did not move"
        return
    lora = [name for name in after["unet"] if "lora_B" in name]
    assert lora, f"{where} no LoRA layers"
    assert any(after["unet"][name].abs().sum() > 0 for name in lora), f"{where} the LoRA layers did not move"
    moved_base = [name for name in before["unet"]
                  if not torch.equal(before["unet"][name], after["unet"][under_adapter(name, after["unet"])])]
    assert not moved_base, f"{where} base U-Net weights under the adapter moved: {moved_base[:3]}"


def assert_drawn(image: Image.Image, what: str) -> None:
    """Not black, not flat: a NaN anywhere in the decode is written as 0 (black) by diffusers' uint8 cast."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.max() > 8 and pixels.std() > 2, f"{what}: a black or flat image (max {pixels.max()}, " \
                                                  f"std {pixels.std():.2f})"


def assert_finite_losses(events: list, total_steps: int) -> None:
    losses = [event.loss for event in events if event.loss is not None]
    assert len(losses) == total_steps, (len(losses), total_steps)
    assert all(math.isfinite(loss) for loss in losses), losses


def check_artifact(folder: Path, base: str, generator: Generator, resolution: int, steps: int = 3) -> None:
    """The run's samples are drawn; the folder loads with plain diffusers loaders into ``generator``'s pipeline (its
    device and dtype) and draws the personalized and the base image for the instance prompt."""
    samples = sorted((folder / "samples").glob("*.png"))
    assert samples, "no samples written"
    for path in samples:
        assert_drawn(Image.open(path), f"sample {path.name}")
    info = generator.apply(folder, base_model=base)
    request = GenerationRequest(prompt=info.instance_prompt, steps=steps, resolution=resolution, num_images=1)
    assert_drawn(generator.generate(request)[0], f"personalized image in {generator.dtype}")
    assert_drawn(generator.generate(request, personalized=False)[0], f"base image in {generator.dtype}")
    pipeline = generator.pipeline
    assert pipeline is not None and pipeline.unet.dtype == generator.dtype and pipeline.vae.dtype == generator.dtype
    generator.remove_artifact()


class CpuFp16Accelerator(Accelerator):
    """accelerate runs fp16 only on accelerators: with ``cpu=True`` it silently trains in fp32, no autocast, no
    scaler. torch itself has fp16 autocast and a loss scaler on the CPU, so this switches them on: the code path a
    T4 runs (fp16 autocast, scaled backward, unscale before clipping, skipped steps on overflow), on a CPU."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.mixed_precision == "fp16" and self.device.type == "cpu":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu")
