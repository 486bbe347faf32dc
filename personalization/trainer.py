"""The one training loop. Recipes (:mod:`personalization.recipes`) say what each stage trains; this module runs them.

Read top to bottom: load the base model, add the trigger, cache what never changes (VAE latents of the subject
images and their flips, prompt conditionings when the text side is frozen, class images for prior preservation),
run the stages, then write the artifact folder in one atomic rename (:func:`train`, one function per phase).
A stage is :func:`run_stage`, the loop alone: :func:`trainable_parts` sets up what the stage trains and freezes it
again on exit, and :class:`Batches` hands each step its latents and conditionings.
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
from accelerate.state import AcceleratorState
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
from .jobs import estimate_run
from .progress import CancelFlag, EtaClock, ProgressCallback, ProgressEvent
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
    """What every stage of a run shares: the model, the caches, the progress and cancel hooks."""

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
    clock: EtaClock | None = None  # the run's ETA, shared by its stages
    stage_index: int = 0  # this stage's place in the clock's plan


@dataclass
class TrainableParts:
    """What one stage trains: the modules the loop calls (wrapped for data-parallel runs), the parameters and their
    optimizer, and the plain modules that have trainable weights (put in eval mode for previews)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    modules: list[torch.nn.Module]


def _unfreeze(stage: StagePlan, ctx: StageContext) -> tuple[list[torch.nn.Parameter], TriggerEmbedding | None]:
    """Give gradients to what ``stage`` moves; return its parameters and the spliced trigger row, if any."""
    comps = ctx.components
    spliced: TriggerEmbedding | None = None
    if stage.trainable == "embedding":
        if ctx.trigger_id is None:
            raise ValueError(f"{stage.name}: no trigger token to train")
        spliced = TriggerEmbedding(comps.text_encoder.get_input_embeddings(), ctx.trigger_id)
        comps.text_encoder.set_input_embeddings(spliced)
        params = [spliced.vector]
    elif stage.trainable == "unet_lora":
        _add_unet_lora(comps.unet, ctx.config)
        params = [p for p in comps.unet.parameters() if p.requires_grad]
    else:
        comps.unet.requires_grad_(True)
        params = list(comps.unet.parameters())
    if stage.train_text_encoder:
        comps.text_encoder.requires_grad_(True)
        params += [p for p in comps.text_encoder.parameters() if p.requires_grad]
    return params, spliced


@contextlib.contextmanager
def trainable_parts(stage: StagePlan, ctx: StageContext) -> Iterator[TrainableParts]:
    """What ``stage`` trains, with its optimizer and memory options; on exit everything is frozen again.

    Exit writes the learned trigger vector back into the embedding table, freezes and sets to eval mode what trained,
    and switches gradient checkpointing off; what the stage does not train is never touched, so it stays bit-identical.
    """
    comps, config, accelerator = ctx.components, ctx.config, ctx.accelerator
    trains_unet = stage.trainable != "embedding"
    params, spliced = _unfreeze(stage, ctx)
    if config.gradient_checkpointing and trains_unet:
        comps.unet.enable_gradient_checkpointing()
    if trains_unet:
        comps.unet.train()
    optimizer = _make_optimizer(params, stage.learning_rate, stage.weight_decay, config, ctx.placement)
    optimizer = accelerator.prepare_optimizer(optimizer)
    # Data-parallel runs (accelerate launch) need the trainable modules wrapped so gradients are averaged; a single
    # process keeps the plain modules, so what is saved is exactly what was trained.
    unet, text_encoder = comps.unet, comps.text_encoder
    if accelerator.num_processes > 1:
        if trains_unet:
            unet = accelerator.prepare_model(comps.unet)
        if not trains_unet or stage.train_text_encoder:
            text_encoder = accelerator.prepare_model(comps.text_encoder)
    modules = [m for m in (comps.unet, comps.text_encoder) if any(p.requires_grad for p in m.parameters())]
    try:
        yield TrainableParts(unet, text_encoder, params, optimizer, modules)
    finally:
        if spliced is not None:
            comps.text_encoder.set_input_embeddings(spliced.write_back())
        for module in modules:
            module.requires_grad_(False)
            module.eval()
        if config.gradient_checkpointing and trains_unet:
            comps.unet.disable_gradient_checkpointing()


class Batches:
    """What each step of a stage trains on, drawn from the stage's generator in a fixed order (same seed, same run).

    Subject batches hold min(max_batch_size, image count) different images: a shuffled order is walked a batch at a
    time and reshuffled when less than a batch is left. With flips, each image is its mirrored copy (cached after the
    originals) half of the time. Each image gets one of the stage's prompts at random. Class batches (prior
    preservation) hold as many class images, each with the class prompt. Conditionings are computed once when the
    text side is frozen, else by ``text_encoder`` at each step (under the caller's autocast, so gradients reach it).
    """

    def __init__(self, stage: StagePlan, ctx: StageContext, text_encoder: torch.nn.Module,
                 generator: torch.Generator) -> None:
        tokenizer, self.device = ctx.components.tokenizer, ctx.placement.device
        self.text_encoder, self.generator = text_encoder, generator
        self.latents, self.flip_offset = ctx.subject_latents, ctx.flip_offset
        self.prompt_ids = tokenize(tokenizer, stage.prompts, self.device)
        self.cached_conditioning = self._frozen(self.prompt_ids) if stage.text_frozen else None
        self.class_latents = ctx.class_latents if stage.prior_preservation else None
        if self.class_latents is not None:
            self.class_ids = tokenize(tokenizer, [ctx.config.class_prompt], self.device)
            self.cached_class_conditioning = self._frozen(self.class_ids) if stage.text_frozen else None
        self.image_count = self.flip_offset if self.flip_offset is not None else len(self.latents)
        self.size = min(ctx.config.max_batch_size, self.image_count)
        self.order = torch.randperm(self.image_count, generator=generator)
        self.cursor = 0

    @property
    def prior_preservation(self) -> bool:
        return self.class_latents is not None

    @torch.no_grad()
    def _frozen(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]

    def subject(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next subject batch: its latents and the index of each image's prompt."""
        if self.cursor + self.size > self.image_count:
            self.order, self.cursor = torch.randperm(self.image_count, generator=self.generator), 0
        indices = self.order[self.cursor: self.cursor + self.size]
        self.cursor += self.size
        if self.flip_offset is not None:
            flips = torch.rand(self.size, generator=self.generator) < 0.5
            indices = torch.where(flips, indices + self.flip_offset, indices)
        latents = self.latents.sample(indices, self.generator)
        prompt_index = torch.randint(0, len(self.prompt_ids), (self.size,), generator=self.generator)
        return latents, prompt_index

    def conditioning(self, prompt_index: torch.Tensor) -> torch.Tensor:
        """The text conditioning of the prompts ``subject`` chose."""
        if self.cached_conditioning is not None:
            return self.cached_conditioning[prompt_index.to(self.device)]
        return self.text_encoder(self.prompt_ids[prompt_index.to(self.device)])[0]

    def classes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A prior-preservation batch: class-image latents and the class prompt's conditioning."""
        assert self.class_latents is not None, "the stage has no prior preservation"
        class_index = torch.randint(0, len(self.class_latents), (self.size,), generator=self.generator)
        latents = self.class_latents.sample(class_index, self.generator)
        if self.cached_class_conditioning is None:
            return latents, self.text_encoder(self.class_ids.expand(self.size, -1))[0]
        return latents, self.cached_class_conditioning.expand(self.size, -1, -1)


def run_stage(stage: StagePlan, ctx: StageContext) -> StageSummary:
    """Train one stage: sample a batch, take the loss, step; report progress, previews, and stop when cancelled."""
    config, accelerator, scheduler = ctx.config, ctx.accelerator, ctx.components.noise_scheduler
    # Each data-parallel process draws its own images, noise and timesteps, else DDP would average copies.
    process_offset = 1_000_003 * accelerator.process_index
    generator = torch.Generator("cpu").manual_seed(config.seed + ctx.steps_before + process_offset)
    loss_value: float | None = None
    with trainable_parts(stage, ctx) as parts:
        batches = Batches(stage, ctx, parts.text_encoder, generator)
        stage_started = time.perf_counter()
        for step in range(1, stage.steps + 1):
            ctx.cancel.raise_if_cancelled()
            latents, prompt_index = batches.subject()
            with accelerator.autocast():
                loss = diffusion_loss(parts.unet, scheduler, latents, batches.conditioning(prompt_index), generator,
                                      config.snr_gamma)
                if batches.prior_preservation:
                    class_latents, class_conditioning = batches.classes()
                    prior = diffusion_loss(parts.unet, scheduler, class_latents, class_conditioning, generator,
                                           config.snr_gamma)
                    loss = loss + config.prior_loss_weight * prior
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(parts.params, config.max_grad_norm)
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"{stage.name}: the loss became {loss_value} at step {step}; lower the learning rate "
                    f"({stage.learning_rate:g}) or use mixed_precision='no'"
                )
            _report_step(stage, ctx, step, loss_value, stage_started, parts.modules)
    seconds = time.perf_counter() - stage_started
    return StageSummary(stage.name, stage.steps, seconds, loss_value, 1000 * seconds / max(stage.steps, 1))


def _report_step(stage: StagePlan, ctx: StageContext, step: int, loss_value: float, stage_started: float,
                 trainable_modules: Sequence[torch.nn.Module]) -> None:
    """Progress after ``step``, with a preview every ``preview_interval`` steps and at the stage's end."""
    if ctx.report is None:
        return
    config = ctx.config
    done = ctx.steps_before + step
    preview = None
    if config.preview_interval and (step % config.preview_interval == 0 or step == stage.steps):
        preview = render_preview(ctx.components, config, ctx.preview_prompt, trainable_modules)
    now = time.perf_counter()
    elapsed = now - ctx.started
    if ctx.clock is not None:
        eta = ctx.clock.step_done(ctx.stage_index, step, now)
    else:
        eta = (now - stage_started) / step * (ctx.total_steps - done)
    ctx.report(ProgressEvent(stage.name, done, ctx.total_steps, step, stage.steps, loss_value, elapsed, eta,
                             preview=preview))


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
@dataclass
class _Run:
    """One run's loaded state, handed from each phase of :func:`train` to the next."""

    config: TrainingConfig
    recipe: Recipe
    placement: Placement
    accelerator: Accelerator
    components: Components
    trigger_id: int | None
    notes: list[str]
    cancel: CancelFlag
    progress: ProgressCallback | None
    started: float


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
    started = time.perf_counter()
    cancel = cancel or CancelFlag()
    config, images, base_path, tokenizer, output_dir = _check_inputs(config, subject_images, output_dir, overwrite)
    run = _load(config, base_path, tokenizer, placement, list(images.notes), cancel, progress, started)
    class_latents = _class_latents(run)
    subject_latents, flip_offset = _subject_latents(run, images)
    summaries, training_seconds = _run_stages(run, subject_latents, flip_offset, class_latents)
    cancel.raise_if_cancelled()

    result = TrainingResult(output_dir, run.config, summaries, 0.0, training_seconds, run.placement.describe(),
                            notes=run.notes)
    if run.accelerator.is_main_process:
        _write_artifact(run, result, overwrite)
    return result


def _check_inputs(
    config: TrainingConfig, subject_images: SubjectImages | Path | str | Sequence[Path | str], output_dir: Path | str,
    overwrite: bool,
) -> tuple[TrainingConfig, SubjectImages, str, CLIPTokenizer, Path]:
    """What can be refused before the model loads: the config, the output folder, the images, the trigger.

    Returns the config with its base model and resolution filled in, the images at that resolution, the base model's
    local path, its tokenizer (read for the trigger check) and the resolved output folder.
    """
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
    return config, subject_images, base_path, tokenizer, output_dir


def _load(config: TrainingConfig, base_path: str, tokenizer: CLIPTokenizer, placement: Placement | None,
          notes: list[str], cancel: CancelFlag, progress: ProgressCallback | None, started: float) -> _Run:
    """Choose the device, load the base model, fit the memory options to the card, add the trigger token."""
    recipe: Recipe = recipe_for(config)
    placement = placement or choose_placement(config.mixed_precision)
    torch.manual_seed(config.seed)
    # accelerate keeps one precision per process and refuses another: a second run in the same process (a server, a
    # test, a notebook) with another precision would fail. Its process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=placement.mixed_precision, cpu=placement.device.type == "cpu")
    if accelerator.num_processes > 1:
        placement = Placement(accelerator.device, placement.mixed_precision)
    comps = load_components(base_path, placement, tokenizer=tokenizer)
    config = _fit_memory(config, recipe, comps, placement, notes)

    trigger_id = None
    if recipe.learns_token:
        trigger_id = add_trigger_token(comps.tokenizer, comps.text_encoder, config.trigger_token,
                                       config.init_word)
    return _Run(config, recipe, placement, accelerator, comps, trigger_id, notes, cancel, progress, started)


def _class_latents(run: _Run) -> LatentCache | None:
    """Latents of the prior-preservation class images, generated by the untouched base model (None without)."""
    if not run.recipe.needs_class_images:
        return None
    config, accelerator = run.config, run.accelerator
    base_model, resolution = config.base_model, config.resolution

    def generate() -> list[Image.Image]:
        return generate_class_images(run.components, config, base_model, resolution, run.cancel, run.progress,
                                     run.started)

    # The main process fills the on-disk cache; the others read it once it is complete.
    if accelerator.is_main_process:
        class_images = generate()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        class_images = generate()
    return encode_images(run.components.vae, class_images, run.placement.device)


def _subject_latents(run: _Run, subject_images: SubjectImages) -> tuple[LatentCache, int | None]:
    """Latents of the subject images, then of their mirrored copies when flips are on (the offset of those)."""
    images = list(subject_images.images)
    flip_offset = None
    if run.config.flip:
        images += [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in subject_images.images]
        flip_offset = len(subject_images.images)
    return encode_images(run.components.vae, images, run.placement.device), flip_offset


def _run_stages(run: _Run, subject_latents: LatentCache, flip_offset: int | None,
                class_latents: LatentCache | None) -> tuple[list[StageSummary], float]:
    """Run the recipe's stages in order; return their summaries and the seconds they took together."""
    summaries: list[StageSummary] = []
    training_started = time.perf_counter()
    if run.config.compile_unet:
        # Regional: each repeated transformer block is compiled once per shape, a fraction of a whole-U-Net
        # compile's warm-up. The warm-up happens in the first steps and is counted in the training time.
        run.components.unet.compile_repeated_blocks()
    steps_before = 0
    clock = eta_clock(run)
    for index, stage in enumerate(run.recipe.stages):
        ctx = StageContext(run.components, run.config, run.placement, run.accelerator, subject_latents, flip_offset,
                           class_latents, run.trigger_id, run.cancel, run.progress, run.started, steps_before,
                           run.recipe.total_steps, run.config.sample_prompts()[0], clock, index)
        summaries.append(run_stage(stage, ctx))
        steps_before += stage.steps
    return summaries, time.perf_counter() - training_started


def eta_clock(run: _Run) -> EtaClock:
    """The run's ETA, starting from the estimate the app showed before Start (jobs.estimate_run) for this device."""
    estimate = estimate_run(run.config, run.placement.describe(), run.config.base_model or "")
    planned = [(stage.steps, estimate.step_s(stage.trainable == "embedding")) for stage in run.recipe.stages]
    return EtaClock(planned, tail_s=estimate.samples_s)


def _write_artifact(run: _Run, result: TrainingResult, overwrite: bool) -> None:
    """Samples, weights, config, summary and card into ``result.output_dir``, renamed into place in one step."""
    from .model_card import write_model_card

    config = run.config
    with artifacts.atomic_output_dir(result.output_dir, overwrite=overwrite) as staging:
        sample_names = artifacts.save_samples(staging, _render_samples(run.components, config, run.cancel))
        _write_weights(run.components, config, run.recipe, run.trigger_id, staging)
        saved = {**config.to_dict(), "base_model": portable_base_model(config.base_model)}
        artifacts.save_config(staging, saved)
        result.seconds_total = time.perf_counter() - run.started
        artifacts.save_summary(staging, summary_dict(result))
        write_model_card(staging, TrainingConfig.from_dict(saved), summary_dict(result), sample_names)
    result.sample_files = [result.output_dir / artifacts.SAMPLES_DIR / name for name in sample_names]


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
