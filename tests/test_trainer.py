import dataclasses
import math
import time

import pytest
import torch

from personalization.config import TrainingConfig
from personalization.device import choose_placement
from personalization.images import load_subject_images
from personalization.progress import CancelFlag, TrainingCancelled
from personalization.recipes import recipe_for
from personalization.tokens import add_trigger_token
from personalization.trainer import (
    Batches,
    LatentCache,
    StageContext,
    _make_optimizer,
    encode_images,
    load_components,
    run_stage,
    train,
    trainable_parts,
)
from tests.tiny_pipeline import TINY_RESOLUTION


def tiny_config(tiny_base, **changes) -> TrainingConfig:
    values = {"class_noun": "box", "base_model": str(tiny_base), "stage1_steps": 3, "stage2_steps": 3,
              "sample_count": 1, "sample_steps": 2, **changes}
    return TrainingConfig(**values)


def stage_context(components, config, subject_dir, trigger_id):
    images = load_subject_images(subject_dir, TINY_RESOLUTION).images
    from accelerate import Accelerator

    placement = choose_placement("no", "cpu")
    return StageContext(components, config, placement, Accelerator(cpu=True), encode_images(components.vae, images,
                        placement.device), None, None, trigger_id, CancelFlag(), None, time.perf_counter(), 0, 6,
                        config.instance_prompt())


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def test_stage1_moves_only_the_trigger_row_even_with_weight_decay(tiny_base, subject_dir):
    config = tiny_config(tiny_base, stage1_weight_decay=0.1, stage1_learning_rate=0.05).resolved()
    components = load_components(str(tiny_base), choose_placement("no", "cpu"))
    trigger_id = add_trigger_token(components.tokenizer, components.text_encoder, config.trigger_token, "box")
    before = {name: snapshot(getattr(components, name)) for name in ("text_encoder", "unet", "vae")}
    stage1 = recipe_for(config).stages[0]
    run_stage(stage1, stage_context(components, config, subject_dir, trigger_id))

    after_text = snapshot(components.text_encoder)
    embedding_key = next(k for k in after_text if k.endswith("token_embedding.weight"))
    moved = ~torch.all(after_text[embedding_key] == before["text_encoder"][embedding_key], dim=1)
    assert moved.nonzero().flatten().tolist() == [trigger_id]
    for name, tensor in after_text.items():
        if name != embedding_key:
            assert torch.equal(tensor, before["text_encoder"][name]), name
    for part in ("unet", "vae"):
        for name, tensor in snapshot(getattr(components, part)).items():
            assert torch.equal(tensor, before[part][name]), f"{part}.{name}"


@pytest.mark.parametrize(("mode", "memory_options"), [
    ("lora", {}), ("full", {}), ("full", {"gradient_checkpointing": True, "use_8bit_adam": True}),
    ("lora", {"gradient_checkpointing": True}),
])
def test_stage2_keeps_text_encoder_and_embedding_bit_identical(tiny_base, subject_dir, mode, memory_options):
    config = tiny_config(tiny_base, stage2_mode=mode, stage2_learning_rate=1e-3, **memory_options).resolved()
    components = load_components(str(tiny_base), choose_placement("no", "cpu"))
    trigger_id = add_trigger_token(components.tokenizer, components.text_encoder, config.trigger_token, "box")
    stage1, stage2 = recipe_for(config).stages
    context = stage_context(components, config, subject_dir, trigger_id)
    run_stage(stage1, context)
    text_before, vae_before = snapshot(components.text_encoder), snapshot(components.vae)
    unet_before = snapshot(components.unet)
    summary = run_stage(stage2, context)

    assert math.isfinite(summary.final_loss)
    for name, tensor in snapshot(components.text_encoder).items():
        assert torch.equal(tensor, text_before[name]), name
    for name, tensor in snapshot(components.vae).items():
        assert torch.equal(tensor, vae_before[name]), name
    unet_after = snapshot(components.unet)
    if mode == "full":
        assert any(not torch.equal(unet_after[n], unet_before[n]) for n in unet_before)
    else:
        lora = [n for n in unet_after if "lora_" in n]
        assert lora and any("lora_B" in n and unet_after[n].abs().sum() > 0 for n in lora)
        for name in unet_before:  # the base weights under the adapter stay put
            key = name if name in unet_after else name.replace(".weight", ".base_layer.weight").replace(
                ".bias", ".base_layer.bias")
            assert torch.equal(unet_after[key], unet_before[name]), name


@pytest.mark.parametrize(
    ("method", "changes", "files"),
    [
        ("two_stage", {"stage2_mode": "lora"}, {"learned_embeds.safetensors", "pytorch_lora_weights.safetensors"}),
        ("two_stage", {"stage2_mode": "full"}, {"learned_embeds.safetensors", "unet"}),
        ("textual_inversion", {}, {"learned_embeds.safetensors"}),
        ("dreambooth", {"prior_preservation": True, "class_images": 2, "train_text_encoder": True},
         {"unet", "text_encoder"}),
        ("dreambooth_lora", {}, {"pytorch_lora_weights.safetensors"}),
    ],
)
def test_each_method_trains_with_finite_losses_and_writes_its_files(tiny_base, subject_dir, tmp_path, method,
                                                                     changes, files):
    events = []
    result = train(tiny_config(tiny_base, method=method, **changes), subject_dir, tmp_path / "out",
                   progress=events.append)
    written = {p.name for p in result.output_dir.iterdir()}
    assert files <= written
    assert {"README.md", "training_config.json", "training_summary.json", "samples"} <= written
    assert all(math.isfinite(stage.final_loss) for stage in result.stages)
    steps = [e.step for e in events if e.loss is not None]
    assert steps == list(range(1, result.config.stage1_steps + result.config.stage2_steps + 1))
    assert all(e.eta_s is not None and e.eta_s >= 0 for e in events if e.loss is not None)


def test_cancel_mid_run_leaves_no_folder(tiny_base, subject_dir, tmp_path):
    cancel = CancelFlag()

    def stop_at_step_two(event):
        if event.step == 2:
            cancel.cancel()

    with pytest.raises(TrainingCancelled):
        train(tiny_config(tiny_base), subject_dir, tmp_path / "out", progress=stop_at_step_two, cancel=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subject"]


def test_crash_mid_run_leaves_no_folder_and_keeps_an_old_one(tiny_base, subject_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "training_config.json").write_text("{}")  # an earlier result, which --overwrite may replace

    def crash(event):
        if event.step == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tiny_base), subject_dir, out, progress=crash, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["training_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_is_refused_before_training(tiny_base, subject_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(ValueError, match="folder exists and is not empty"):
        train(tiny_config(tiny_base), subject_dir, out)


def test_previews_arrive_every_interval(tiny_base, subject_dir, tmp_path):
    events = []
    train(tiny_config(tiny_base, stage1_steps=2, stage2_steps=2, preview_interval=2, sample_count=0), subject_dir,
          tmp_path / "out", progress=events.append)
    previews = [(e.stage, e.stage_step) for e in events if e.preview is not None]
    assert len(previews) == 2 and all(step == 2 for _, step in previews)
    assert all(e.preview.size == (TINY_RESOLUTION, TINY_RESOLUTION) for e in events if e.preview is not None)


def test_overwrite_never_deletes_a_folder_that_is_not_a_result(tiny_base, subject_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="not an earlier result of this engine"):
        train(tiny_config(tiny_base), subject_dir, home, overwrite=True)
    assert (home / "thesis.txt").read_text() == "years of work"


def test_images_inside_the_output_folder_are_refused(tiny_base, tmp_path):
    from tests.conftest import make_subject_images

    out = tmp_path / "out"
    make_subject_images(out / "photos")
    (out / "training_config.json").write_text("{}")
    with pytest.raises(ValueError, match="subject images are inside the output folder"):
        train(tiny_config(tiny_base), out / "photos", out, overwrite=True)
    assert len(list((out / "photos").iterdir())) == 3


def test_output_dot_is_resolved_to_a_named_folder(tiny_base, subject_dir, tmp_path, monkeypatch):
    target = tmp_path / "here"
    target.mkdir()
    monkeypatch.chdir(target)
    result = train(tiny_config(tiny_base, sample_count=0), subject_dir, ".")
    assert result.output_dir == target and (target / "training_config.json").is_file()


def test_a_bad_trigger_is_refused_before_the_model_loads(tiny_base, subject_dir, tmp_path):
    """A base folder with configs and tokenizer but no weights: loading it would fail, the trigger check must not."""
    import shutil

    configs_only = tmp_path / "configs-only"
    shutil.copytree(tiny_base, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises(ValueError, match=r"trigger token: 'dog' is already a word.*try '<dog>'"):
        train(tiny_config(configs_only, trigger_token="dog"), subject_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_8bit_adam_keeps_one_byte_moments_for_large_weights():
    config = tiny_config(".", use_8bit_adam=True)
    large, small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(8))
    optimizer = _make_optimizer([large, small], 1e-3, 0.0, config, choose_placement("no", "cpu"))
    before = large.detach().clone()
    large.grad, small.grad = torch.randn_like(large), torch.randn_like(small)
    optimizer.step()
    assert not torch.equal(large.detach(), before)
    assert optimizer.state[large]["state1"].dtype == torch.uint8
    assert optimizer.state[large]["state2"].dtype == torch.uint8


def test_compiled_unet_trains_and_saves_the_plain_unet_layout(tiny_base, subject_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    result = train(tiny_config(tiny_base, stage2_mode="full", compile_unet=True, stage2_learning_rate=1e-3),
                   subject_dir, tmp_path / "out")
    assert result.config.compile_unet
    assert all(math.isfinite(stage.final_loss) for stage in result.stages)
    trained = UNet2DConditionModel.from_pretrained(result.output_dir / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_base / "unet").state_dict()
    assert trained.keys() == base.keys()  # no "_orig_mod." prefixes from a wrapped module
    assert any(not torch.equal(trained[name], base[name]) for name in base)


def marked_latents(marks: list[float]) -> LatentCache:
    """A latent cache whose i-th entry is filled with marks[i] and has no spread, so a sample names its images."""
    mean = torch.tensor(marks).reshape(-1, 1, 1, 1).expand(-1, 4, 8, 8).clone()
    return LatentCache(mean, torch.zeros_like(mean))


def marks_of(latents: torch.Tensor) -> list[float]:
    return latents[:, 0, 0, 0].tolist()


@pytest.mark.parametrize(("count", "max_batch_size", "flip"), [(3, 4, False), (3, 4, True), (5, 2, False),
                                                                (5, 2, True)])
def test_batches_take_distinct_subject_images_up_to_the_batch_size_with_flips(tiny_base, subject_dir, count,
                                                                              max_batch_size, flip):
    config = tiny_config(tiny_base, method="dreambooth", max_batch_size=max_batch_size).resolved()
    components = load_components(str(tiny_base), choose_placement("no", "cpu"))
    stage = recipe_for(config).stages[0]
    originals = [float(i) for i in range(count)]
    latents = marked_latents(originals + [100.0 + i for i in range(count)] if flip else originals)
    ctx = dataclasses.replace(stage_context(components, config, subject_dir, None), subject_latents=latents,
                              flip_offset=count if flip else None)
    batches = Batches(stage, ctx, components.text_encoders, torch.Generator("cpu").manual_seed(0))
    size = min(max_batch_size, count)
    seen, flipped, walk = set(), 0, []
    for _ in range(40):
        batch, prompt_index = batches.subject()
        marks = marks_of(batch)
        images = [mark % 100 for mark in marks]
        assert len(marks) == size and len(set(images)) == size  # different images within a step
        flipped += sum(mark >= 100 for mark in marks)
        seen |= set(images)
        walk.append(set(images))
        assert prompt_index.shape == (size,) and 0 <= int(prompt_index.min()) <= int(prompt_index.max()) < len(
            stage.prompts)
        conditioning = batches.conditioning(prompt_index)  # text frozen: the cached conditionings, the same values
        with torch.no_grad():
            expected = components.text_encoder(batches.prompt_ids[prompt_index])[0]
        assert torch.equal(conditioning.encoder_hidden_states, expected) and conditioning.added_cond_kwargs is None
    assert seen == set(originals)
    assert (flipped > 0) == flip and flipped < 40 * size
    if count // size >= 2:  # a shuffled order is walked a batch at a time before it is reshuffled
        assert not walk[0] & walk[1]
    assert not batches.prior_preservation


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_class_batches_match_the_subject_batch_size_with_the_class_prompt(tiny_base, subject_dir, train_text_encoder):
    config = tiny_config(tiny_base, method="dreambooth", prior_preservation=True, class_images=2, max_batch_size=2,
                         train_text_encoder=train_text_encoder).resolved()
    components = load_components(str(tiny_base), choose_placement("no", "cpu"))
    stage = recipe_for(config).stages[0]
    ctx = dataclasses.replace(stage_context(components, config, subject_dir, None),
                              class_latents=marked_latents([-1.0, -2.0]))
    batches = Batches(stage, ctx, components.text_encoders, torch.Generator("cpu").manual_seed(0))
    assert batches.prior_preservation
    with torch.no_grad():
        class_conditioning = components.text_encoder(batches.class_ids)[0]
    seen = set()
    for _ in range(10):
        batches.subject()
        latents, conditioning = batches.classes()
        seen |= set(marks_of(latents))
        hidden = conditioning.encoder_hidden_states
        assert latents.shape[0] == 2 and hidden.shape[0] == 2
        assert torch.equal(hidden.detach(), class_conditioning.expand(2, -1, -1))
    assert seen == {-1.0, -2.0}


def test_trainable_parts_freeze_everything_again_even_when_the_stage_fails(tiny_base, subject_dir):
    config = tiny_config(tiny_base).resolved()
    components = load_components(str(tiny_base), choose_placement("no", "cpu"))
    trigger_id = add_trigger_token(components.tokenizer, components.text_encoder, config.trigger_token, "box")
    table = components.text_encoder.get_input_embeddings()
    stage1 = recipe_for(config).stages[0]
    with pytest.raises(RuntimeError, match="stop"), trainable_parts(
            stage1, stage_context(components, config, subject_dir, trigger_id)) as parts:
        assert parts.params[0].requires_grad and parts.modules == [components.text_encoder]
        raise RuntimeError("stop")
    assert components.text_encoder.get_input_embeddings() is table
    for module in (components.text_encoder, components.unet, components.vae):
        assert not any(p.requires_grad for p in module.parameters())


def test_the_first_eta_is_the_estimate_shown_before_start(tiny_base, subject_dir, tmp_path):
    """Before any step is measured the ETA comes from the same per-step costs as the page's estimate, not from the
    first steps' rate (which carries loading and warm-up)."""
    from personalization.jobs import estimate_run
    from personalization.trainer import train

    config = TrainingConfig(class_noun="widget", base_model=str(tiny_base), resolution=TINY_RESOLUTION,
                            stage1_steps=4, stage2_steps=4, sample_count=1)
    events = []
    result = train(config, subject_dir, tmp_path / "run", progress=events.append)
    estimate = estimate_run(result.config, result.hardware, str(tiny_base))
    steps = [event for event in events if event.loss is not None]
    first = steps[0]
    assert first.eta_s == pytest.approx(3 * estimate.embedding_step_s + 4 * estimate.unet_step_s
                                        + estimate.samples_s)
    assert steps[-1].eta_s == pytest.approx(estimate.samples_s, abs=1e-6)  # only the samples are left at the end


def test_small_samples_are_rendered_in_one_call_each_from_its_own_prompt_and_seed(tiny_base, monkeypatch):
    """A batch of the mini world's 32 px samples costs about half of rendering them one at a time; each sample is
    still the image its prompt and seed give alone (up to float rounding across batch sizes)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from personalization.trainer import _render_samples, sample_batch_size, sampling_pipeline

    comps = load_components(str(tiny_base), choose_placement("no", "cpu"))
    settings = tiny_config(tiny_base, sample_count=3, sample_steps=3, seed=7).resolved()
    settings = dataclasses.replace(settings, resolution=TINY_RESOLUTION)
    alone = []
    for index in range(3):
        generator = torch.Generator("cpu").manual_seed(7 + index)
        alone.append(np.asarray(sampling_pipeline(comps)(
            settings.sample_prompts()[index], num_inference_steps=3, guidance_scale=settings.guidance_scale,
            height=TINY_RESOLUTION, width=TINY_RESOLUTION, generator=generator).images[0], dtype=np.int16))

    calls = []
    render = StableDiffusionPipeline.__call__

    def counted(pipeline, prompt, *args, **kwargs):
        calls.append(prompt)
        return render(pipeline, prompt, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted)
    samples = [np.asarray(image, dtype=np.int16) for image in _render_samples(comps, settings, CancelFlag())]
    assert calls == [settings.sample_prompts()[:3]]
    assert len(samples) == 3
    assert all(np.abs(batched - single).max() <= 1 for batched, single in zip(samples, alone, strict=True))
    assert not np.array_equal(samples[0], samples[1])  # each its own seed and prompt
    # SD-size samples stay one per call: a batch's memory beside a training run is not measured on small GPUs.
    assert sample_batch_size(32) >= 4 and sample_batch_size(TINY_RESOLUTION) >= 3
    assert sample_batch_size(512) == sample_batch_size(1024) == 1


def test_probe_steps_come_from_the_scorer_and_never_exceed_the_samples():
    from types import SimpleNamespace

    from personalization.trainer import probe_steps

    settings = TrainingConfig(class_noun="box", sample_steps=25)
    assert probe_steps(SimpleNamespace(probe_steps=10), settings) == 10
    assert probe_steps(SimpleNamespace(probe_steps=40), settings) == 25
    assert probe_steps(SimpleNamespace(probe_steps=None), settings) == 25
    assert probe_steps(SimpleNamespace(), settings) == 25  # a scorer that does not say: the samples' steps
    assert probe_steps(None, settings) == 25
