"""Where and in which precision to run: chosen from the hardware unless the config says otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import BUNDLED_MINI_MODEL  # defined with the config that records it; used and re-exported here

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MINI_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "mini_model"


@dataclass(frozen=True)
class Placement:
    device: torch.device
    mixed_precision: str  # accelerate's name: "no", "fp16", "bf16"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of frozen weights and of autocast: what actually runs the matmuls."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    def describe(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return f"{name} ({self.mixed_precision})"
        return f"CPU ({torch.get_num_threads()} threads, fp32)"


def choose_placement(mixed_precision: str = "auto", device: str | None = None) -> Placement:
    """bf16 on GPUs that support it, fp16 (with loss scaling) on older GPUs such as the T4, fp32 on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type != "cuda":
        return Placement(target, "no")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Placement(target, mixed_precision)


def default_base_model() -> str:
    """SD-1.5 where there is a GPU to train it; the bundled mini model everywhere else."""
    return SD15_HUB_ID if torch.cuda.is_available() else BUNDLED_MINI_MODEL


# Ids that moved: the old SD-1.5 repo was deleted and lives on under a new owner.
RENAMED_MODELS = {"runwayml/stable-diffusion-v1-5": SD15_HUB_ID}


def resolve_base_model_path(base_model: str) -> str:
    """A path or Hub id ``from_pretrained`` accepts; the bundled model's symbolic name maps to its folder."""
    if base_model.startswith("local:"):
        raise FileNotFoundError(
            f"this was trained on a local base model ({base_model.removeprefix('local:')}); "
            "give its folder as the base model (--base-model FOLDER)"
        )
    base_model = RENAMED_MODELS.get(base_model, base_model)
    if base_model == BUNDLED_MINI_MODEL:
        if not (MINI_MODEL_DIR / "model_index.json").is_file():
            raise FileNotFoundError(f"the bundled mini model is missing from {MINI_MODEL_DIR}")
        return str(MINI_MODEL_DIR)
    return base_model


def portable_base_model(base_model: str) -> str:
    """How a base model is recorded in configs and cards: Hub ids as they are, local folders by name only."""
    if base_model == BUNDLED_MINI_MODEL:
        return base_model
    if base_model in RENAMED_MODELS:
        return RENAMED_MODELS[base_model]
    path = Path(base_model).expanduser()
    if path.is_absolute() or base_model.startswith((".", "~")) or (path.exists() and path.is_dir()):
        return f"local:{path.resolve().name}"
    return base_model
