"""Where and in which precision to run: chosen from the hardware unless the config says otherwise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

# BUNDLED_MINI_MODEL is defined with the config that records it; used and re-exported here.
from .config import BUNDLED_MINI_MODEL, mini_world_info
from .families import SD15, Family

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
    if not base_model.strip():
        raise ValueError("no base model given: name a Hub id or a diffusers folder")
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
    if base_model.startswith("~"):  # from_pretrained does not expand it (no Hub id starts with "~")
        return str(Path(base_model).expanduser())
    return base_model


def is_bundled_mini_model(base_model: str) -> bool:
    """The bundled model by name, or a folder holding the same export (the bundled folder by any path, or a copy):
    the export's training info (step, export time) identifies it without hashing the weights."""
    if base_model == BUNDLED_MINI_MODEL:
        return True
    info = mini_world_info(base_model)
    return info is not None and info == mini_world_info(str(MINI_MODEL_DIR))


def portable_base_model(base_model: str) -> str:
    """How a base model is recorded in configs and cards: Hub ids as they are, local folders by name only.

    The bundled model given by path is recorded by its bundled name: that loads on any machine with the engine,
    where ``local:mini_model`` would make every user pass the folder again.
    """
    if not base_model:
        return base_model  # no model named: recording the current folder's name would invent one
    if base_model.startswith("local:"):  # already portable; a full path after the prefix is cut to its name
        return f"local:{Path(base_model.removeprefix('local:')).name}"
    if is_bundled_mini_model(base_model):
        return BUNDLED_MINI_MODEL
    if base_model in RENAMED_MODELS:
        return RENAMED_MODELS[base_model]
    path = Path(base_model).expanduser()
    if path.is_absolute() or base_model.startswith((".", "~")) or (path.exists() and path.is_dir()):
        return f"local:{path.resolve().name}"
    return base_model


# Peak training memory per family (families.MemoryFacts: SD-1.5 measured on an H200, SDXL estimated until measured);
# other bases of a family are scaled by their U-Net's parameter count. The T4 and 8 GB plans trained on an H200 capped
# to those cards' memory (tests/gpu/test_memory_plans.py; docs/measurements.md#h200-benchmark-2026-11-27).
SD15_UNET_PARAMETERS = SD15.memory.unet_parameters
# 8-bit Adam keeps 2 bytes of optimizer state per weight instead of 8: of the 16 bytes per trained weight
# (weight, gradient, two moments) 6 go, so the full-U-Net peak shrinks by about 6/16.
EIGHT_BIT_SAVING = 6 / 16
USABLE_FRACTION = 0.9  # the CUDA context and the allocator's fragmentation take the rest


@dataclass(frozen=True)
class MemoryPlan:
    gradient_checkpointing: bool
    use_8bit_adam: bool
    note: str | None = None  # why options were switched on; None when the card has room as configured
    fits: bool = True  # False: even with the options switched on, the step needs more than the card has


def peak_gib(family: Family, unet_parameters: float, *, full_unet: bool, gradient_checkpointing: bool,
             use_8bit_adam: bool) -> float:
    """The training step's peak memory, from the family's figures scaled by the U-Net's parameter count."""
    memory = family.memory
    need = memory.peak_gib["full" if full_unet else "lora", gradient_checkpointing]
    need *= unet_parameters / memory.unet_parameters
    return need * (1 - EIGHT_BIT_SAVING) if full_unet and use_8bit_adam else need


def plan_memory(unet_parameters: int, card_bytes: int | None, *, full_unet: bool, gradient_checkpointing: bool,
                use_8bit_adam: bool, bitsandbytes_available: bool, family: Family = SD15) -> MemoryPlan:
    """Switch on the memory options a card needs for this U-Net; options the user chose are never switched off.

    A T4 (15 GiB usable of 16) cannot hold the 17 GiB of a full SD-1.5 U-Net step, but can with 8-bit Adam and
    gradient checkpointing; an 8 GB card runs LoRA with checkpointing; a 24 GB card runs an SDXL LoRA with
    checkpointing. Without a card size (CPU) nothing changes.
    """
    asked = MemoryPlan(gradient_checkpointing, use_8bit_adam)
    if card_bytes is None:
        return asked
    usable_gib = card_bytes / 2**30 * USABLE_FRACTION
    need_gib = peak_gib(family, unet_parameters, full_unet=full_unet, gradient_checkpointing=gradient_checkpointing,
                        use_8bit_adam=use_8bit_adam)
    if need_gib <= usable_gib:
        return asked
    switched = []
    if not gradient_checkpointing:
        switched.append("gradient checkpointing")
    eight_bit = use_8bit_adam
    if full_unet and not use_8bit_adam and bitsandbytes_available:
        eight_bit = True
        switched.append("8-bit Adam")
    fits = peak_gib(family, unet_parameters, full_unet=full_unet, gradient_checkpointing=True,
                    use_8bit_adam=eight_bit) <= usable_gib
    if not switched:
        return dataclasses.replace(asked, fits=fits)
    note = (f"this GPU has {card_bytes / 2**30:.0f} GiB and the step needs about {need_gib:.0f} GiB as configured: "
            f"switched on {' and '.join(switched)}")
    return MemoryPlan(True, eight_bit, note, fits)


def memory_refusal(family: Family, card_bytes: int | None, *, full_unet: bool) -> str | None:
    """Why this card cannot train ``family``'s reference U-Net (LoRA or full) even with gradient checkpointing and
    8-bit Adam, in one sentence that says what would fit; None when it can (or on a CPU, where the time is the limit).
    """
    if card_bytes is None:
        return None
    parameters = family.memory.unet_parameters
    plan = plan_memory(int(parameters), card_bytes, full_unet=full_unet, gradient_checkpointing=True,
                       use_8bit_adam=True, bitsandbytes_available=True, family=family)
    if plan.fits:
        return None
    need = peak_gib(family, parameters, full_unet=full_unet, gradient_checkpointing=True, use_8bit_adam=True)
    what = "a full U-Net" if full_unet else "a LoRA"
    card_gib = card_bytes / 2**30
    if full_unet and memory_refusal(family, card_bytes, full_unet=False) is None:
        instead = f"a {family.label} LoRA fits this GPU"
    else:
        instead = "Stable Diffusion 1.5 fits this GPU"
    return (f"{family.label} with {what} needs about {need:.0f} GiB with gradient checkpointing and 8-bit Adam and "
            f"this GPU has {card_gib:.0f} GiB: {instead}.")


def gpu_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the card ``device`` is on; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory
