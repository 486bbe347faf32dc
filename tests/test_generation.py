"""Round trips: what the engine generates equals what plain diffusers makes of the artifact folder, bit for bit."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from personalization.config import TrainingConfig
from personalization.generation import GenerationRequest, Generator
from personalization.trainer import train

ARTIFACT_SPECS = {
    "two_stage_lora": {"method": "two_stage", "stage2_mode": "lora"},
    "two_stage_full": {"method": "two_stage", "stage2_mode": "full"},
    "textual_inversion": {"method": "textual_inversion"},
    "dreambooth_text": {"method": "dreambooth", "train_text_encoder": True},
    "dreambooth_lora": {"method": "dreambooth_lora"},
}


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    from tests.conftest import make_subject_images

    root = tmp_path_factory.mktemp("trained")
    subject = make_subject_images(root / "subject")
    folders = {}
    for name, changes in ARTIFACT_SPECS.items():
        # Large learning rates so a few steps visibly change the model.
        config = TrainingConfig(class_noun="box", base_model=str(tiny_base), stage1_steps=3, stage2_steps=3,
                                stage1_learning_rate=0.5, stage2_learning_rate=5e-2, sample_count=1,
                                sample_steps=2, **changes)
        folders[name] = train(config, subject, root / name).output_dir
    return folders


def plain_diffusers_image(base, folder, prompt, seed, full_unet=False, text_encoder=False, embeddings=True,
                          lora=False):
    kwargs = {}
    if full_unet:
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float32)
    if text_encoder:
        kwargs["text_encoder"] = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                               dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(base, dtype=torch.float32, **kwargs)
    if embeddings:
        pipe.load_textual_inversion(folder)
    if lora:
        pipe.load_lora_weights(folder)
    generator = torch.Generator("cpu").manual_seed(seed)
    return np.asarray(pipe(prompt, num_inference_steps=4, guidance_scale=5.0, generator=generator).images[0])


def engine_image(generator: Generator, prompt, seed, personalized=True):
    request = GenerationRequest(prompt=prompt, seed=seed, steps=4, guidance_scale=5.0)
    return np.asarray(generator.generate(request, personalized=personalized)[0])


@pytest.mark.parametrize(
    ("name", "loader_args"),
    [
        ("two_stage_lora", {"lora": True}),
        ("two_stage_full", {"full_unet": True}),
        ("textual_inversion", {}),
        ("dreambooth_text", {"full_unet": True, "text_encoder": True, "embeddings": False}),
        ("dreambooth_lora", {"lora": True, "embeddings": False}),
    ],
)
def test_plain_diffusers_reproduces_the_engine_bit_for_bit(trained, tiny_base, name, loader_args):
    generator = Generator(device=torch.device("cpu"), dtype=torch.float32)
    info = generator.apply(trained[name], base_model=str(tiny_base))
    prompt = info.instance_prompt + " in the snow"
    ours = engine_image(generator, prompt, seed=7)
    theirs = plain_diffusers_image(str(tiny_base), trained[name], prompt, seed=7, **loader_args)
    assert np.array_equal(ours, theirs)
    # The artifact changes the picture: the personalized and base renders of this seed differ.
    assert not np.array_equal(ours, engine_image(generator, prompt, seed=7, personalized=False))


def test_swapping_artifacts_never_reloads_the_base_and_restores_it_exactly(trained, tiny_base):
    generator = Generator(device=torch.device("cpu"), dtype=torch.float32)
    generator.use_base(str(tiny_base))
    prompt = "a photo of a box"
    plain = engine_image(generator, prompt, seed=3)
    for name in ("two_stage_lora", "two_stage_full", "dreambooth_text", "textual_inversion", "two_stage_lora"):
        generator.apply(trained[name], base_model=str(tiny_base))
        # With an artifact applied, the base view of the same seed is still the untouched base model.
        assert np.array_equal(engine_image(generator, prompt, seed=3, personalized=False), plain)
    generator.remove_artifact()
    assert np.array_equal(engine_image(generator, prompt, seed=3), plain)
    assert generator.base_loads == 1


def test_same_seed_same_image_and_requests_are_checked(trained, tiny_base):
    generator = Generator(device=torch.device("cpu"), dtype=torch.float32)
    generator.apply(trained["two_stage_lora"], base_model=str(tiny_base))
    assert np.array_equal(engine_image(generator, "a box", 5), engine_image(generator, "a box", 5))
    with pytest.raises(ValueError, match="prompt is empty"):
        generator.generate(GenerationRequest(prompt="  "))
    with pytest.raises(ValueError, match="steps must be between 1 and 200"):
        generator.generate(GenerationRequest(prompt="a box", steps=0))


def test_lora_scale_zero_equals_the_embedding_only(trained, tiny_base):
    generator = Generator(device=torch.device("cpu"), dtype=torch.float32)
    info = generator.apply(trained["two_stage_lora"], base_model=str(tiny_base))
    request = GenerationRequest(prompt=info.instance_prompt, seed=1, steps=4, lora_scale=0.0)
    unscaled = np.asarray(generator.generate(request)[0])
    theirs = plain_diffusers_image(str(tiny_base), trained["two_stage_lora"], info.instance_prompt, seed=1)
    assert np.array_equal(unscaled, theirs)


def test_local_base_must_be_given(trained):
    generator = Generator(device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="trained on a local base model"):
        generator.apply(trained["textual_inversion"])


def test_webui_copies_load_and_match(trained, tiny_base):
    """The kohya-named LoRA copy loads in diffusers to the same image; the A1111 embedding holds emb_params."""
    from safetensors.torch import load_file

    folder = trained["two_stage_lora"]
    embedding = load_file(str(folder / "my-box_emb.safetensors"))
    assert list(embedding) == ["emb_params"] and embedding["emb_params"].shape == (1, 32)
    assert not (trained["two_stage_full"] / "my-box_lora_kohya.safetensors").exists()

    def render(weight_name):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), dtype=torch.float32)
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
        generator = torch.Generator("cpu").manual_seed(2)
        return np.asarray(pipe("a photo of a box", num_inference_steps=3, generator=generator).images[0])

    assert np.array_equal(render("my-box_lora_kohya.safetensors"), render("pytorch_lora_weights.safetensors"))


def test_request_defaults_and_limits_are_the_generation_defaults():
    from personalization.config import GENERATION_DEFAULTS as defaults

    request = GenerationRequest(prompt="a box")
    assert (request.steps, request.guidance_scale, request.lora_scale, request.num_images, request.seed,
            request.negative_prompt) == (defaults.steps, defaults.guidance_scale, defaults.lora_scale,
                                         defaults.num_images, defaults.seed, defaults.negative_prompt)
    GenerationRequest(prompt="a box", steps=defaults.max_steps, guidance_scale=defaults.max_guidance_scale,
                      lora_scale=defaults.max_lora_scale, num_images=defaults.max_num_images).validate()
    for too_much, message in (({"steps": defaults.max_steps + 1}, "steps must be between 1 and 200"),
                              ({"guidance_scale": defaults.max_guidance_scale + 1}, "guidance_scale must be"),
                              ({"lora_scale": defaults.max_lora_scale + 0.5}, "lora_scale must be between 0 and 2,"),
                              ({"num_images": defaults.max_num_images + 1}, "num_images must be between 1 and 8")):
        with pytest.raises(ValueError, match=message):
            GenerationRequest(prompt="a box", **too_much).validate()
