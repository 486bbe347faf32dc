"""Model families: what differs between an SD-1.5-like base and an SDXL-like one, and nothing else.

A base model's family is read from its ``model_index.json`` (the pipeline's ``_class_name``), never guessed from its
name. Each :class:`Family` owns what differs: the pipeline class, the text side (SDXL: two tokenizers and encoders,
the pooled embedding of the second, and the ``add_time_ids`` micro-conditioning), the VAE's precision, the memory
plan's figures and the step cost. The trainer, the generator and the model card ask the family; none of them tests a
family's name. The native resolution is not here: it is read from the base model's configs as for any base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import artifacts

SD15_KEY = "sd15"
SDXL_KEY = "sdxl"
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
# SDXL's own VAE overflows in fp16 (NaN images); diffusers upcasts it to fp32 for decoding (its config's
# force_upcast). This re-trained VAE stays finite in fp16: faster decoding, and an option, not the default.
SDXL_FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"


class FamilyError(ValueError):
    """The base model is not a pipeline this engine trains."""


@dataclass(frozen=True)
class MemoryFacts:
    """The memory plan's input for one family (used by :func:`personalization.device.plan_memory`).

    ``peak_gib``: peak training memory of the reference U-Net (``unet_parameters``) at the family's native resolution
    and batch 1-4 with AdamW, keyed by (stage-2 mode, gradient checkpointing). Other U-Nets of the family are scaled by
    their parameter count.
    """

    unet_parameters: float
    peak_gib: dict[tuple[str, bool], float]


@dataclass(frozen=True)
class Family:
    """What one model family does differently. ``encoders``: (tokenizer folder, encoder folder, transformers class)
    per text encoder, in the pipeline's order. ``embedding_keys``: the keys of the learned-embedding file, one per
    encoder (empty: the one-key file named by the trigger). ``step_cost``: a training step's cost relative to
    SD-1.5's at the same pixel count (the time estimate scales by pixels on top)."""

    key: str
    label: str
    pipeline_class: str
    encoders: tuple[tuple[str, str, str], ...]
    embedding_keys: tuple[str, ...]
    hub_tags: tuple[str, ...]
    memory: MemoryFacts
    step_cost: float
    time_conditioning: bool = False  # the U-Net takes text_embeds + time_ids (addition_embed_type="text_time")
    # A VAE that stays finite in fp16 where the family's own does not (None: the base's VAE is fine in fp16).
    fp16_fix_vae: str | None = None
    # Keyword arguments of the pipeline class besides the modules, for pipelines built or loaded without a safety
    # checker (SD-1.5's would blank a sample it dislikes; SDXL has none).
    pipeline_options: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline_type(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    @staticmethod
    def encoder_type(class_name: str) -> type:
        import transformers

        return getattr(transformers, class_name)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether DreamBooth may train the text encoder: only with one encoder (see :func:`check_options`)."""
        return len(self.encoders) == 1


# SD-1.5 (U-Net 859.5 M parameters) at 512 px, batch 4, bf16 autocast over fp32 masters, on an H200. LoRA r16: 9.97
# GiB (benchmarks/results/speed-sd15-random-a-2026-11-27-h200.json) and 6.52 GiB with gradient checkpointing (the 8 GB
# plan's run, benchmarks/results/gpu-memory-plans-2026-11-27-h200.json), both this repository's benchmarks.
# Full U-Net with AdamW: 17.0 GiB with or without checkpointing, a team measurement
# (docs/measurements.md#peak-training-memory); the T4 plan built on it (8-bit Adam and checkpointing) trained under a
# 14.2 GiB cap in the same session.
SD15 = Family(
    key=SD15_KEY, label="Stable Diffusion 1.x/2.x", pipeline_class="StableDiffusionPipeline",
    encoders=(("tokenizer", "text_encoder", "CLIPTextModel"),), embedding_keys=(),
    hub_tags=("stable-diffusion",),
    memory=MemoryFacts(859.5e6, {("full", False): 17.0, ("full", True): 17.0, ("lora", False): 9.97,
                                 ("lora", True): 6.52}),
    step_cost=1.0,
    pipeline_options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
)
# SDXL (U-Net 2567 M parameters) at 1024 px, batch 1: ESTIMATES until benchmarks/speed.py --model sdxl-random runs
# on a GPU. Resident fp32 weights: U-Net 9.6 GiB, both text encoders 3.0, VAE 0.3; a full U-Net adds its gradient
# (9.6) and AdamW's moments (19.1); 1024 px activations are ~12 GiB without checkpointing, ~3 with it.
SDXL = Family(
    key=SDXL_KEY, label="Stable Diffusion XL", pipeline_class="StableDiffusionXLPipeline",
    encoders=(("tokenizer", "text_encoder", "CLIPTextModel"),
              ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection")),
    embedding_keys=artifacts.SDXL_EMBEDDING_KEYS,
    hub_tags=("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
    memory=MemoryFacts(2567e6, {("full", False): 56.0, ("full", True): 46.0, ("lora", False): 28.0,
                                ("lora", True): 18.0}),
    # SDXL's U-Net at 1024 px costs ~7x SD-1.5's at 512 px in FLOPs; 4x of that is the pixels.
    step_cost=1.8,
    time_conditioning=True,
    fp16_fix_vae=SDXL_FP16_FIX_VAE,
)
# The pipelines each family trains, as model_index.json names them.
PIPELINE_CLASSES = {"StableDiffusionPipeline": SD15, "StableDiffusionXLPipeline": SDXL}


def family_by_key(key: str | None) -> Family:
    """The family a saved summary names (``SD15`` for summaries written before families were recorded)."""
    return next((family for family in PIPELINE_CLASSES.values() if family.key == key), SD15)


def family_of_index(index: dict) -> Family:
    """The family of a pipeline from its ``model_index.json`` contents."""
    class_name = str(index.get("_class_name") or "")
    if class_name in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[class_name]
    known = ", ".join(PIPELINE_CLASSES)
    raise FamilyError(f"the base model is a {class_name or 'pipeline without _class_name'}; this engine trains "
                      f"{known} bases")


def detect_family(base_model_path: str) -> Family:
    """The family of the base model at ``base_model_path`` (a folder or Hub id), from its model_index.json only."""
    from diffusers import DiffusionPipeline

    return family_of_index(DiffusionPipeline.load_config(base_model_path))


# ---- the text side -------------------------------------------------------------------------------------------------
@dataclass
class Conditioning:
    """What the U-Net is conditioned on: the text's hidden states and, for SDXL, the pooled text embedding and the
    micro-conditioning time ids (``added_cond_kwargs``). Rows are prompts."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __getitem__(self, index: torch.Tensor) -> Conditioning:
        return Conditioning(self.encoder_hidden_states[index],
                            None if self.added_cond_kwargs is None else
                            {name: value[index] for name, value in self.added_cond_kwargs.items()})

    def expand(self, size: int) -> Conditioning:
        """The one-prompt conditioning repeated ``size`` times (a view, as Tensor.expand)."""
        def grown(value: torch.Tensor) -> torch.Tensor:
            return value.expand(size, *value.shape[1:])

        return Conditioning(grown(self.encoder_hidden_states),
                            None if self.added_cond_kwargs is None else
                            {name: grown(value) for name, value in self.added_cond_kwargs.items()})


def prompt_ids(tokenizers: Sequence, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Token ids, padded to each tokenizer's length: [prompts, 77] with one tokenizer, [prompts, tokenizers, 77] with
    several, so one index picks the same prompts for every encoder."""
    ids = [tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids for tokenizer in tokenizers]
    stacked = ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)
    return stacked.to(device)


def encode(family: Family, encoders: Sequence[torch.nn.Module], ids: torch.Tensor, resolution: int) -> Conditioning:
    """The U-Net's conditioning for ``ids`` (from :func:`prompt_ids`), as the family's pipeline computes it."""
    if not family.time_conditioning:
        return Conditioning(encoders[0](ids)[0])
    # As StableDiffusionXLPipeline.encode_prompt: the penultimate hidden states of both encoders side by side, and
    # the pooled, projected embedding of the second.
    hidden, pooled = [], None
    for index, encoder in enumerate(encoders):
        output = encoder(ids[:, index], output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]
    return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled,
                                                    "time_ids": time_ids(resolution, len(ids), pooled)})


def time_ids(resolution: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop top-left, target size. Training images are the whole photo
    resized to ``resolution`` (center-cropped to a square, no random crop), which is what a user's generation at
    that size asks for by default: (resolution, resolution, 0, 0, resolution, resolution)."""
    values = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=like.dtype,
                          device=like.device)
    return values.expand(rows, -1)


def check_options(family: Family, train_text_encoder: bool) -> None:
    """Refuse what the engine does not do on this family, before the model loads."""
    if train_text_encoder and not family.trains_text_encoder:
        raise FamilyError(f"train_text_encoder is not available on {family.label} bases (two text encoders); "
                          "DreamBooth there trains the U-Net with both text encoders frozen")
