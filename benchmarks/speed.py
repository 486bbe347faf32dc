"""Speed benchmark: ms/step and peak memory of every step type, and end-to-end time of each method's recipe.

    python benchmarks/speed.py --model mini            # CPU (or GPU) with the bundled mini model
    python benchmarks/speed.py --model sd15-random     # SD-1.5 shapes, random weights, 512 px (a GPU run)
    python benchmarks/speed.py --model sdxl-random     # SDXL shapes, random weights, 1024 px (a GPU run, bf16)
    python benchmarks/speed.py --model tiny --steps 4  # seconds-long smoke run (what the tests use)

Everything runs through the engine's own `train()`; step times come from its progress events (median after a
warm-up), so the numbers are what users get. The reference row reproduces the diffusers DreamBooth example's step
(VAE encode and text encoder every step, instance + class batch, no caches) on the same modules, so the ratio to
our cached steps is measured rather than assumed (SD-1.x shapes only: the example's step has no SDXL conditioning).
Prints one Markdown table with hardware, date and commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from personalization.config import TrainingConfig  # noqa: E402
from personalization.device import BUNDLED_MINI_MODEL, choose_placement, resolve_base_model_path  # noqa: E402
from personalization.progress import ProgressEvent  # noqa: E402
from personalization.trainer import default_resolution, train  # noqa: E402

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "sample_size": 512,
}
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
# stabilityai/stable-diffusion-xl-base-1.0's configs: U-Net 2567 M parameters, CLIP-L and OpenCLIP bigG encoders.
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_BIGG_TEXT = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                  "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}

# --model choices: the bundled mini model, or the kind of random-weight pipeline build_random_pipeline makes.
MODELS = {"mini": "mini", "sd15-random": "sd15", "sdxl-random": "sdxl", "tiny": "tiny", "sdxl-tiny": "sdxl-tiny"}
# (label, config changes) per recipe; step counts are the method defaults unless --steps is given.
RECIPES = [
    ("two_stage (lora)", {"method": "two_stage", "stage2_mode": "lora"}),
    ("two_stage (full)", {"method": "two_stage", "stage2_mode": "full"}),
    ("textual_inversion", {"method": "textual_inversion"}),
    ("dreambooth + prior", {"method": "dreambooth", "prior_preservation": True}),
    ("dreambooth", {"method": "dreambooth"}),
    ("dreambooth_lora", {"method": "dreambooth_lora"}),
    ("dreambooth_lora + prior", {"method": "dreambooth_lora", "prior_preservation": True}),
]
# The same recipes with the memory and speed options: what a 16 GB / 8 GB card runs, and regional compilation.
VARIANTS = [
    ("two_stage (full) + 8-bit Adam + checkpointing",
     {"method": "two_stage", "stage2_mode": "full", "use_8bit_adam": True, "gradient_checkpointing": True}),
    ("two_stage (lora) + checkpointing",
     {"method": "two_stage", "stage2_mode": "lora", "gradient_checkpointing": True}),
    # The 24 GB plan of an SDXL LoRA (device.plan_memory): its peak is the README's target.
    ("two_stage (lora) + checkpointing + 8-bit Adam",
     {"method": "two_stage", "stage2_mode": "lora", "gradient_checkpointing": True, "use_8bit_adam": True}),
    ("two_stage (full) + compile", {"method": "two_stage", "stage2_mode": "full", "compile_unet": True}),
]


def build_random_pipeline(folder: Path, kind: str) -> Path:
    """A pipeline folder with random weights in SD-1.5's shapes (or tiny ones), plus the real CLIP tokenizer."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind == "tiny":
        from tests.tiny_pipeline import build_tiny_pipeline

        return build_tiny_pipeline(folder)
    if kind == "sdxl-tiny":
        from tests.tiny_sdxl_pipeline import build_tiny_sdxl_pipeline

        return build_tiny_sdxl_pipeline(folder)
    if kind == "sdxl":
        return build_random_sdxl_pipeline(folder)
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "personalization" / "assets" / "clip_tokenizer")
    scheduler_config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                        "num_train_timesteps": 1000, "steps_offset": 1, "skip_prk_steps": True}
    # Initialising 1.1 B random weights takes a minute on a CPU and seconds on the GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        modules = {"vae": AutoencoderKL(**SD15_VAE), "unet": UNet2DConditionModel(**SD15_UNET),
                   "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))}
    pipeline = StableDiffusionPipeline(
        **modules, tokenizer=tokenizer,
        scheduler=PNDMScheduler(**scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def build_random_sdxl_pipeline(folder: Path) -> Path:
    """A pipeline folder with random weights in SDXL's shapes, saved in bf16 (the trainer loads fp32 masters)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tokenizers = ROOT / "personalization" / "assets" / "clip_tokenizer"
    # Initialising 3.5 B random weights takes minutes on a CPU and seconds on the GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        modules = {"vae": AutoencoderKL(**SDXL_VAE), "unet": UNet2DConditionModel(**SDXL_UNET),
                   "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
                   "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT))}
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipeline = StableDiffusionXLPipeline(
        **modules, tokenizer=CLIPTokenizer.from_pretrained(tokenizers),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers, pad_token="!"), scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.to(torch.bfloat16).save_pretrained(folder)
    return folder


def subject_folder(folder: Path, resolution: int, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        array = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"{index}.png")
    return folder


@dataclass
class StageTiming:
    stage: str
    median_ms: float
    peak_gib: float | None


def timed_run(base: str, subject: Path, changes: dict, steps: int | None, class_images: int | None,
              out: Path) -> tuple[list[StageTiming], float, float]:
    """Train once; return per-stage median step time (after 3 warm-up steps) and peak memory, total and train time."""
    stamps: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    cuda = torch.cuda.is_available()

    def record(event: ProgressEvent) -> None:
        if event.loss is None:
            return
        if event.stage not in stamps:
            stamps[event.stage] = []
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        stamps[event.stage].append(time.perf_counter())
        if cuda:
            peaks[event.stage] = torch.cuda.max_memory_allocated() / 2**30

    values = {"class_noun": "object", "base_model": base, "sample_count": 0, **changes}
    if steps is not None:
        values.update(stage1_steps=steps, stage2_steps=steps)
    if class_images is not None:
        values["class_images"] = class_images
    started = time.perf_counter()
    result = train(TrainingConfig(**values), subject, out, progress=record)
    total = time.perf_counter() - started
    timings = []
    for stage, times in stamps.items():
        gaps = np.diff(times)[2:] if len(times) > 4 else np.diff(times)
        median = 1000 * float(statistics.median(gaps)) if len(gaps) else float("nan")
        timings.append(StageTiming(stage, median, peaks.get(stage)))
    return timings, total, result.seconds_training


def reference_dreambooth_step(base_path: str, resolution: int, repeats: int) -> float:
    """ms of one step shaped like the diffusers DreamBooth example: encode both images and both prompts, then step."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    placement = choose_placement()
    device, dtype = placement.device, placement.compute_dtype
    vae = AutoencoderKL.from_pretrained(base_path, subfolder="vae").to(device, dtype)
    text = CLIPTextModel.from_pretrained(base_path, subfolder="text_encoder").to(device, dtype)
    unet = UNet2DConditionModel.from_pretrained(base_path, subfolder="unet").to(device)
    tokenizer = CLIPTokenizer.from_pretrained(base_path, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(base_path, subfolder="scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-6, fused=device.type == "cuda")
    pixels = torch.randn(2, 3, resolution, resolution, device=device, dtype=dtype)
    ids = tokenizer(["a photo of sks object", "a photo of a object"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids.to(device)
    times = []
    for _ in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            conditioning = text(ids)[0]
        noise = torch.randn_like(latents)
        steps = torch.randint(0, 1000, (2,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(scheduler.add_noise(latents, noise, steps).float(), steps, conditioning).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[3:])


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="mini")
    parser.add_argument("--steps", type=int, help="steps per stage (default: each method's default recipe)")
    parser.add_argument("--class-images", type=int, help="prior-preservation images (default: the config's)")
    parser.add_argument("--recipes", nargs="*", help="labels to run (default: all, variants included)")
    parser.add_argument("--reference-repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        if args.model == "mini":
            base = BUNDLED_MINI_MODEL
            base_path = resolve_base_model_path(base)
        else:
            base_path = str(build_random_pipeline(scratch / "base", MODELS[args.model]))
            base = base_path
        resolution = default_resolution(base_path)
        subject = subject_folder(scratch / "subject", resolution)
        rows = []
        for label, changes in RECIPES + VARIANTS:
            if args.recipes and label not in args.recipes:
                continue
            timings, total, training = timed_run(base, subject, changes, args.steps, args.class_images,
                                                 scratch / label.replace(" ", "_"))
            for timing in timings:
                rows.append({"recipe": label, "stage": timing.stage, "ms_per_step": round(timing.median_ms, 1),
                             "peak_gib": None if timing.peak_gib is None else round(timing.peak_gib, 2),
                             "train_s": round(training, 1), "end_to_end_s": round(total, 1)})
                print(f"measured: {rows[-1]}", flush=True)  # a device call cut off at its limit keeps these
            if args.json:
                args.json.write_text(json.dumps({"hardware": choose_placement().describe(), "model": args.model,
                                                 "partial": True, "rows": rows}, indent=2))
        if not MODELS[args.model].startswith("sdxl"):
            reference = reference_dreambooth_step(base_path, resolution, args.reference_repeats)
            rows.append({"recipe": "reference: diffusers DreamBooth step", "stage": "VAE+text every step, bs 1+1",
                         "ms_per_step": round(reference, 1), "peak_gib": None, "train_s": None,
                         "end_to_end_s": None})

    hardware = choose_placement().describe()
    print(f"\n{args.model} at {resolution} px on {hardware}; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; commit {commit()}\n")
    print("| recipe | stage | ms/step | peak GiB | training s | end-to-end s |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} | {row['stage']} | {row['ms_per_step']} | {row['peak_gib'] or '-'} | "
              f"{row['train_s'] if row['train_s'] is not None else '-'} | "
              f"{row['end_to_end_s'] if row['end_to_end_s'] is not None else '-'} |")
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
