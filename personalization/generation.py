"""Generation: one cached base pipeline, personalized by applying an artifact folder with plain diffusers loaders.

Applying an artifact uses exactly the calls a user of the Hub repo makes (``load_textual_inversion(dir)``, or for
SDXL one call per text encoder; ``load_lora_weights(dir)``, the ``unet/`` swap), so what the app shows is what people
get. Swapping artifacts unloads the previous parts instead of reloading the base. The base's family (SD-1.5 or SDXL,
:mod:`personalization.families`) picks the pipeline class.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

from . import artifacts
from .artifacts import ArtifactError, ArtifactInfo
from .config import GENERATION_DEFAULTS
from .device import default_base_model, resolve_base_model_path
from .families import detect_family
from .tokens import strip_trigger


@dataclass
class GenerationRequest:
    """One generation call; the defaults and limits are :data:`~personalization.config.GENERATION_DEFAULTS`."""

    prompt: str
    negative_prompt: str = GENERATION_DEFAULTS.negative_prompt
    seed: int = GENERATION_DEFAULTS.seed
    steps: int = GENERATION_DEFAULTS.steps
    guidance_scale: float = GENERATION_DEFAULTS.guidance_scale
    lora_scale: float = GENERATION_DEFAULTS.lora_scale
    num_images: int = GENERATION_DEFAULTS.num_images
    resolution: int | None = None

    def validate(self) -> GenerationRequest:
        limits = GENERATION_DEFAULTS
        if not self.prompt or not self.prompt.strip():
            raise ValueError("prompt is empty")
        if not 1 <= self.steps <= limits.max_steps:
            raise ValueError(f"steps must be between 1 and {limits.max_steps}, got {self.steps}")
        if not 0 <= self.guidance_scale <= limits.max_guidance_scale:
            raise ValueError(f"guidance_scale must be between 0 and {limits.max_guidance_scale:g}, "
                             f"got {self.guidance_scale}")
        if not 0 <= self.lora_scale <= limits.max_lora_scale:
            raise ValueError(f"lora_scale must be between 0 and {limits.max_lora_scale:g}, got {self.lora_scale}")
        if not 1 <= self.num_images <= limits.max_num_images:
            raise ValueError(f"num_images must be between 1 and {limits.max_num_images}, got {self.num_images}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2^63, got {self.seed}")
        return self


def generation_placement() -> tuple[torch.device, torch.dtype]:
    """fp16 on GPUs (inference needs no master weights), fp32 on CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def load_base_pipeline(base_model: str, device: torch.device, dtype: torch.dtype,
                       fp16_fix_vae: bool = False) -> DiffusionPipeline:
    """The base model's own pipeline class (its family's). SDXL's VAE overflows in fp16: diffusers decodes with it
    upcast to fp32 (its config's force_upcast); ``fp16_fix_vae`` swaps in a VAE that stays finite in fp16 instead."""
    path = resolve_base_model_path(base_model)
    family = detect_family(path)
    options = dict(family.pipeline_options)
    if fp16_fix_vae and family.fp16_fix_vae:
        options["vae"] = AutoencoderKL.from_pretrained(family.fp16_fix_vae, dtype=dtype)
    pipeline = family.pipeline_type.from_pretrained(path, dtype=dtype, **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


class Generator:
    """Keeps one base pipeline in memory and applies at most one artifact to it at a time. Thread-safe."""

    def __init__(self, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 fp16_fix_vae: bool = False) -> None:
        default_device, default_dtype = generation_placement()
        self.device = device or default_device
        self.dtype = dtype or default_dtype
        self.fp16_fix_vae = fp16_fix_vae  # SDXL bases: the fp16-safe VAE (see load_base_pipeline)
        self.base_model: str | None = None
        self.pipeline: DiffusionPipeline | None = None
        self.applied: ArtifactInfo | None = None
        self._applied_identity: tuple[Path, int] | None = None
        self._base_unet: UNet2DConditionModel | None = None
        self._base_text_encoder: CLIPTextModel | None = None
        self._lock = threading.RLock()
        self.base_loads = 0

    # ---- the base ------------------------------------------------------------------------------------------------
    def use_base(self, base_model: str | None = None) -> DiffusionPipeline:
        """The pipeline for ``base_model`` (default: the machine's default), loading it only if it changed."""
        base_model = base_model or default_base_model()
        with self._lock:
            if self.pipeline is None or base_model != self.base_model:
                self.remove_artifact()
                self.pipeline = None  # free the old base before loading the new one
                self.pipeline = load_base_pipeline(base_model, self.device, self.dtype, self.fp16_fix_vae)
                self.base_model = base_model
                self.base_loads += 1
            return self.pipeline

    # ---- artifacts ---------------------------------------------------------------------------------------------------
    def apply(self, folder: Path | str, base_model: str | None = None) -> ArtifactInfo:
        """Personalize with an artifact folder; ``base_model`` overrides the one recorded (needed for local bases)."""
        info = artifacts.read_artifact(folder)
        base = base_model or info.base_model
        if not base or base.startswith("local:"):
            raise ArtifactError(
                f"{Path(folder).name} was trained on a local base model ({info.base_model or 'unknown'}); "
                "give that base model's folder"
            )
        with self._lock:
            if self.applied is not None and self._applied_identity == _identity(info.folder) \
                    and self.base_model == base:
                return self.applied  # already applied: generating again must not reload anything
            pipeline = self.use_base(base)
            self.remove_artifact()
            try:
                if info.has_unet:
                    self._base_unet = pipeline.unet
                    pipeline.unet = UNet2DConditionModel.from_pretrained(
                        info.folder, subfolder=artifacts.UNET_DIR, dtype=self.dtype).to(self.device)
                if info.has_text_encoder:
                    self._base_text_encoder = pipeline.text_encoder
                    pipeline.text_encoder = CLIPTextModel.from_pretrained(
                        info.folder, subfolder=artifacts.TEXT_ENCODER_DIR, dtype=self.dtype).to(self.device)
                self.applied, self._applied_identity = info, _identity(info.folder)
                if info.has_embeddings:
                    load_embeddings(pipeline, info)
                if info.has_lora:
                    pipeline.load_lora_weights(str(info.folder))
            except Exception:
                self.remove_artifact()
                raise
            return info

    def remove_artifact(self) -> None:
        """Back to the plain base model, without reloading it."""
        with self._lock:
            pipeline, info = self.pipeline, self.applied
            if pipeline is None:
                return
            if info is not None and info.has_lora:
                pipeline.unload_lora_weights()
            if info is not None and info.has_embeddings:
                for tokenizer, encoder in _text_sides(pipeline, info):
                    if info.trigger_token in tokenizer.get_vocab():  # a failed apply may have loaded one side only
                        pipeline.unload_textual_inversion(info.trigger_token, tokenizer=tokenizer,
                                                          text_encoder=encoder)
            if self._base_unet is not None:
                pipeline.unet = self._base_unet
                self._base_unet = None
            if self._base_text_encoder is not None:
                pipeline.text_encoder = self._base_text_encoder
                self._base_text_encoder = None
            self.applied = None

    # ---- images ------------------------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, personalized: bool = True) -> list[Image.Image]:
        """Images for ``request``; ``personalized=False`` renders the same seed with the plain base model, with the
        trigger taken out of the prompt (the base model has never seen it)."""
        request.validate()
        with self._lock:
            pipeline = self.pipeline if self.pipeline is not None else self.use_base()
            info = self.applied
            prompt = request.prompt
            if info is not None and not personalized and info.has_embeddings:
                prompt = strip_trigger(prompt, info.trigger_token)
            kwargs = {}
            if request.resolution:
                kwargs = {"height": request.resolution, "width": request.resolution}
            if info is not None and info.has_lora and personalized:
                kwargs["cross_attention_kwargs"] = {"scale": request.lora_scale}
            with _base_view(self, pipeline, enabled=info is not None and not personalized):
                generator = torch.Generator("cpu").manual_seed(request.seed)
                return pipeline(
                    prompt, negative_prompt=request.negative_prompt or None,
                    num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                    num_images_per_prompt=request.num_images, generator=generator, **kwargs,
                ).images


def load_embeddings(pipeline: DiffusionPipeline, info: ArtifactInfo) -> None:
    """The learned trigger, loaded as the card's snippet loads it: ``load_textual_inversion(dir)``, or for SDXL one
    call per text encoder with its tensor of the two-key file."""
    if not info.has_sdxl_embeddings:
        pipeline.load_textual_inversion(str(info.folder))
        return
    tensors = load_file(str(info.folder / artifacts.SDXL_EMBEDDINGS_FILE))
    for key, (tokenizer, encoder) in zip(artifacts.SDXL_EMBEDDING_KEYS, _text_sides(pipeline, info), strict=True):
        pipeline.load_textual_inversion(tensors[key], token=info.trigger_token, text_encoder=encoder,
                                        tokenizer=tokenizer)


def _text_sides(pipeline: DiffusionPipeline, info: ArtifactInfo) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) pairs that hold the artifact's trigger: both of SDXL's, or the one."""
    pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
    if info.has_sdxl_embeddings:
        pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    return pairs


class _base_view:
    """Temporarily shows the base model: LoRA disabled, base U-Net / text encoder swapped back in."""

    def __init__(self, owner: Generator, pipeline: DiffusionPipeline, enabled: bool) -> None:
        self.owner, self.pipeline, self.enabled = owner, pipeline, enabled
        self.swapped: dict[str, torch.nn.Module] = {}

    def __enter__(self) -> None:
        if not self.enabled:
            return
        info = self.owner.applied
        if info is not None and info.has_lora:
            self.pipeline.disable_lora()
        if self.owner._base_unet is not None:
            self.swapped["unet"] = self.pipeline.unet
            self.pipeline.unet = self.owner._base_unet
        if self.owner._base_text_encoder is not None:
            self.swapped["text_encoder"] = self.pipeline.text_encoder
            self.pipeline.text_encoder = self.owner._base_text_encoder

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        for name, module in self.swapped.items():
            setattr(self.pipeline, name, module)
        info = self.owner.applied
        if info is not None and info.has_lora:
            self.pipeline.enable_lora()


def _identity(folder: Path) -> tuple[Path, int]:
    """A folder as it is now: picking another checkpoint replaces the folder (a new inode at the same path), and
    must not be answered with the weights applied before."""
    resolved = folder.resolve()
    return resolved, resolved.stat().st_ino
