"""SDXL end to end on a tiny SDXL-shaped pipeline: the family is read from model_index.json, every method trains a
few steps with the frozen modules bit-identical, every artifact loads in plain diffusers with the card's own snippet
and gives the engine's image bit for bit, and the memory plan decides where SDXL is offered."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from personalization import artifacts
from personalization.config import TrainingConfig
from personalization.device import SD15_HUB_ID, choose_placement, memory_refusal
from personalization.families import SD15, SDXL, SDXL_HUB_ID, FamilyError, detect_family
from personalization.generation import GenerationRequest, Generator
from personalization.images import load_subject_images
from personalization.model_card import build_model_card
from personalization.progress import CancelFlag
from personalization.recipes import recipe_for
from personalization.tokens import add_trigger_tokens
from personalization.trainer import Batches, StageContext, encode_images, load_components, run_stage, train
from tests.conftest import make_subject_images
from tests.tiny_pipeline import TINY_RESOLUTION
from tests.tiny_sdxl_pipeline import build_tiny_sdxl_pipeline

GIB = 2**30
A10G, T4, A100_40 = 23_609_475_072, 15_835_660_288, 42_297_524_224


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "base")


def sdxl_config(base: Path, **changes) -> TrainingConfig:
    values = {"class_noun": "box", "base_model": str(base), "stage1_steps": 2, "stage2_steps": 2,
              "sample_count": 1, "sample_steps": 2, **changes}
    return TrainingConfig(**values)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def stage_context(components, config, subject_dir, trigger_id) -> StageContext:
    from accelerate import Accelerator

    images = load_subject_images(subject_dir, TINY_RESOLUTION).images
    placement = choose_placement("no", "cpu")
    return StageContext(components, config, placement, Accelerator(cpu=True),
                        encode_images(components.vae, images, placement.device), None, None, trigger_id,
                        CancelFlag(), None, time.perf_counter(), 0, 4, config.instance_prompt())


# ---- the family ------------------------------------------------------------------------------------------------------
def test_the_family_comes_from_model_index_never_from_the_name(tiny_sdxl, tiny_base, tmp_path):
    misnamed_xl = Path(shutil.copytree(tiny_sdxl, tmp_path / "stable-diffusion-v1-5", ignore=lambda *_: ["unet"]))
    misnamed_sd = Path(shutil.copytree(tiny_base, tmp_path / "stable-diffusion-xl-base-1.0"))
    assert detect_family(str(misnamed_xl)) is SDXL
    assert detect_family(str(misnamed_sd)) is SD15
    index = json.loads((misnamed_sd / "model_index.json").read_text())
    (misnamed_sd / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(FamilyError, match="FluxPipeline; this engine trains StableDiffusionPipeline"):
        detect_family(str(misnamed_sd))


def test_the_default_resolution_is_read_from_the_configs(tiny_sdxl):
    from personalization.trainer import default_resolution

    assert default_resolution(str(tiny_sdxl)) == TINY_RESOLUTION  # SDXL's own configs give 128 * 8 = 1024


# ---- the stages: what moves and what stays bit-identical -------------------------------------------------------------
def test_stage1_moves_only_the_trigger_row_of_both_text_encoders(tiny_sdxl, subject_dir):
    config = sdxl_config(tiny_sdxl, stage1_learning_rate=0.05, stage1_weight_decay=0.1).resolved()
    comps = load_components(str(tiny_sdxl), choose_placement("no", "cpu"))
    assert comps.family is SDXL and len(comps.text_encoders) == 2
    trigger_id = add_trigger_tokens(comps.tokenizers, comps.text_encoders, config.trigger_token, "box")
    parts = ("text_encoder", "text_encoder_2", "unet", "vae")
    before = {name: snapshot(getattr(comps, name)) for name in parts}
    run_stage(recipe_for(config).stages[0], stage_context(comps, config, subject_dir, trigger_id))

    for name in ("text_encoder", "text_encoder_2"):
        after = snapshot(getattr(comps, name))
        table = next(key for key in after if key.endswith("token_embedding.weight"))
        moved = ~torch.all(after[table] == before[name][table], dim=1)
        assert moved.nonzero().flatten().tolist() == [trigger_id], name
        assert all(torch.equal(tensor, before[name][key]) for key, tensor in after.items() if key != table), name
    for name in ("unet", "vae"):
        assert all(torch.equal(t, before[name][k]) for k, t in snapshot(getattr(comps, name)).items()), name


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stage2_keeps_both_encoders_and_the_vae_bit_identical_with_cached_conditionings(tiny_sdxl, subject_dir, mode):
    config = sdxl_config(tiny_sdxl, stage2_mode=mode, stage2_learning_rate=1e-3).resolved()
    comps = load_components(str(tiny_sdxl), choose_placement("no", "cpu"))
    trigger_id = add_trigger_tokens(comps.tokenizers, comps.text_encoders, config.trigger_token, "box")
    stage1, stage2 = recipe_for(config).stages
    context = stage_context(comps, config, subject_dir, trigger_id)
    run_stage(stage1, context)
    frozen = {name: snapshot(getattr(comps, name)) for name in ("text_encoder", "text_encoder_2", "vae")}
    unet_before = snapshot(comps.unet)

    batches = Batches(stage2, context, comps.text_encoders, torch.Generator("cpu").manual_seed(0))
    cached = batches.cached_conditioning
    assert cached is not None and set(cached.added_cond_kwargs) == {"text_embeds", "time_ids"}
    assert cached.encoder_hidden_states.shape[-1] == comps.unet.config.cross_attention_dim
    assert cached.added_cond_kwargs["time_ids"][0].tolist() == [TINY_RESOLUTION, TINY_RESOLUTION, 0, 0,
                                                                TINY_RESOLUTION, TINY_RESOLUTION]
    summary = run_stage(stage2, context)

    assert math.isfinite(summary.final_loss)
    for name, tensors in frozen.items():
        assert all(torch.equal(t, tensors[k]) for k, t in snapshot(getattr(comps, name)).items()), name
    unet_after = snapshot(comps.unet)
    if mode == "full":
        assert any(not torch.equal(unet_after[k], unet_before[k]) for k in unet_before)
    else:
        assert any("lora_B" in k and unet_after[k].abs().sum() > 0 for k in unet_after)


def test_dreambooth_text_encoder_training_is_refused_on_sdxl_before_loading(tiny_sdxl, subject_dir, tmp_path):
    config = sdxl_config(tiny_sdxl, method="dreambooth", train_text_encoder=True)
    with pytest.raises(FamilyError, match="train_text_encoder is not available on Stable Diffusion XL bases"):
        train(config, subject_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- every method, and every artifact through plain diffusers -------------------------------------------------------
RUNS = {
    # The 24 GB plan (gradient checkpointing in both stages) and the large-card one (8-bit Adam for the full U-Net).
    "two_stage_lora": ({"method": "two_stage", "stage2_mode": "lora", "gradient_checkpointing": True},
                       {artifacts.SDXL_EMBEDDINGS_FILE, artifacts.LORA_FILE}),
    "two_stage_full": ({"method": "two_stage", "stage2_mode": "full", "use_8bit_adam": True},
                       {artifacts.SDXL_EMBEDDINGS_FILE, "unet"}),
    "textual_inversion": ({"method": "textual_inversion"}, {artifacts.SDXL_EMBEDDINGS_FILE}),
    "dreambooth_lora_prior": ({"method": "dreambooth_lora", "prior_preservation": True, "class_images": 2},
                              {artifacts.LORA_FILE}),
    "dreambooth_lora": ({"method": "dreambooth_lora"}, {artifacts.LORA_FILE}),
    "dreambooth": ({"method": "dreambooth"}, {"unet"}),
}


@pytest.fixture(scope="module")
def trained(tiny_sdxl, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl-runs")
    subject = make_subject_images(root / "subject")
    folders = {}
    for name, (changes, _files) in RUNS.items():
        # Large learning rates so a few steps visibly change the model.
        config = sdxl_config(tiny_sdxl, stage1_learning_rate=0.5, stage2_learning_rate=5e-2, **changes)
        result = train(config, subject, root / name)
        assert all(math.isfinite(stage.final_loss) for stage in result.stages), name
        folders[name] = result.output_dir
    return folders


@pytest.mark.parametrize("name", list(RUNS))
def test_each_method_writes_its_files(trained, name):
    written = {path.name for path in trained[name].iterdir()}
    assert RUNS[name][1] <= written
    assert artifacts.EMBEDDINGS_FILE not in written  # SDXL's embeddings are the two-key file only
    info = artifacts.read_artifact(trained[name])
    assert info.has_sdxl_embeddings == (artifacts.SDXL_EMBEDDINGS_FILE in RUNS[name][1])


def card_snippet(folder: Path, base: Path, seed: int) -> str:
    """The card's code, pointed at this folder and base, rendering 4 steps with a fixed seed."""
    text = (folder / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    # hf_hub_download of the repo's file becomes the file in this folder; everything else is the card's own text.
    code = code.replace("from huggingface_hub import hf_hub_download",
                        "def hf_hub_download(repo, name):\n    return str(Path(repo) / name)")
    code = code.replace("YOUR_NAME/THIS_REPO", str(folder)).replace("PATH/TO/BASE_MODEL", str(base))
    code = code.replace("num_inference_steps=25", "num_inference_steps=4")
    code = code.replace(").images[0]", f', generator=torch.Generator("cpu").manual_seed({seed})).images[0]')
    return code.replace('image.save("sample.png")', "")


@pytest.mark.parametrize("name", list(RUNS))
def test_the_cards_snippet_in_plain_diffusers_gives_the_engines_image_bit_for_bit(trained, tiny_sdxl, name):
    folder = trained[name]
    code = card_snippet(folder, tiny_sdxl, seed=7)
    assert "StableDiffusionXLPipeline.from_pretrained" in code
    scope: dict = {"Path": Path}
    exec(compile(code, "card_snippet", "exec"), scope)
    theirs = np.asarray(scope["image"])

    generator = Generator(device=torch.device("cpu"), dtype=torch.float32)
    generator.apply(folder, base_model=str(tiny_sdxl))
    config = TrainingConfig.from_dict(json.loads((folder / artifacts.CONFIG_FILE).read_text()))
    request = GenerationRequest(prompt=config.context_prompts()[0], seed=7, steps=4,
                                guidance_scale=config.guidance_scale, lora_scale=1.0)
    ours = np.asarray(generator.generate(request)[0])
    assert ours.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.array_equal(ours, theirs)
    # The artifact changes the picture: the base model's render of the same seed differs.
    assert not np.array_equal(ours, np.asarray(generator.generate(request, personalized=False)[0]))


def test_swapping_sdxl_artifacts_restores_the_base_exactly(trained, tiny_sdxl):
    generator = Generator(device=torch.device("cpu"), dtype=torch.float32)
    generator.use_base(str(tiny_sdxl))
    request = GenerationRequest(prompt="a photo of a box", seed=3, steps=3)
    plain = np.asarray(generator.generate(request)[0])
    for name in ("two_stage_lora", "two_stage_full", "textual_inversion"):
        generator.apply(trained[name], base_model=str(tiny_sdxl))
        assert np.array_equal(np.asarray(generator.generate(request, personalized=False)[0]), plain)
    generator.remove_artifact()
    assert np.array_equal(np.asarray(generator.generate(request)[0]), plain)
    assert "<my-box>" not in generator.pipeline.tokenizer_2.get_vocab() and generator.base_loads == 1


def test_web_ui_copies_follow_the_sdxl_conventions(trained, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    folder = trained["two_stage_lora"]
    embedding = load_file(str(folder / "my-box_emb.safetensors"))
    stored = load_file(str(folder / artifacts.SDXL_EMBEDDINGS_FILE))
    assert sorted(stored) == sorted(embedding) == ["clip_g", "clip_l"]
    assert all(torch.equal(embedding[key], stored[key]) and stored[key].shape == (1, 32) for key in stored)

    def render(weight_name: str) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), dtype=torch.float32)
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
        image = pipe("a photo of a box", num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(2))
        return np.asarray(image.images[0])

    assert np.array_equal(render("my-box_lora_kohya.safetensors"), render(artifacts.LORA_FILE))


# ---- the model card --------------------------------------------------------------------------------------------------
def test_the_card_of_a_hub_sdxl_base():
    config = TrainingConfig(class_noun="dog", base_model=SDXL_HUB_ID, resolution=1024).resolved()
    card = build_model_card(config, {"stages": []}, [], repo_id="alice/my-dog", family=SDXL)
    data = card.data.to_dict()
    assert data["base_model"] == SDXL_HUB_ID and data["base_model_relation"] == "adapter"
    assert data["license"] == "openrail++"
    assert {"stable-diffusion-xl", "template:sd-lora", "lora", "textual_inversion"} <= set(data["tags"])
    assert "stable-diffusion" not in data["tags"]
    assert f'pipe = StableDiffusionXLPipeline.from_pretrained("{SDXL_HUB_ID}", dtype=dtype)' in card.text
    assert ('embeddings = load_file(hf_hub_download("alice/my-dog", "learned_embeds_sdxl.safetensors"))'
            in card.text)
    assert ('pipe.load_textual_inversion(embeddings["clip_g"], token="<my-dog>", text_encoder=pipe.text_encoder_2, '
            'tokenizer=pipe.tokenizer_2)') in card.text
    assert 'pipe.load_lora_weights("alice/my-dog")' in card.text
    assert "madebyollin/sdxl-vae-fp16-fix" in card.text


# ---- where SDXL is offered -------------------------------------------------------------------------------------------
def test_the_memory_plan_fits_an_sdxl_lora_on_24_gb_and_the_full_unet_only_on_large_cards():
    assert memory_refusal(SDXL, A10G, full_unet=False) is None
    assert memory_refusal(SDXL, A100_40, full_unet=True) is None
    assert memory_refusal(SDXL, 80 * GIB, full_unet=True) is None
    assert memory_refusal(SDXL, A10G, full_unet=True) == (
        "Stable Diffusion XL with a full U-Net needs about 29 GiB with gradient checkpointing and 8-bit Adam and "
        "this GPU has 22 GiB: a Stable Diffusion XL LoRA fits this GPU.")
    assert memory_refusal(SDXL, T4, full_unet=False) == (
        "Stable Diffusion XL with a LoRA needs about 18 GiB with gradient checkpointing and 8-bit Adam and this GPU "
        "has 15 GiB: Stable Diffusion 1.5 fits this GPU.")
    assert memory_refusal(SDXL, None, full_unet=True) is None  # a CPU: time, not memory, is the limit


def services(gpu_bytes: int | None, tmp_path: Path):
    from ui.services import Services

    return Services(default_base=SD15_HUB_ID, generator=Generator(device=torch.device("cpu")), hardware="GPU",
                    work_root=tmp_path, gpu_bytes=gpu_bytes)


@pytest.mark.parametrize(("gpu_bytes", "offered"), [(A10G, True), (80 * GIB, True), (T4, False), (None, False)])
def test_the_app_offers_sdxl_only_where_the_memory_plan_fits(tmp_path, gpu_bytes, offered):
    chosen = services(gpu_bytes, tmp_path)
    assert (SDXL_HUB_ID in chosen.base_choices) == offered
    if offered:
        assert chosen.checked_base(SDXL_HUB_ID) == SDXL_HUB_ID
    else:
        with pytest.raises(ValueError, match="not offered here") as refused:
            chosen.checked_base(SDXL_HUB_ID)
        if gpu_bytes is not None:
            assert "Stable Diffusion 1.5 fits this GPU" in str(refused.value)


def test_the_app_refuses_a_full_sdxl_unet_on_a_24_gb_card_in_one_sentence(tmp_path):
    from ui.training import check_memory

    config = TrainingConfig(class_noun="dog", base_model=SDXL_HUB_ID, stage2_mode="full", resolution=1024).resolved()
    with pytest.raises(ValueError, match=r"needs about 29 GiB .* a Stable Diffusion XL LoRA fits this GPU\.$"):
        check_memory(services(A10G, tmp_path), config)
    check_memory(services(80 * GIB, tmp_path), config)
    check_memory(services(A10G, tmp_path), TrainingConfig(class_noun="dog", base_model=SDXL_HUB_ID).resolved())


def test_the_time_estimate_and_the_zero_gpu_duration_cover_sdxl():
    from personalization.jobs import ZERO_GPU_MAX_SECONDS, estimate_run, training_resolution, zero_gpu_seconds

    assert training_resolution(SDXL_HUB_ID) == 1024
    sd15 = TrainingConfig(class_noun="dog", base_model=SD15_HUB_ID, resolution=512)
    sdxl = TrainingConfig(class_noun="dog", base_model=SDXL_HUB_ID, resolution=1024)
    for card in ("NVIDIA H100 80GB HBM3", "NVIDIA A10G"):
        small, large = estimate_run(sd15, card, SD15_HUB_ID), estimate_run(sdxl, card, SDXL_HUB_ID)
        # 4x the pixels and a larger U-Net: each step costs more than 4x SD-1.5's
        assert large.unet_step_s > 4 * small.unet_step_s and large.embedding_step_s > 4 * small.embedding_step_s
    assert zero_gpu_seconds(sd15, SD15_HUB_ID) < zero_gpu_seconds(sdxl, SDXL_HUB_ID) <= ZERO_GPU_MAX_SECONDS


def test_an_sdxl_run_resumes_bit_identical_and_its_checkpoints_hold_both_rows(tiny_sdxl, subject_dir, tmp_path):
    """Both encoders' trigger rows are carried across a kill at the stage boundary; a picked stage-1 checkpoint
    holds the two-key embedding file."""
    from personalization.checkpoints import read_table
    from personalization.snapshots import pick_step
    from tests.test_snapshots import Crash, crash_at, tree

    settings = sdxl_config(tiny_sdxl, stage1_steps=3, stage2_steps=4, checkpoints=2, sample_count=1)
    whole = train(settings, subject_dir, tmp_path / "whole")
    with pytest.raises(Crash):
        train(settings, subject_dir, tmp_path / "resumed", progress=crash_at(4))
    resumed = train(settings, subject_dir, tmp_path / "resumed", resume=True)
    timing = ("training_summary.json", "README.md", "checkpoints/checkpoints.json")
    assert tree(resumed.output_dir, timing) == tree(whole.output_dir, timing)
    assert read_table(whole.output_dir).steps == [3, 5, 7]
    assert pick_step(whole.output_dir, 3) == 3
    names = {p.name for p in whole.output_dir.iterdir()}
    assert artifacts.SDXL_EMBEDDINGS_FILE in names and artifacts.LORA_FILE not in names
    assert "StableDiffusionXLPipeline" in (whole.output_dir / "README.md").read_text()
