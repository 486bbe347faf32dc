"""The one training loop. Recipes (:mod:`personalization.recipes`) say what each stage trains; this module runs them.

Read top to bottom: load the base model, add the trigger, cache what never changes (VAE latents of the subject
images and their flips, prompt conditionings when the text side is frozen, class images for prior preservation),
run the stages, then write the artifact folder in one atomic rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from . import artifacts
from .config import TrainingConfig
from .device import (
    Placement,
    choose_placement,
    default_base_model,
    gpu_memory_bytes,
    plan_memory,
    portable_base_model,
    resolve_base_model_path,
)
from .images import SubjectImages, list_image_files, load_subject_images, to_tensor_batch
from .progress import CancelFlag, ProgressCallback, ProgressEvent
from .recipes import Recipe, StagePlan, recipe_for
from .tokens import TriggerError, add_trigger_token, check_trigger

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Components:
    """The parts of a Stable-Diffusion pipeline that training touches."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sampling_scheduler: SchedulerMixin

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass
class StageSummary:
    name: str
    steps: int
    seconds: float
    final_loss: float | None
    mean_step_ms: float


@dataclass
class TrainingResult:
    output_dir: Path
    config: TrainingConfig
    stages: list[StageSummary]
    seconds_total: float
    seconds_training: float
    hardware: str
    sample_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def default_resolution(base_model_path: str) -> int:
    """The base model's native resolution, read from its configs (no weights are loaded)."""
    unet_config = UNet2DConditionModel.load_config(base_model_path, subfolder="unet")
    vae_config = AutoencoderKL.load_config(base_model_path, subfolder="vae")
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def load_components(base_model_path: str, placement: Placement, *,
                    tokenizer: CLIPTokenizer | None = None) -> Components:
    """Load the base model's parts in fp32 (master weights; autocast does the low-precision compute).

    ``tokenizer``: one already read from this base (the early trigger check's), so it is not read twice.
    """
    if tokenizer is None:
        tokenizer = CLIPTokenizer.from_pretrained(base_model_path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base_model_path, subfolder="text_encoder", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(base_model_path, subfolder="vae", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(base_model_path, subfolder="unet", dtype=torch.float32)
    noise_scheduler = DDPMScheduler.from_pretrained(base_model_path, subfolder="scheduler")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.to(placement.device)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, load_sampling_scheduler(base_model_path))


def load_sampling_scheduler(base_model_path: str) -> SchedulerMixin:
    """The sampler the base pipeline ships with, so samples look like what plain diffusers users will get."""
    index = StableDiffusionPipeline.load_config(base_model_path)
    _library, class_name = index.get("scheduler", ["diffusers", "DDIMScheduler"])
    scheduler_class = getattr(diffusers, class_name, DDIMScheduler)
    return scheduler_class.from_pretrained(base_model_path, subfolder="scheduler")


def eager_sampling() -> contextlib.AbstractContextManager:
    """Previews and samples skip compiled blocks: an inference graph would be a second warm-up for a few images."""
    return torch.compiler.set_stance("force_eager")


def sampling_pipeline(components: Components) -> StableDiffusionPipeline:
    """A pipeline around the in-memory modules (no copy), with the base model's own sampler."""
    scheduler = components.sampling_scheduler.__class__.from_config(components.sampling_scheduler.config)
    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---- caches --------------------------------------------------------------------------------------------------------
@dataclass
class LatentCache:
    """VAE posterior of each training image (mean and std), sampled afresh each step like the uncached recipe."""

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device, mean.dtype)
        return mean + std * noise


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: Sequence[Image.Image], device: torch.device) -> LatentCache:
    pixels = torch.from_numpy(to_tensor_batch(images)).to(device)
    means, stds = [], []
    for chunk in pixels.split(8):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    scale = vae.config.scaling_factor
    return LatentCache(torch.cat(means) * scale, torch.cat(stds) * scale)


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def class_image_cache_dir(base_model: str, class_prompt: str, count: int, resolution: int, seed: int) -> Path:
    key = json.dumps([base_model, class_prompt, count, resolution, seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("PERSONALIZATION_CACHE", Path.home() / ".cache" / "personalization"))
    return root / "class_images" / digest


def generate_class_images(
    components: Components, config: TrainingConfig, base_model: str, resolution: int, cancel: CancelFlag,
    report: ProgressCallback | None, started: float,
) -> list[Image.Image]:
    """Prior-preservation images from the untouched base model, cached on disk so a second run reuses them."""
    folder = class_image_cache_dir(base_model, config.class_prompt, config.class_images, resolution, config.seed)
    artifacts.clean_stale_staging(folder.parent)  # a run killed while writing the cache leaves hidden staging folders
    existing = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if len(existing) >= config.class_images:
        return [Image.open(path).convert("RGB") for path in existing[: config.class_images]]
    pipeline = sampling_pipeline(components)
    images: list[Image.Image] = []
    generator = torch.Generator("cpu").manual_seed(config.seed)
    batch = 4
    while len(images) < config.class_images:
        cancel.raise_if_cancelled()
        count = min(batch, config.class_images - len(images))
        images += pipeline(
            [config.class_prompt] * count, height=resolution, width=resolution, num_inference_steps=config.sample_steps,
            guidance_scale=config.guidance_scale, generator=generator,
        ).images
        if report:
            report(ProgressEvent("class images", 0, 0, len(images), config.class_images, None,
                                 time.perf_counter() - started, None, "generating prior-preservation images"))
    # Staged like an artifact: readers never see a half-written cache, and a kill leaves only names the next run clears.
    with artifacts.staged_replace(folder) as staging:
        for index, image in enumerate(images):
            image.save(staging / f"{index:04d}.png")
    return images


# ---- the loss --------------------------------------------------------------------------------------------------
def diffusion_loss(
    unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor, conditioning: torch.Tensor,
    generator: torch.Generator, snr_gamma: float | None,
) -> torch.Tensor:
    """Per-sample denoising loss (epsilon or v target, as the base model was trained), min-SNR weighted."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device="cpu").to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, conditioning).sample.float()
    prediction_type = scheduler.config.prediction_type
    target = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        alphas = scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
        snr = alphas / (1.0 - alphas).clamp(min=1e-8)
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        weights = clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr.clamp(min=1e-8)
        per_sample = per_sample * weights
    return per_sample.mean()


# ---- one stage ---------------------------------------------------------------------------------------------------
class TriggerEmbedding(torch.nn.Module):
    """The embedding table with the trigger's row read from a separate trainable vector.

    Only that vector is given to the optimizer, so every other row stays bit-identical by construction (with a
    trainable table, AdamW's decoupled weight decay would shrink rows that get no gradient), and the optimizer
    updates `hidden` numbers per step instead of the whole 49,408-row table.
    """

    def __init__(self, table: torch.nn.Embedding, token_id: int) -> None:
        super().__init__()
        self.table = table
        self.token_id = token_id
        self.vector = torch.nn.Parameter(table.weight[token_id].detach().clone())

    @property
    def weight(self) -> torch.Tensor:  # transformers reads `.weight` of the input embeddings in places
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.table(input_ids)
        is_trigger = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(is_trigger, self.vector.to(embedded.dtype), embedded)

    @torch.no_grad()
    def write_back(self) -> torch.nn.Embedding:
        """Copy the learned vector into the table and return the plain table."""
        self.table.weight[self.token_id] = self.vector.to(self.table.weight.dtype)
        return self.table


def _make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, config: TrainingConfig,
                    placement: Placement) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes==0.50.2") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    fused = placement.device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _fit_memory(config: TrainingConfig, recipe: Recipe, comps: Components, placement: Placement,
                notes: list[str]) -> TrainingConfig:
    """Switch on gradient checkpointing / 8-bit Adam where the card is too small for the recipe as configured."""
    trains_unet = [stage.trainable for stage in recipe.stages if stage.trainable != "embedding"]
    if not trains_unet:
        return config
    plan = plan_memory(sum(p.numel() for p in comps.unet.parameters()), gpu_memory_bytes(placement.device),
                       full_unet="unet_full" in trains_unet, gradient_checkpointing=config.gradient_checkpointing,
                       use_8bit_adam=config.use_8bit_adam,
                       bitsandbytes_available=importlib.util.find_spec("bitsandbytes") is not None)
    if plan.note is None:
        return config
    notes.append(plan.note)
    return dataclasses.replace(config, gradient_checkpointing=plan.gradient_checkpointing,
                               use_8bit_adam=plan.use_8bit_adam)


def _add_unet_lora(unet: UNet2DConditionModel, config: TrainingConfig) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))


@dataclass
class StageContext:
    components: Components
    config: TrainingConfig
    placement: Placement
    accelerator: Accelerator
    subject_latents: LatentCache
    flip_offset: int | None  # index offset of the flipped copies in subject_latents, None without flips
    class_latents: LatentCache | None
    trigger_id: int | None
    cancel: CancelFlag
    report: ProgressCallback | None
    started: float
    steps_before: int
    total_steps: int
    preview_prompt: str


def run_stage(stage: StagePlan, ctx: StageContext) -> StageSummary:
    """Train one stage: set what is trainable, cache what is constant, then step."""
    comps, config, device = ctx.components, ctx.config, ctx.placement.device
    # Each data-parallel process draws its own images, noise and timesteps, else DDP would average copies.
    process_offset = 1_000_003 * ctx.accelerator.process_index
    generator = torch.Generator("cpu").manual_seed(config.seed + ctx.steps_before + process_offset)
    spliced: TriggerEmbedding | None = None

    # What moves in this stage.
    if stage.trainable == "embedding":
        if ctx.trigger_id is None:
            raise ValueError(f"{stage.name}: no trigger token to train")
        spliced = TriggerEmbedding(comps.text_encoder.get_input_embeddings(), ctx.trigger_id)
        comps.text_encoder.set_input_embeddings(spliced)
        params = [spliced.vector]
    elif stage.trainable == "unet_lora":
        _add_unet_lora(comps.unet, config)
        params = [p for p in comps.unet.parameters() if p.requires_grad]
    else:
        comps.unet.requires_grad_(True)
        params = list(comps.unet.parameters())
    if stage.train_text_encoder:
        comps.text_encoder.requires_grad_(True)
        params += [p for p in comps.text_encoder.parameters() if p.requires_grad]
    if config.gradient_checkpointing and stage.trainable != "embedding":
        comps.unet.enable_gradient_checkpointing()
    if stage.trainable != "embedding":
        comps.unet.train()
    optimizer = _make_optimizer(params, stage.learning_rate, stage.weight_decay, config, ctx.placement)
    optimizer = ctx.accelerator.prepare_optimizer(optimizer)
    # Data-parallel runs (accelerate launch) need the trainable modules wrapped so gradients are averaged; a single
    # process keeps the plain modules, so what is saved is exactly what was trained.
    unet, text_encoder = comps.unet, comps.text_encoder
    if ctx.accelerator.num_processes > 1:
        if stage.trainable != "embedding":
            unet = ctx.accelerator.prepare_model(comps.unet)
        if stage.trainable == "embedding" or stage.train_text_encoder:
            text_encoder = ctx.accelerator.prepare_model(comps.text_encoder)

    # What never changes in this stage.
    prompt_ids = tokenize(comps.tokenizer, stage.prompts, device)
    frozen_conditioning = None
    if stage.text_frozen:
        with torch.no_grad():
            frozen_conditioning = comps.text_encoder(prompt_ids)[0]
    class_conditioning = None
    if stage.prior_preservation and ctx.class_latents is not None:
        class_ids = tokenize(comps.tokenizer, [config.class_prompt], device)
        if stage.text_frozen:
            with torch.no_grad():
                class_conditioning = comps.text_encoder(class_ids)[0]

    image_count = ctx.flip_offset if ctx.flip_offset is not None else len(ctx.subject_latents)
    batch_size = min(config.max_batch_size, image_count)
    order = torch.randperm(image_count, generator=generator)
    cursor = 0
    stage_started = time.perf_counter()
    loss_value: float | None = None
    trainable_modules = [m for m in (comps.unet, comps.text_encoder) if any(p.requires_grad for p in m.parameters())]

    for step in range(1, stage.steps + 1):
        ctx.cancel.raise_if_cancelled()
        if cursor + batch_size > image_count:
            order, cursor = torch.randperm(image_count, generator=generator), 0
        indices = order[cursor: cursor + batch_size]
        cursor += batch_size
        if ctx.flip_offset is not None:
            flips = torch.rand(batch_size, generator=generator) < 0.5
            indices = torch.where(flips, indices + ctx.flip_offset, indices)
        latents = ctx.subject_latents.sample(indices, generator)
        prompt_index = torch.randint(0, len(stage.prompts), (batch_size,), generator=generator)

        with ctx.accelerator.autocast():
            if frozen_conditioning is not None:
                conditioning = frozen_conditioning[prompt_index.to(device)]
            else:
                conditioning = text_encoder(prompt_ids[prompt_index.to(device)])[0]
            loss = diffusion_loss(unet, comps.noise_scheduler, latents, conditioning, generator,
                                  config.snr_gamma)
            if ctx.class_latents is not None and stage.prior_preservation:
                class_index = torch.randint(0, len(ctx.class_latents), (batch_size,), generator=generator)
                class_latents = ctx.class_latents.sample(class_index, generator)
                if class_conditioning is None:
                    class_conditioning_step = text_encoder(class_ids.expand(batch_size, -1))[0]
                else:
                    class_conditioning_step = class_conditioning.expand(batch_size, -1, -1)
                prior = diffusion_loss(unet, comps.noise_scheduler, class_latents, class_conditioning_step,
                                       generator, config.snr_gamma)
                loss = loss + config.prior_loss_weight * prior
        ctx.accelerator.backward(loss)
        if ctx.accelerator.sync_gradients and config.max_grad_norm:
            ctx.accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"{stage.name}: the loss became {loss_value} at step {step}; lower the learning rate "
                f"({stage.learning_rate:g}) or use mixed_precision='no'"
            )

        if ctx.report is not None:
            done = ctx.steps_before + step
            elapsed = time.perf_counter() - ctx.started
            stage_rate = (time.perf_counter() - stage_started) / step
            eta = stage_rate * (ctx.total_steps - done)
            preview = None
            if config.preview_interval and (step % config.preview_interval == 0 or step == stage.steps):
                preview = render_preview(comps, config, ctx.preview_prompt, trainable_modules)
            ctx.report(ProgressEvent(stage.name, done, ctx.total_steps, step, stage.steps, loss_value, elapsed,
                                     eta, preview=preview))

    if spliced is not None:
        comps.text_encoder.set_input_embeddings(spliced.write_back())
    for module in trainable_modules:
        module.requires_grad_(False)
        module.eval()
    if config.gradient_checkpointing and stage.trainable != "embedding":
        comps.unet.disable_gradient_checkpointing()
    seconds = time.perf_counter() - stage_started
    return StageSummary(stage.name, stage.steps, seconds, loss_value, 1000 * seconds / max(stage.steps, 1))


@torch.no_grad()
def render_preview(comps: Components, config: TrainingConfig, prompt: str,
                   trainable_modules: Sequence[torch.nn.Module]) -> Image.Image:
    """One image with the model as it stands, same seed every time so previews are comparable."""
    was_training = [module.training for module in trainable_modules]
    for module in trainable_modules:
        module.eval()
    resolution = config.resolution or comps.unet.config.sample_size * comps.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(config.seed)
    with eager_sampling():
        image = sampling_pipeline(comps)(prompt, num_inference_steps=config.sample_steps, height=resolution,
                                         width=resolution, guidance_scale=config.guidance_scale,
                                         generator=generator).images[0]
    for module, training in zip(trainable_modules, was_training, strict=True):
        module.train(training)
    return image


# ---- the whole run -----------------------------------------------------------------------------------------------
def train(
    config: TrainingConfig,
    subject_images: SubjectImages | Path | str | Sequence[Path | str],
    output_dir: Path | str,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    overwrite: bool = False,
    placement: Placement | None = None,
) -> TrainingResult:
    """Train ``config.method`` on the subject images and write the artifact folder ``output_dir``.

    Inputs are validated before the model loads; nothing appears at ``output_dir`` unless the run completes.
    """
    from .model_card import write_model_card

    started = time.perf_counter()
    cancel = cancel or CancelFlag()
    # The base model is fixed first: some defaults (the mini world's prompt templates) depend on it.
    config = dataclasses.replace(config, base_model=config.base_model or default_base_model())
    config = config.resolved()
    output_dir = Path(output_dir).resolve()
    artifacts.prepare_output_dir(output_dir, overwrite)
    if not isinstance(subject_images, SubjectImages):
        for image_file in list_image_files(subject_images):  # a missing folder is reported before a model is looked for
            if image_file.resolve().is_relative_to(output_dir):
                raise artifacts.ArtifactError(
                    f"{output_dir}: the subject images are inside the output folder; choose another --out")
    base_model = config.base_model
    base_path = resolve_base_model_path(base_model)
    resolution = config.resolution or default_resolution(base_path)
    if not isinstance(subject_images, SubjectImages):
        subject_images = load_subject_images(subject_images, resolution, center_crop=config.center_crop)
    else:
        subject_images = SubjectImages([im.resize((resolution, resolution), Image.Resampling.LANCZOS)
                                        if im.size != (resolution, resolution) else im
                                        for im in subject_images.images], subject_images.names, subject_images.notes)
    tokenizer = _check_trigger_early(base_path, config)
    config = dataclasses.replace(config, base_model=base_model, resolution=resolution)
    recipe: Recipe = recipe_for(config)

    placement = placement or choose_placement(config.mixed_precision)
    torch.manual_seed(config.seed)
    accelerator = Accelerator(mixed_precision=placement.mixed_precision, cpu=placement.device.type == "cpu")
    if accelerator.num_processes > 1:
        placement = Placement(accelerator.device, placement.mixed_precision)
    comps = load_components(base_path, placement, tokenizer=tokenizer)
    notes = list(subject_images.notes)
    config = _fit_memory(config, recipe, comps, placement, notes)

    trigger_id = None
    if recipe.learns_token:
        trigger_id = add_trigger_token(comps.tokenizer, comps.text_encoder, config.trigger_token,
                                       config.init_word)

    class_latents = None
    if recipe.needs_class_images:
        # The main process fills the on-disk cache; the others read it once it is complete.
        if accelerator.is_main_process:
            class_images = generate_class_images(comps, config, base_model, resolution, cancel, progress, started)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            class_images = generate_class_images(comps, config, base_model, resolution, cancel, progress, started)
        class_latents = encode_images(comps.vae, class_images, placement.device)
    images = list(subject_images.images)
    flip_offset = None
    if config.flip:
        images += [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in subject_images.images]
        flip_offset = len(subject_images.images)
    subject_latents = encode_images(comps.vae, images, placement.device)

    summaries: list[StageSummary] = []
    training_started = time.perf_counter()
    if config.compile_unet:
        # Regional: each repeated transformer block is compiled once per shape, a fraction of a whole-U-Net
        # compile's warm-up. The warm-up happens in the first steps and is counted in the training time.
        comps.unet.compile_repeated_blocks()
    steps_before = 0
    for stage in recipe.stages:
        ctx = StageContext(comps, config, placement, accelerator, subject_latents, flip_offset, class_latents,
                            trigger_id, cancel, progress, started, steps_before, recipe.total_steps,
                            config.sample_prompts()[0])
        summaries.append(run_stage(stage, ctx))
        steps_before += stage.steps
    training_seconds = time.perf_counter() - training_started
    cancel.raise_if_cancelled()

    result = TrainingResult(output_dir, config, summaries, 0.0, training_seconds, placement.describe(), notes=notes)
    if not accelerator.is_main_process:
        return result
    with artifacts.atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        sample_names = artifacts.save_samples(staging, _render_samples(comps, config, cancel))
        _write_weights(comps, config, recipe, trigger_id, staging)
        saved = {**config.to_dict(), "base_model": portable_base_model(base_model)}
        artifacts.save_config(staging, saved)
        result.seconds_total = time.perf_counter() - started
        artifacts.save_summary(staging, summary_dict(result))
        write_model_card(staging, TrainingConfig.from_dict(saved), summary_dict(result), sample_names)
    result.sample_files = [output_dir / artifacts.SAMPLES_DIR / name for name in sample_names]
    return result


def _check_trigger_early(base_path: str, config: TrainingConfig) -> CLIPTokenizer:
    """Refuse a bad trigger with the tokenizer alone, before minutes of loading the model; return the tokenizer."""
    tokenizer = CLIPTokenizer.from_pretrained(base_path, subfolder="tokenizer")
    check = check_trigger(tokenizer, config.trigger_token, allow_existing_word=not config.learns_token)
    if not check.ok:
        hint = f" (try '{check.suggestion}')" if check.suggestion else ""
        label = "trigger token" if config.learns_token else "identifier"
        raise TriggerError(f"{label}: {check.message}{hint}")
    return tokenizer


def summary_dict(result: TrainingResult) -> dict[str, Any]:
    """The run's facts for the card and the benchmarks: no paths, no secrets."""
    return {
        "hardware": result.hardware,
        "seconds_training": round(result.seconds_training, 2),
        "seconds_total": round(result.seconds_total, 2),
        "stages": [
            {"name": s.name, "steps": s.steps, "seconds": round(s.seconds, 2), "mean_step_ms": round(s.mean_step_ms, 2),
             "final_loss": None if s.final_loss is None else round(s.final_loss, 5)}
            for s in result.stages
        ],
    }


def _render_samples(comps: Components, config: TrainingConfig, cancel: CancelFlag) -> Iterator[Image.Image]:
    """The card's samples, one at a time (a generator: each is written before the next is rendered)."""
    if not config.sample_count:
        return
    pipeline = sampling_pipeline(comps)
    prompts = config.sample_prompts()
    for index in range(config.sample_count):
        cancel.raise_if_cancelled()
        generator = torch.Generator("cpu").manual_seed(config.seed + index)
        resolution = config.resolution or 512
        with torch.no_grad(), eager_sampling():
            image = pipeline(prompts[index % len(prompts)], num_inference_steps=config.sample_steps,
                             guidance_scale=config.guidance_scale, height=resolution, width=resolution,
                             generator=generator).images[0]
        yield image


def _write_weights(comps: Components, config: TrainingConfig, recipe: Recipe, trigger_id: int | None,
                   folder: Path) -> None:
    vector = None
    if recipe.learns_token and trigger_id is not None:
        vector = comps.text_encoder.get_input_embeddings().weight[trigger_id]
        artifacts.save_embedding(folder, config.trigger_token, vector)
    if not config.trains_unet:
        artifacts.save_webui_copies(folder, config.trigger_token, vector, None)
        return
    if config.uses_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(comps.unet))
        artifacts.save_lora(folder, unet_layers, comps.unet.peft_config["default"].to_dict())
        artifacts.save_webui_copies(folder, config.trigger_token, vector, unet_layers)
        return
    artifacts.save_webui_copies(folder, config.trigger_token, vector, None)
    artifacts.save_unet(folder, comps.unet)
    if config.train_text_encoder:
        artifacts.save_text_encoder(folder, comps.text_encoder)
