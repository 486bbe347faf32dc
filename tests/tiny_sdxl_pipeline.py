"""A tiny SDXL-shaped pipeline (two CLIP text encoders, a text_time U-Net) built offline from configs with random
weights: what tests train and round-trip instead of the 7 GB base."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tests.tiny_pipeline import TINY_RESOLUTION, TOKENIZER_DIR

HIDDEN_L, HIDDEN_G, PROJECTION = 32, 32, 32
TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 time ids is embedded to this size


def clip_config(hidden: int, **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, **extra)


def build_tiny_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """Save a random tiny SDXL pipeline (64 px images, 8x8 latents) to ``folder`` and return it."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), cross_attention_dim=HIDDEN_L + HIDDEN_G, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=TINY_RESOLUTION, scaling_factor=0.13025, force_upcast=True,
    )
    text_encoder = CLIPTextModel(clip_config(HIDDEN_L))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(HIDDEN_G, projection_dim=PROJECTION))
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    # SDXL's second tokenizer pads with "!" (id 0), as the real base does.
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77, pad_token="!")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(folder)
    return folder
