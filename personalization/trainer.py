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
import itertools
import json
import math
import os
import shutil
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
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import artifacts, families
from .checkpoints import check_keep_step, checkpoint_steps
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
from .families import Conditioning, Family
from .images import SubjectImages, list_image_files, load_subject_images, to_tensor_batch
from .jobs import estimate_run
from .progress import CancelFlag, EtaClock, ProgressCallback, ProgressEvent, TrainingCancelled
from .recipes import Recipe, StagePlan, recipe_for
from .snapshots import (
    FULL_UNET_KEEP_ALL_BYTES,
    Render,
    ResumeState,
    Scorer,
    Snapshotter,
    TrainedWeights,
    fingerprint,
    lay_out_kept_step,
    load_resume_state,
    resume_dir,
    save_resume_state,
)
from .tokens import TriggerError, add_trigger_tokens, check_trigger

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Components:
    """The parts of a Stable-Diffusion pipeline that training touches; SDXL's second tokenizer and encoder too."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sampling_scheduler: SchedulerMixin
    family: Family = families.SD15
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)


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
    seconds_checkpoints: float = 0.0  # saving, sampling and scoring the checkpoints, outside seconds_training


def default_resolution(base_model_path: str) -> int:
    """The base model's native resolution, read from its configs (no weights are loaded)."""
    unet_config = UNet2DConditionModel.load_config(base_model_path, subfolder="unet")
    vae_config = AutoencoderKL.load_config(base_model_path, subfolder="vae")
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def load_components(base_model_path: str, placement: Placement, *,
                    tokenizer: CLIPTokenizer | None = None) -> Components:
    """Load the base model's parts in fp32 (master weights; autocast does the low-precision compute). The VAE stays
    fp32 on every family: it only runs outside autocast (the latent caches, sample decoding), so SDXL's VAE, which
    overflows in fp16, never runs in fp16 here.

    ``tokenizer``: one already read from this base (the early trigger check's), so it is not read twice.
    """
    family = families.detect_family(base_model_path)
    first, *others = [folder for folder, _, _ in family.encoders]
    tokenizers = [tokenizer or CLIPTokenizer.from_pretrained(base_model_path, subfolder=first)]
    tokenizers += [CLIPTokenizer.from_pretrained(base_model_path, subfolder=folder) for folder in others]
    encoders = [family.encoder_type(name).from_pretrained(base_model_path, subfolder=folder, dtype=torch.float32)
                for _, folder, name in family.encoders]
    vae = AutoencoderKL.from_pretrained(base_model_path, subfolder="vae", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(base_model_path, subfolder="unet", dtype=torch.float32)
    noise_scheduler = DDPMScheduler.from_pretrained(base_model_path, subfolder="scheduler")
    for module in (*encoders, vae, unet):
        module.requires_grad_(False)
        module.to(placement.device)
    second = {"tokenizer_2": tokenizers[1], "text_encoder_2": encoders[1]} if len(encoders) > 1 else {}
    return Components(tokenizers[0], encoders[0], vae, unet, noise_scheduler,
                      load_sampling_scheduler(base_model_path), family, **second)


def load_sampling_scheduler(base_model_path: str) -> SchedulerMixin:
    """The sampler the base pipeline ships with, so samples look like what plain diffusers users will get."""
    index = StableDiffusionPipeline.load_config(base_model_path)
    _library, class_name = index.get("scheduler", ["diffusers", "DDIMScheduler"])
    scheduler_class = getattr(diffusers, class_name, DDIMScheduler)
    return scheduler_class.from_pretrained(base_model_path, subfolder="scheduler")


def eager_sampling() -> contextlib.AbstractContextManager:
    """Previews and samples skip compiled blocks: an inference graph would be a second warm-up for a few images."""
    return torch.compiler.set_stance("force_eager")


def sampling_pipeline(components: Components) -> diffusers.DiffusionPipeline:
    """A pipeline around the in-memory modules (no copy), with the base model's own sampler."""
    scheduler = components.sampling_scheduler.__class__.from_config(components.sampling_scheduler.config)
    second = {"text_encoder_2": components.text_encoder_2, "tokenizer_2": components.tokenizer_2}
    pipeline = components.family.pipeline_type(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=scheduler, **(second if components.text_encoder_2 is not None else {}),
        **components.family.pipeline_options,
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
    # 8 images at 512 px per call; fewer at larger sizes, where the fp32 encoder's activations grow with the pixels.
    for chunk in pixels.split(max(1, 8 * 512**2 // (pixels.shape[-1] * pixels.shape[-2]))):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    scale = vae.config.scaling_factor
    return LatentCache(torch.cat(means) * scale, torch.cat(stds) * scale)


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
    unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor, conditioning: Conditioning,
    generator: torch.Generator, snr_gamma: float | None,
) -> torch.Tensor:
    """Per-sample denoising loss (epsilon or v target, as the base model was trained), min-SNR weighted."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device="cpu").to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, conditioning.encoder_hidden_states,
                      added_cond_kwargs=conditioning.added_cond_kwargs).sample.float()
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
    # An embedding stage backpropagates through the whole U-Net too: its activations are a LoRA step's.
    trains_unet = [stage.trainable for stage in recipe.stages if stage.trainable != "embedding"]
    plan = plan_memory(sum(p.numel() for p in comps.unet.parameters()), gpu_memory_bytes(placement.device),
                       full_unet="unet_full" in trains_unet, gradient_checkpointing=config.gradient_checkpointing,
                       use_8bit_adam=config.use_8bit_adam,
                       bitsandbytes_available=importlib.util.find_spec("bitsandbytes") is not None,
                       family=comps.family)
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
    keeper: Keeper | None = None  # the run's checkpoints (None: a data-parallel helper process)
    resume: ResumeState | None = None  # where this stage continues from, when a killed run resumes inside it


@dataclass
class TrainableParts:
    """What one stage trains: the modules the loop calls (wrapped for data-parallel runs), the parameters and their
    optimizer, and the plain modules that have trainable weights (put in eval mode for previews)."""

    unet: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, ...]  # one per tokenizer (SDXL: two)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    modules: list[torch.nn.Module]


def _unfreeze(stage: StagePlan, ctx: StageContext) -> tuple[list[torch.nn.Parameter], list[TriggerEmbedding]]:
    """Give gradients to what ``stage`` moves; return its parameters and the spliced trigger rows (one per text
    encoder: SDXL learns the trigger in both), if any."""
    comps = ctx.components
    spliced: list[TriggerEmbedding] = []
    if stage.trainable == "embedding":
        if ctx.trigger_id is None:
            raise ValueError(f"{stage.name}: no trigger token to train")
        for encoder in comps.text_encoders:
            spliced.append(TriggerEmbedding(encoder.get_input_embeddings(), ctx.trigger_id))
            encoder.set_input_embeddings(spliced[-1])
        params = [row.vector for row in spliced]
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
    if config.gradient_checkpointing:  # every stage backpropagates through the U-Net (stage 1 to the trigger)
        comps.unet.enable_gradient_checkpointing()
    if trains_unet:
        comps.unet.train()
    optimizer = _make_optimizer(params, stage.learning_rate, stage.weight_decay, config, ctx.placement)
    optimizer = accelerator.prepare_optimizer(optimizer)
    # Data-parallel runs (accelerate launch) need the trainable modules wrapped so gradients are averaged; a single
    # process keeps the plain modules, so what is saved is exactly what was trained.
    unet, text_encoders = comps.unet, comps.text_encoders
    if accelerator.num_processes > 1:
        if trains_unet:
            unet = accelerator.prepare_model(comps.unet)
        if not trains_unet or stage.train_text_encoder:
            text_encoders = tuple(accelerator.prepare_model(encoder) for encoder in text_encoders)
    modules = [m for m in (comps.unet, *comps.text_encoders) if any(p.requires_grad for p in m.parameters())]
    try:
        yield TrainableParts(unet, text_encoders, params, optimizer, modules)
    finally:
        for encoder, row in zip(comps.text_encoders, spliced, strict=False):
            encoder.set_input_embeddings(row.write_back())
        for module in modules:
            module.requires_grad_(False)
            module.eval()
        if config.gradient_checkpointing:
            comps.unet.disable_gradient_checkpointing()


class Batches:
    """What each step of a stage trains on, drawn from the stage's generator in a fixed order (same seed, same run).

    Subject batches hold min(max_batch_size, image count) different images: a shuffled order is walked a batch at a
    time and reshuffled when less than a batch is left. With flips, each image is its mirrored copy (cached after the
    originals) half of the time. Each image gets one of the stage's prompts at random. Class batches (prior
    preservation) hold as many class images, each with the class prompt. Conditionings (:class:`Conditioning`, as
    the base model's family computes them) are computed once when the text side is frozen, else by ``text_encoders``
    at each step (under the caller's autocast, so gradients reach them).
    """

    def __init__(self, stage: StagePlan, ctx: StageContext, text_encoders: Sequence[torch.nn.Module],
                 generator: torch.Generator) -> None:
        tokenizers, self.device = ctx.components.tokenizers, ctx.placement.device
        # The size the cached latents were encoded at: what SDXL's time ids must say.
        self.family = ctx.components.family
        self.resolution = ctx.subject_latents.mean.shape[-1] * ctx.components.vae_scale_factor
        self.text_encoders, self.generator = tuple(text_encoders), generator
        self.latents, self.flip_offset = ctx.subject_latents, ctx.flip_offset
        self.prompt_ids = families.prompt_ids(tokenizers, stage.prompts, self.device)
        self.cached_conditioning = self._frozen(self.prompt_ids) if stage.text_frozen else None
        self.class_latents = ctx.class_latents if stage.prior_preservation else None
        if self.class_latents is not None:
            self.class_ids = families.prompt_ids(tokenizers, [ctx.config.class_prompt], self.device)
            self.cached_class_conditioning = self._frozen(self.class_ids) if stage.text_frozen else None
        self.image_count = self.flip_offset if self.flip_offset is not None else len(self.latents)
        self.size = min(ctx.config.max_batch_size, self.image_count)
        self.order = torch.randperm(self.image_count, generator=generator)
        self.cursor = 0

    @property
    def prior_preservation(self) -> bool:
        return self.class_latents is not None

    def encode(self, input_ids: torch.Tensor) -> Conditioning:
        return families.encode(self.family, self.text_encoders, input_ids, self.resolution)

    @torch.no_grad()
    def _frozen(self, input_ids: torch.Tensor) -> Conditioning:
        return self.encode(input_ids)

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

    def conditioning(self, prompt_index: torch.Tensor) -> Conditioning:
        """The text conditioning of the prompts ``subject`` chose."""
        if self.cached_conditioning is not None:
            return self.cached_conditioning[prompt_index.to(self.device)]
        return self.encode(self.prompt_ids[prompt_index.to(self.device)])

    def classes(self) -> tuple[torch.Tensor, Conditioning]:
        """A prior-preservation batch: class-image latents and the class prompt's conditioning."""
        assert self.class_latents is not None, "the stage has no prior preservation"
        class_index = torch.randint(0, len(self.class_latents), (self.size,), generator=self.generator)
        latents = self.class_latents.sample(class_index, self.generator)
        if self.cached_class_conditioning is None:
            return latents, self.encode(self.class_ids.expand(self.size, *self.class_ids.shape[1:]))
        return latents, self.cached_class_conditioning.expand(self.size)


def run_stage(stage: StagePlan, ctx: StageContext) -> StageSummary:
    """Train one stage: sample a batch, take the loss, step; report progress, previews, and stop when cancelled."""
    config, accelerator, scheduler = ctx.config, ctx.accelerator, ctx.components.noise_scheduler
    # Each data-parallel process draws its own images, noise and timesteps, else DDP would average copies.
    process_offset = 1_000_003 * accelerator.process_index
    generator = torch.Generator("cpu").manual_seed(config.seed + ctx.steps_before + process_offset)
    loss_value: float | None = None
    with trainable_parts(stage, ctx) as parts:
        batches = Batches(stage, ctx, parts.text_encoders, generator)
        first_step = 1
        if ctx.resume is not None:
            first_step = restore_stage(ctx.resume, ctx, parts, batches, generator) + 1
            loss_value = ctx.resume.loss
        stage_started = time.perf_counter()
        for step in range(first_step, stage.steps + 1):
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
            if step < stage.steps and ctx.keeper is not None and ctx.keeper.snapshotter.due(ctx.steps_before + step):
                take_checkpoint(stage, ctx, step, loss_value, (parts, batches, generator))
    seconds = time.perf_counter() - stage_started
    steps_here = stage.steps - first_step + 1
    return StageSummary(stage.name, stage.steps, seconds, loss_value, 1000 * seconds / max(steps_here, 1))


# ---- checkpoints and resume -------------------------------------------------------------------------------------
# Samples rendered in one pipeline call, in pixels: on the mini model's 32 px images one call of 4 costs about half
# of 4 calls of 1 (CPU, benchmarks/checkpoint_cost.py); at SD sizes (512 px and up) they stay one at a time, as the
# memory of a batch beside a training run's state is not measured on small GPUs.
SAMPLE_BATCH_PIXELS = 256 * 256
@dataclass
class Keeper:
    """The run's checkpoints (:mod:`personalization.snapshots`): where they go, the state a resumed run continues
    from, and the clock of training time, which leaves out the time spent saving and scoring checkpoints."""

    folder: Path
    snapshotter: Snapshotter
    fingerprint: str
    resumed: ResumeState | None = None
    training_started: float = 0.0
    checkpoint_s: float = 0.0
    finished: list[StageSummary] = field(default_factory=list)

    def training_seconds(self, now: float) -> float:
        earlier = self.resumed.training_s if self.resumed else 0.0
        return earlier + now - self.training_started - self.checkpoint_s


def trained_weights(comps: Components, config: TrainingConfig, trigger_id: int | None,
                    stage: StagePlan) -> TrainedWeights:
    """What the run has trained when ``stage`` is the current one (the U-Net stages are every recipe's last)."""
    vector = None
    if config.learns_token and trigger_id is not None:
        vector = trigger_vectors(comps, trigger_id)
    weights = TrainedWeights(config.trigger_token, vector)
    if stage.trainable == "unet_lora":
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        weights.lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(comps.unet))
        weights.lora_metadata = comps.unet.peft_config["default"].to_dict()
    elif stage.trainable == "unet_full":
        weights.unet = comps.unet
    if stage.train_text_encoder:
        weights.text_encoder = comps.text_encoder
    return weights


def take_checkpoint(stage: StagePlan, ctx: StageContext, step: int, loss_value: float | None,
                    live: tuple[TrainableParts, Batches, torch.Generator] | None = None) -> None:
    """Save, render and score the model after ``step`` of ``stage``, then the state a killed run resumes from.

    ``live``: the stage's trainable parts, batches and generator, for a checkpoint inside the stage (their state is
    saved too); None at the stage's end, after :func:`trainable_parts` has frozen everything again.
    """
    keeper, comps, config = ctx.keeper, ctx.components, ctx.config
    assert keeper is not None
    started = time.perf_counter()
    done = ctx.steps_before + step
    with _eval_mode(live[0].modules if live else []), torch.random.fork_rng(devices=[]):
        samples = _render_samples(comps, config, ctx.cancel)
        point = keeper.snapshotter.take(done, trained_weights(comps, config, ctx.trigger_id, stage), samples,
                                        probe_renderer(comps, config, ctx.accelerator, keeper.snapshotter.scorer),
                                        keeper.training_seconds(started))
    state = ResumeState(keeper.fingerprint, done, point.training_s, torch.get_rng_state(),
                        trigger_rows(comps, ctx.trigger_id), loss=loss_value,
                        stage_summaries=[dataclasses.asdict(summary) for summary in keeper.finished])
    if live is not None:
        parts, batches, generator = live
        state.stage_params = [param.detach().cpu().clone() for param in parts.params]
        state.optimizer, state.generator = parts.optimizer.state_dict(), generator.get_state()
        state.batch_order, state.batch_cursor = batches.order, batches.cursor
    save_resume_state(keeper.folder, state)
    keeper.checkpoint_s += time.perf_counter() - started
    if ctx.report is not None:
        scores = point.scores
        message = f"checkpoint at step {done}" + (
            f": fidelity {scores['fidelity']:.3f}, drift {scores['drift']:.3f}" if point.scored else "")
        ctx.report(ProgressEvent(stage.name, done, ctx.total_steps, step, stage.steps, None,
                                 time.perf_counter() - ctx.started, None, message))


def trigger_rows(comps: Components, trigger_id: int | None) -> list[torch.Tensor]:
    """The trigger's row in each text encoder as it stands (the trainable vector while stage 1 runs)."""
    if trigger_id is None:
        return []
    rows = []
    for encoder in comps.text_encoders:
        embeddings = encoder.get_input_embeddings()
        rows.append(embeddings.vector if isinstance(embeddings, TriggerEmbedding) else embeddings.weight[trigger_id])
    return [row.detach().cpu().clone() for row in rows]


def trigger_vectors(comps: Components, trigger_id: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """The learned trigger rows as the family's embedding file stores them: SD-1.5's one vector, or one per text
    encoder keyed (SDXL: clip_l, clip_g)."""
    rows = trigger_rows(comps, trigger_id)
    if not comps.family.embedding_keys:
        return rows[0]
    return dict(zip(comps.family.embedding_keys, rows, strict=True))


def restore_stage(state: ResumeState, ctx: StageContext, parts: TrainableParts, batches: Batches,
                  generator: torch.Generator) -> int:
    """Put a stage back as it stood at ``state`` (weights, optimizer, generators, batch order); return the steps
    of the stage already done."""
    with torch.no_grad():
        for param, saved in zip(parts.params, state.stage_params, strict=True):
            param.copy_(saved.to(param.device, param.dtype))
    parts.optimizer.load_state_dict(state.optimizer)
    generator.set_state(state.generator)
    batches.order, batches.cursor = state.batch_order, state.batch_cursor
    torch.set_rng_state(state.rng)
    return state.step - ctx.steps_before


@contextlib.contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)


def probe_steps(scorer: Scorer | None, config: TrainingConfig) -> int:
    """Denoising steps of the scoring probes: the scorer's ``probe_steps`` (fewer than the samples' where measured
    not to change its readings), never more than the samples' own steps."""
    # A scorer without the attribute (one a benchmark wraps or writes itself) keeps the samples' steps.
    steps = getattr(scorer, "probe_steps", None)
    return min(steps, config.sample_steps) if steps else config.sample_steps


def probe_renderer(comps: Components, config: TrainingConfig, accelerator: Accelerator,
                   scorer: Scorer | None) -> Render:
    """:func:`render_batch` at the scorer's probe steps (:func:`probe_steps`): what a scorer renders with."""
    steps = probe_steps(scorer, config)
    return lambda prompts, seeds: render_batch(comps, config, prompts, seeds, accelerator, steps=steps)


@torch.no_grad()
def render_batch(comps: Components, config: TrainingConfig, prompts: Sequence[str], seeds: Sequence[int],
                 accelerator: Accelerator, *, steps: int | None = None) -> list[Image.Image]:
    """Images of ``prompts`` (one seed each) with the model as it stands, batched and in the run's mixed precision
    (scoring probes, not published images), at ``steps`` denoising steps (default: the samples'); the global random
    state is left untouched, so a checkpoint never changes what training does next."""
    resolution = config.resolution or comps.unet.config.sample_size * comps.vae_scale_factor
    pipeline, images = sampling_pipeline(comps), []
    with torch.random.fork_rng(devices=[]), eager_sampling(), accelerator.autocast():
        for start in range(0, len(prompts), 16):
            chunk = list(range(start, min(start + 16, len(prompts))))
            generators = [torch.Generator("cpu").manual_seed(seeds[index]) for index in chunk]
            images += pipeline([prompts[index] for index in chunk],
                               num_inference_steps=steps or config.sample_steps, guidance_scale=config.guidance_scale,
                               height=resolution, width=resolution, generator=generators).images
    return images


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
    keeper: Keeper | None = None


def train(
    config: TrainingConfig,
    subject_images: SubjectImages | Path | str | Sequence[Path | str],
    output_dir: Path | str,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    overwrite: bool = False,
    placement: Placement | None = None,
    resume: bool = False,
    scorer: Scorer | None = None,
) -> TrainingResult:
    """Train ``config.method`` on the subject images and write the artifact folder ``output_dir``.

    Inputs are validated before the model loads; nothing appears at ``output_dir`` unless the run completes.
    ``resume``: continue the run killed while writing ``output_dir`` from its last checkpoint.
    ``scorer``: scores the checkpoints instead of the built-in one (the benchmarks' larger probe sets).
    """
    started = time.perf_counter()
    cancel = cancel or CancelFlag()
    config, images, base_path, tokenizer, output_dir = _check_inputs(config, subject_images, output_dir, overwrite)
    # Of the config as asked for: the memory plan may switch options on for this card, and a resume on the same
    # card must still match.
    run_fingerprint = fingerprint(config.to_dict(), images.images)
    resumed = _resume_state(run_fingerprint, output_dir, resume=resume, overwrite=overwrite)
    run = _load(config, base_path, tokenizer, placement, list(images.notes), cancel, progress, started)
    if resumed is not None and run.accelerator.num_processes > 1:
        raise artifacts.ArtifactError(f"{output_dir}: --resume runs in one process; continue the run without "
                                      "accelerate launch")
    run.keeper = _keeper(run, images, output_dir, resumed, scorer, run_fingerprint)
    try:
        class_latents = _class_latents(run)
        subject_latents, flip_offset = _subject_latents(run, images)
        summaries, training_seconds = _run_stages(run, subject_latents, flip_offset, class_latents)
        cancel.raise_if_cancelled()
    except BaseException as error:
        # Cancel means "I do not want this run"; a crash, Ctrl-C or a kill after a checkpoint keeps its state for
        # --resume, and only that: before the first checkpoint there is nothing to resume.
        folder = resume_dir(output_dir)
        if isinstance(error, TrainingCancelled) or not (folder / artifacts.RESUME_STATE_FILE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
        raise

    result = TrainingResult(output_dir, run.config, summaries, 0.0, training_seconds, run.placement.describe(),
                            notes=run.notes, seconds_checkpoints=run.keeper.checkpoint_s if run.keeper else 0.0)
    if run.accelerator.is_main_process:
        _write_artifact(run, result, overwrite)
    return result


def _resume_state(run_fingerprint: str, output_dir: Path, *, resume: bool, overwrite: bool) -> ResumeState | None:
    """The state a resumed run continues from (None for a new run), refused when it belongs to another run.

    A new run over an interrupted one's state needs ``overwrite``: that state may hold hours of training.
    """
    folder = resume_dir(output_dir)
    state = load_resume_state(folder) if folder.is_dir() else None
    if not resume:
        if state is not None and not overwrite:
            raise artifacts.ArtifactError(f"{output_dir}: an interrupted run of this folder can be continued with "
                                          "--resume (or started again with --overwrite)")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    if state is None:
        raise artifacts.ArtifactError(f"{output_dir}: no interrupted run to resume (none reached a checkpoint)")
    if state.fingerprint != run_fingerprint:
        raise artifacts.ArtifactError(f"{output_dir}: the interrupted run used other settings or photos; resume "
                                      "it with the same ones, or start again with --overwrite")
    return state


def _keeper(run: _Run, images: SubjectImages, output_dir: Path, resumed: ResumeState | None,
            scorer: Scorer | None, run_fingerprint: str) -> Keeper | None:
    """The run's checkpoint keeper: the schedule, the scorer, and the checkpoints a resumed run already took."""
    if not run.accelerator.is_main_process:
        return None
    from .checkpoints import read_table

    folder = resume_dir(output_dir)
    stages = run.recipe.stages
    steps = checkpoint_steps([stage.steps for stage in stages], run.config.checkpoints)
    ends = list(itertools.accumulate(stage.steps for stage in stages))
    schedule = {step: next(s.name for s, end in zip(stages, ends, strict=True) if step <= end) for step in steps}
    full_unet_bytes = 2 * sum(p.numel() for p in run.components.unet.parameters())
    table = read_table(folder) if resumed else None
    if scorer is None and run.config.score_checkpoints:
        scorer = _checkpoint_scorer(run, images)
    snapshotter = Snapshotter(folder / artifacts.CHECKPOINTS_DIR, schedule, scorer,
                              run.config.keep_step, table, prunes_weights=full_unet_bytes > FULL_UNET_KEEP_ALL_BYTES)
    if resumed is not None:
        snapshotter.forget_after(resumed.step)
        run.notes.append(f"resumed from the checkpoint at step {resumed.step}")
    return Keeper(folder, snapshotter, run_fingerprint, resumed,
                  finished=[StageSummary(**values) for values in (resumed.stage_summaries if resumed else [])])


def _checkpoint_scorer(run: _Run, images: SubjectImages) -> Scorer | None:
    """The mini world's analytic checker; on other bases CLIP and DINO when their weights are already on this
    machine (a download in the middle of a run is not worth it), else none: the grid shows each checkpoint's
    samples."""
    config = run.config
    if not config.on_mini_world:
        from .evaluation import FeatureModels, FeatureScorer

        try:
            models = FeatureModels(device=run.placement.device, local_files_only=True)
        except (OSError, ValueError):
            run.notes.append("checkpoints are not scored: the CLIP and DINO weights are not on this machine "
                             "(python -m personalization evaluate downloads them); compare their samples")
            return None
        kind = "live" if config.subject_type in ("pet", "person") else "object"
        return FeatureScorer(models, images.images, config.trigger_token, config.class_noun, kind=kind)
    from .mini_world.checker import read_image
    from .mini_world.scoring import MiniWorldScorer

    colors = sorted({color for image in images.images if (color := read_image(image).color)})
    return MiniWorldScorer(images.images, config.trigger_token, config.class_noun, colors)


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
    # The photos are judged before the base model's files: a bad photo is the user's to fix whatever the model.
    families.check_options(families.detect_family(base_path), config.train_text_encoder)
    tokenizer = _check_trigger_early(base_path, config)
    config = dataclasses.replace(config, base_model=base_model, resolution=resolution)
    check_keep_step(config.keep_step, checkpoint_steps([s.steps for s in recipe_for(config).stages],
                                                       config.checkpoints))
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
        trigger_id = add_trigger_tokens(comps.tokenizers, comps.text_encoders, config.trigger_token,
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
    """Run the recipe's stages in order (after a resume, from where the killed run stopped); return their
    summaries and the seconds of training, checkpoints left out."""
    keeper = run.keeper
    if run.config.compile_unet:
        # Regional: each repeated transformer block is compiled once per shape, a fraction of a whole-U-Net
        # compile's warm-up. The warm-up happens in the first steps and is counted in the training time.
        run.components.unet.compile_repeated_blocks()
    if keeper is not None and keeper.snapshotter.scorer is not None:
        scorer = keeper.snapshotter.scorer  # the base model's probes render as the checkpoints' do
        scorer.prepare(probe_renderer(run.components, run.config, run.accelerator, scorer))
    resumed = keeper.resumed if keeper else None
    summaries: list[StageSummary] = list(keeper.finished) if keeper else []
    if resumed is not None and resumed.trigger_rows and run.trigger_id is not None:
        with torch.no_grad():
            for encoder, row in zip(run.components.text_encoders, resumed.trigger_rows, strict=True):
                encoder.get_input_embeddings().weight[run.trigger_id] = row
    training_started = time.perf_counter()
    if keeper is not None:
        keeper.training_started = training_started
    steps_before, clock = 0, eta_clock(run)
    for index, stage in enumerate(run.recipe.stages):
        stage_resume = None
        if resumed is not None and steps_before + stage.steps <= resumed.step:
            steps_before += stage.steps  # finished before the kill: its summary came with the state
            continue
        if resumed is not None:
            if resumed.step > steps_before:
                stage_resume = resumed
            else:
                torch.set_rng_state(resumed.rng)  # the kill came at this stage's start
            resumed = None
        ctx = StageContext(run.components, run.config, run.placement, run.accelerator, subject_latents, flip_offset,
                           class_latents, run.trigger_id, run.cancel, run.progress, run.started, steps_before,
                           run.recipe.total_steps, run.config.sample_prompts()[0], clock, index, keeper, stage_resume)
        summaries.append(run_stage(stage, ctx))
        steps_before += stage.steps
        if keeper is not None:
            keeper.finished.append(summaries[-1])
            if keeper.snapshotter.due(steps_before):
                take_checkpoint(stage, ctx, stage.steps, summaries[-1].final_loss)
    seconds = time.perf_counter() - training_started
    if keeper is not None:
        seconds = keeper.training_seconds(time.perf_counter())
    return summaries, seconds


def eta_clock(run: _Run) -> EtaClock:
    """The run's ETA, starting from the estimate the app showed before Start (jobs.estimate_run) for this device."""
    estimate = estimate_run(run.config, run.placement.describe(), run.config.base_model or "")
    planned = [(stage.steps, estimate.step_s(stage.trainable == "embedding")) for stage in run.recipe.stages]
    return EtaClock(planned, tail_s=estimate.samples_s)


def _write_artifact(run: _Run, result: TrainingResult, overwrite: bool) -> None:
    """The kept checkpoint's weights and samples, every checkpoint, config, summary and card into
    ``result.output_dir``, renamed into place in one step; then the run's resume folder goes."""
    config, keeper = run.config, run.keeper
    assert keeper is not None, "the main process keeps the checkpoints"
    table = keeper.snapshotter.table
    table.kept_step = table.resolve(config.keep_step)
    with artifacts.atomic_output_dir(result.output_dir, overwrite=overwrite) as staging:
        artifacts.link_tree(keeper.snapshotter.folder, staging / artifacts.CHECKPOINTS_DIR)
        saved = {**config.to_dict(), "base_model": portable_base_model(config.base_model)}
        result.seconds_total = time.perf_counter() - run.started
        sample_names = lay_out_kept_step(staging, table, saved,
                                         {**summary_dict(result), "family": run.components.family.key})
    shutil.rmtree(keeper.folder, ignore_errors=True)
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
        "seconds_checkpoints": round(result.seconds_checkpoints, 2),
        "stages": [
            {"name": s.name, "steps": s.steps, "seconds": round(s.seconds, 2), "mean_step_ms": round(s.mean_step_ms, 2),
             "final_loss": None if s.final_loss is None else round(s.final_loss, 5)}
            for s in result.stages
        ],
    }


def sample_batch_size(resolution: int) -> int:
    """How many samples one pipeline call renders: as many as :data:`SAMPLE_BATCH_PIXELS` holds, at least one."""
    return max(1, SAMPLE_BATCH_PIXELS // resolution**2)


def _render_samples(comps: Components, config: TrainingConfig, cancel: CancelFlag) -> Iterator[Image.Image]:
    """The card's samples (sample i: prompt i, seed + i), in batches of :func:`sample_batch_size` (a generator: each
    batch is written before the next is rendered)."""
    if not config.sample_count:
        return
    pipeline = sampling_pipeline(comps)
    prompts = config.sample_prompts()
    resolution = config.resolution or 512
    batch = sample_batch_size(resolution)
    for start in range(0, config.sample_count, batch):
        cancel.raise_if_cancelled()
        indices = range(start, min(start + batch, config.sample_count))
        # One generator per image, seeded as when they were rendered one at a time: the same starting noise.
        generators = [torch.Generator("cpu").manual_seed(config.seed + index) for index in indices]
        with torch.no_grad(), eager_sampling():
            images = pipeline([prompts[index % len(prompts)] for index in indices],
                              num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale,
                              height=resolution, width=resolution, generator=generators).images
        yield from images
