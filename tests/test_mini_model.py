"""The bundled mini model must work in the plain diffusers calls people copy from docs, not only in the engine.

The weights are stored in fp16 to keep the folder small; these calls pass no dtype and must still get fp32 modules.
Everything loads from the local folder, so nothing here reaches the network.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from personalization.device import MINI_MODEL_DIR


def test_plain_from_pretrained_without_a_dtype_loads_fp32_and_generates():
    pipe = StableDiffusionPipeline.from_pretrained(str(MINI_MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    dtypes = {name: module.dtype for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    assert set(dtypes) == {"text_encoder", "unet", "vae"}
    assert all(dtype == torch.float32 for dtype in dtypes.values()), dtypes
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe("a photo of a red circle", num_inference_steps=2, height=size, width=size,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (size, size, 3)
    assert np.isfinite(image).all()
    assert image.max() > 0.1  # an all-black image is what NaN latents decode to after clipping


def test_an_explicit_dtype_is_still_honoured():
    pipe = StableDiffusionPipeline.from_pretrained(str(MINI_MODEL_DIR), dtype=torch.float16)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float16}


def test_textual_inversion_script_recipe_keeps_the_embedding_finite():
    """What diffusers' examples/textual_inversion/textual_inversion.py does: the text encoder as loaded (no
    dtype), a new token initialised from a word, AdamW on the embedding matrix, the other rows restored."""
    tokenizer = CLIPTokenizer.from_pretrained(str(MINI_MODEL_DIR), subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(str(MINI_MODEL_DIR), subfolder="text_encoder")
    tokenizer.add_tokens(["<my-star>"])
    new_id = tokenizer.convert_tokens_to_ids("<my-star>")
    init_id = tokenizer.encode("star", add_special_tokens=False)[0]
    text_encoder.resize_token_embeddings(len(tokenizer))
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[new_id] = embeddings[init_id].clone()
    original = embeddings.detach().clone()
    text_encoder.requires_grad_(False)
    text_encoder.get_input_embeddings().requires_grad_(True)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=5e-4)

    ids = tokenizer(["a photo of a <my-star> star"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    hidden = text_encoder(ids)[0]
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.mse_loss(hidden.float(), target)  # the script takes its loss in fp32
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[new_id] = False
        embeddings[keep] = original[keep]

    assert torch.isfinite(embeddings).all()
    assert not torch.equal(embeddings[new_id], original[new_id])  # the step did move the new row
    assert torch.isfinite(text_encoder(ids)[0]).all()
