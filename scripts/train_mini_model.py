"""Train the bundled mini base model from scratch on the synthetic world (personalization/mini_world).

Phase 1 trains the VAE (world images plus generic two-colour patterns, so it can encode textured subjects it has
never seen). Phase 2 encodes a fixed set of plain world scenes (held-out triples excluded) to latents once and trains
the CLIP text encoder and the U-Net jointly on them: v-prediction on a zero-terminal-SNR schedule, min-SNR-5 loss
weighting, 10% empty captions so classifier-free guidance works, EMA weights for export.

Every run is reproducible from --seed: the data and noise of step k depend only on (seed, k), so a resumed run
continues exactly where the checkpoint left off. Checkpoints (model, EMA, optimizer, step, RNG) go to --ckpt-dir
every --checkpoint-minutes; the EMA pipeline is exported in fp16 to --out every --export-minutes (written to a
temporary folder, then renamed, so the shipped folder is never half-written) and once more at the end.

CPU run (the shipped model):   python scripts/train_mini_model.py --threads 1 --deadline 06:30
GPU recipe:                    python scripts/train_mini_model.py --device cuda --batch-size 256 --steps 20000 \
                                   --vae-steps 20000 --vae-batch-size 128 --dataset-size 300000
Restarting the same command resumes from the checkpoints; --fresh ignores them.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from personalization.config import MINI_WORLD_NAME  # noqa: E402
from personalization.mini_world import world  # noqa: E402

TOKENIZER_DIR = REPO / "personalization" / "assets" / "clip_tokenizer"
DEFAULT_OUT = REPO / "personalization" / "assets" / "mini_model"
DEFAULT_CKPT = REPO / ".mini_model_checkpoints"


def log(msg: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", flush=True)


def parse_deadline(text: str | None) -> float | None:
    """'06:30' (UTC, today or tomorrow if already past), '+90' or '90' (minutes from now) -> epoch seconds."""
    if not text:
        return None
    if ":" in text:
        hh, mm = (int(x) for x in text.split(":"))
        now = dt.datetime.now(dt.UTC)
        target = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if target < now - dt.timedelta(hours=12):
            target += dt.timedelta(days=1)
        return target.timestamp()
    return time.time() + float(text.lstrip("+")) * 60


# ---------------------------------------------------------------------------------------------------------------
# Models


def make_vae(args: argparse.Namespace) -> AutoencoderKL:
    channels = tuple(int(c) for c in args.vae_channels.split(","))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        # Per-channel group norm (groups == channels) kept a prototype VAE stuck at the mean image.
        norm_num_groups=4,
        sample_size=args.size,
    )


def make_text_encoder(args: argparse.Namespace) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=args.text_hidden,
        intermediate_size=args.text_hidden * 4,
        num_hidden_layers=args.text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=args.text_hidden,
    )
    return CLIPTextModel(config)


def make_unet(args: argparse.Namespace, latent_size: int) -> UNet2DConditionModel:
    channels = tuple(int(c) for c in args.unet_channels.split(","))
    down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=args.unet_layers,
        cross_attention_dim=args.text_hidden,
        attention_head_dim=4,
        norm_num_groups=min(32, channels[0]),
    )


def make_noise_scheduler() -> DDPMScheduler:
    # v-prediction on a zero-terminal-SNR schedule: with epsilon prediction on a linear schedule a small CPU run
    # learned to ignore the text; "trailing" spacing is what samplers need with zero terminal SNR.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        steps_offset=1,
    )


def load_tokenizer(max_tokens: int) -> CLIPTokenizer:
    # The shipped tokenizer pads to max_tokens (32), not 77: cross-attention over 77 mostly-padding tokens more than
    # doubled the CPU cost of a training step, and the world's prompts are about a dozen tokens long.
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=max_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and export


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def export_pipeline(
    args: argparse.Namespace,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    info: dict,
) -> None:
    """Save an fp16 StableDiffusionPipeline to args.out via a temporary folder and renames."""
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp_export")
    old = out.with_name(out.name + ".old_export")
    for path in (tmp, old):
        if path.exists():
            shutil.rmtree(path)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(args.max_tokens),
        unet=unet,
        # Shipped with the sampler it is evaluated with, so a plain from_pretrained pipeline samples well.
        scheduler=DDIMScheduler.from_config(make_noise_scheduler().config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Components are copies made for export, so casting them does not touch the training weights.
    pipe.to(torch.float16)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    declare_fp32_text_encoder(tmp)
    # save_pretrained writes a 3.6 MB tokenizer.json; the vocab/merges pair is 1.5 MB and loads the same tokenizer.
    tok_dir = tmp / "tokenizer"
    shutil.rmtree(tok_dir)
    tok_dir.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "PROVENANCE.md"):
        shutil.copy(TOKENIZER_DIR / name, tok_dir / name)
    tok_config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = args.max_tokens
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def declare_fp32_text_encoder(folder: Path) -> None:
    """Have transformers load the fp16-stored text encoder as fp32 unless a caller asks for another dtype.

    transformers 5 loads a model in the dtype its config names, and save_pretrained writes the weights' fp16, while
    diffusers loads the U-Net and VAE in fp32: a plain from_pretrained pipeline then mixed dtypes and failed, and
    diffusers' textual-inversion example trained an fp16 embedding with AdamW (NaN at step 1). fp16 weights keep the
    folder under 40 MB, and widening them to fp32 is exact.
    """
    config_file = folder / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    # deepcopy, not a fresh model + state dict: the VAE's latent scaling_factor lives in its config.
    return copy.deepcopy(module).eval()


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: VAE


def vae_batch(seed: int, step: int, batch: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, 1, step])
    images = []
    for i in range(batch):
        if i % 2 == 0:
            images.append(world.render(world.sample_scene(rng, allow_held_out=True), size))
        else:
            images.append(world.render_random_textured(rng, size))
    arr = np.stack([world.to_array(im) for im in images]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_vae(args: argparse.Namespace, device: torch.device, deadline: float | None) -> AutoencoderKL:
    ckpt_dir = Path(args.ckpt_dir)
    final = ckpt_dir / "vae_final.pt"
    if final.exists():
        vae = make_vae(args)
        state = torch.load(final, map_location="cpu", weights_only=False)
        vae.load_state_dict(state["vae"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        log(f"VAE: loaded finished VAE (scaling_factor {state['scaling_factor']:.4f}, PSNR {state['psnr']:.2f} dB)")
        return vae.to(device)

    torch.manual_seed(args.seed)
    vae = make_vae(args).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = 0
    path = ckpt_dir / "vae.pt"
    if path.exists() and not args.fresh:
        state = torch.load(path, map_location="cpu", weights_only=False)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"VAE: resumed at step {step}")
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE: {n_params / 1e6:.2f}M params, {args.vae_steps} steps of batch {args.vae_batch_size}")
    last_ckpt = time.time()
    t0, s0 = time.time(), step
    while step < args.vae_steps:
        cosine = 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        lr = args.vae_lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * cosine)
        for group in opt.param_groups:
            group["lr"] = lr
        x = vae_batch(args.seed, step, args.vae_batch_size, args.size).to(device)
        torch.manual_seed(args.seed * 1_000_003 + step)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        # Small L1 term sharpens edges; the KL term only keeps the latents bounded.
        loss = mse + 0.1 * F.l1_loss(recon, x) + args.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            rate = (step - s0) * args.vae_batch_size / (time.time() - t0)
            log(f"VAE step {step}/{args.vae_steps} loss {loss.item():.5f} psnr {psnr:.2f} dB {rate:.0f} img/s")
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            atomic_save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng_state()}, path)
            last_ckpt = time.time()
        if deadline is not None and time.time() > deadline:
            log("VAE: deadline reached before the VAE finished; stopping the VAE phase early")
            break

    vae.eval()
    with torch.no_grad():
        x = torch.cat([vae_batch(args.seed + 999, i, 64, args.size) for i in range(8)]).to(device)
        plain = torch.cat([vae_batch_plain(args.seed + 998, i, 64, args.size).to(device) for i in range(8)])
        latents = vae.encode(plain).latent_dist.mean
        scaling = float(1.0 / latents.std())
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        psnr = 10 * math.log10(4.0 / F.mse_loss(recon, x).item())
    vae.register_to_config(scaling_factor=scaling)
    atomic_save({"vae": vae.state_dict(), "scaling_factor": scaling, "psnr": psnr, "step": step}, final)
    log(f"VAE: done at step {step}; held-out PSNR {psnr:.2f} dB, latent scaling_factor {scaling:.4f}")
    return vae


def vae_batch_plain(seed: int, step: int, batch: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, 2, step])
    arr = np.stack([world.to_array(world.render(world.sample_scene(rng), size)) for _ in range(batch)])
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: text encoder + U-Net


def build_latent_dataset(
    args: argparse.Namespace, vae: AutoencoderKL, device: torch.device
) -> tuple[list[world.Scene], torch.Tensor]:
    path = Path(args.ckpt_dir) / "latents.pt"
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["n"] == args.dataset_size and state["size"] == args.size:
            log(f"dataset: loaded {state['n']} cached latents")
            return [world.Scene(**s) for s in state["scenes"]], state["latents"]
    rng = np.random.default_rng([args.seed, 3])
    scenes = [world.sample_scene(rng) for _ in range(args.dataset_size)]
    chunks = []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            arr = np.stack([world.to_array(world.render(s, args.size)) for s in scenes[i : i + 256]])
            x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).to(device)
            chunks.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).cpu())
            if (i // 256) % 40 == 0:
                log(f"dataset: encoded {i + len(arr)}/{len(scenes)} ({time.time() - t0:.0f} s)")
    latents = torch.cat(chunks)
    atomic_save(
        {
            "n": len(scenes),
            "size": args.size,
            "scenes": [s.__dict__ for s in scenes],
            "latents": latents,
        },
        path,
    )
    log(f"dataset: {len(scenes)} latents {tuple(latents.shape[1:])}, std {latents.std():.3f}")
    return scenes, latents


class Tokens:
    """Caches token ids per caption: the captions come from a small vocabulary of templates."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokenizer = load_tokenizer(max_tokens)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
            ).input_ids
            self.cache.update(zip(missing, ids, strict=True))
        return torch.stack([self.cache[c] for c in captions])


def train_diffusion(args: argparse.Namespace, vae: AutoencoderKL, device: torch.device, deadline: float | None) -> None:
    scenes, latents = build_latent_dataset(args, vae, device)
    latent_size = latents.shape[-1]
    torch.manual_seed(args.seed + 1)
    unet = make_unet(args, latent_size).to(device)
    text_encoder = make_text_encoder(args).to(device)
    ema_unet = copy_module(unet).to(device).requires_grad_(False)
    ema_text = copy_module(text_encoder).to(device).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    scheduler = make_noise_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod).clamp(min=1e-8)
    # min-SNR-5 weighting for v-prediction: w = min(snr, 5) / (snr + 1).
    loss_weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    tokens = Tokens(args.max_tokens)

    ckpt = Path(args.ckpt_dir) / "diffusion.pt"
    step = 0
    if ckpt.exists() and not args.fresh:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        log(f"diffusion: resumed at step {step}")
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    log(f"diffusion: U-Net {n_unet / 1e6:.2f}M params, text encoder {n_text / 1e6:.2f}M, latents {latent_size}px")

    ema_pairs = [(e, p) for e, p in zip(ema_unet.parameters(), unet.parameters(), strict=True)]
    ema_pairs += [(e, p) for e, p in zip(ema_text.parameters(), text_encoder.parameters(), strict=True)]

    def info() -> dict:
        return {
            "world": MINI_WORLD_NAME,  # how the engine recognizes this model wherever the folder is
            "step": step,
            "batch_size": args.batch_size,
            "samples_seen": step * args.batch_size,
            "image_size": args.size,
            "seed": args.seed,
            "held_out_combos": [list(c) for c in world.HELD_OUT_COMBOS],
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "ckpt_dir")},
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "sampling": "DDIMScheduler.from_config(pipe.scheduler.config), 25 steps, guidance_scale 5",
        }

    def save_checkpoint() -> None:
        atomic_save(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "rng": rng_state(),
            },
            ckpt,
        )

    def export() -> None:
        export_pipeline(
            args,
            copy_module(vae),
            copy_module(ema_text),
            copy_module(ema_unet),
            info(),
        )
        log(f"exported EMA pipeline at step {step} to {args.out}")

    last_ckpt = last_export = time.time()
    t0, s0 = time.time(), step
    total = args.steps
    unet.train()
    text_encoder.train()
    while total is None or step < total:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if total is not None:
            # Cosine decay to 10% over the last half when the length is known (GPU recipe).
            frac = max(0.0, (step - total / 2) / (total / 2))
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        elif deadline is not None:
            # Deadline runs: decay linearly to 10% over the last --decay-minutes, computed from the clock so that
            # it survives restarts.
            remaining = (deadline - time.time()) / (args.decay_minutes * 60)
            lr *= 0.1 + 0.9 * min(1.0, max(0.0, remaining))
        for group in opt.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng([args.seed, 4, step])
        idx = rng.integers(0, len(scenes), size=args.batch_size)
        captions = ["" if rng.random() < args.caption_dropout else world.caption(scenes[i], rng) for i in idx]
        x0 = latents[torch.from_numpy(idx)].to(device)
        ids = tokens(captions).to(device)
        gen = torch.Generator(device="cpu").manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        # bf16 autocast: about 30% faster on this CPU (avx512_bf16); the weights and optimizer stay fp32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            cond = text_encoder(ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in ema_pairs:
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            rate = (step - s0) * args.batch_size / (time.time() - t0)
            log(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {rate:.1f} samples/s seen {step * args.batch_size}")
        now = time.time()
        done = deadline is not None and now > deadline
        if now - last_ckpt > args.checkpoint_minutes * 60 or done:
            save_checkpoint()
            last_ckpt = now
        if now - last_export > args.export_minutes * 60 or done:
            export()
            last_export = now
        if done:
            log("deadline reached; final checkpoint and export written")
            return
    save_checkpoint()
    export()
    log(f"finished {step} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--vae-channels", default="32,64,64")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-6)
    parser.add_argument("--unet-channels", default="64,128,256")
    parser.add_argument("--unet-layers", type=int, default=1)
    parser.add_argument("--text-hidden", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokenizer model_max_length of the pipeline")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false", help="train in fp32")
    parser.add_argument("--text-layers", type=int, default=3)
    parser.add_argument("--dataset-size", type=int, default=60000, help="number of pre-encoded training scenes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="U-Net steps (default: until --deadline)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--decay-minutes", type=float, default=20.0, help="LR decay window before --deadline")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--deadline", default=None, help="UTC 'HH:MM' or minutes from now; then export and stop")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--export-minutes", type=float, default=10.0)
    parser.add_argument("--stop-after-vae", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    args = parser.parse_args()
    if args.steps is None and args.deadline is None:
        parser.error("give --steps or --deadline")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    Path(args.ckpt_dir).mkdir(parents=True, exist_ok=True)
    deadline = parse_deadline(args.deadline)
    if args.fresh:
        for name in ("vae.pt", "vae_final.pt", "latents.pt", "diffusion.pt"):
            (Path(args.ckpt_dir) / name).unlink(missing_ok=True)
    log(f"args: {vars(args)}")
    vae = train_vae(args, device, deadline)
    if args.stop_after_vae:
        return
    vae.requires_grad_(False).eval()
    train_diffusion(args, vae, device, deadline)


if __name__ == "__main__":
    main()
