from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalization.mini_world import checker, subjects, world

MINI_MODEL = Path(__file__).resolve().parents[2] / "personalization" / "assets" / "mini_model"


def test_checker_reads_clean_renders() -> None:
    rng = np.random.default_rng(2024)
    scenes = [world.sample_scene(rng, allow_held_out=True) for _ in range(300)]
    reads = [checker.read_image(world.render(s, 32)) for s in scenes]
    for field in ("background", "color", "shape"):
        accuracy = np.mean([getattr(r, field) == getattr(s, field) for r, s in zip(reads, scenes, strict=True)])
        assert accuracy >= 0.99, field


def test_checker_reads_every_shape_colour_pair_at_small_size() -> None:
    for shape in world.SHAPES:
        for i, color in enumerate(world.COLOR_NAMES):
            background = world.COLOR_NAMES[(i + 3) % len(world.COLOR_NAMES)]
            scene = world.Scene(shape, color, background, 0.4, 0.6, world.MIN_RADIUS)
            reading = checker.read_image(world.render(scene, 32))
            assert (reading.shape, reading.color, reading.background) == (shape, color, background)


def test_checker_reads_subjects_shape_and_background() -> None:
    for name, subject in subjects.SUBJECTS.items():
        images, meta = subjects.load_examples(name)
        rng = np.random.default_rng(0)
        images += [subjects.sample_subject_image(subject, rng) for _ in range(20)]
        reads = [checker.read_image(im) for im in images]
        assert all(r.shape == meta["class_noun"] for r in reads), name
        assert all(r.background in subject.backgrounds for r in reads), name
        assert all(r.color in subject.colors for r in reads), name


def test_blank_image_has_no_object() -> None:
    blank = Image.new("RGB", (32, 32), world.COLORS["green"])
    reading = checker.read_image(blank)
    assert reading.background == "green"
    assert reading.color is None and reading.shape is None
    refs, _ = subjects.load_examples("striped_star")
    assert checker.subject_fidelity(blank, refs) == 0.0


@pytest.mark.parametrize("name", sorted(subjects.SUBJECTS))
def test_subject_fidelity_separates_subject_from_plain_objects(name: str) -> None:
    subject = subjects.SUBJECTS[name]
    refs, _ = subjects.load_examples(name)
    rng = np.random.default_rng(11)
    own = [checker.subject_fidelity(subjects.sample_subject_image(subject, rng), refs) for _ in range(12)]
    plain = []
    for color in world.COLOR_NAMES:
        background = next(b for b in subject.backgrounds if b != color)
        cx, cy, radius = world.sample_placement(rng, subjects.REFERENCE_MIN_RADIUS)
        plain.append(
            checker.subject_fidelity(
                world.render(world.Scene(subject.class_noun, color, background, cx, cy, radius)), refs
            )
        )
    assert np.mean(own) >= 0.55
    assert np.mean(plain) <= 0.15
    # Even the plain object in the subject's main colour scores clearly lower than the subject itself.
    assert max(plain) < np.mean(own) - 0.15
    assert all(0.0 <= f <= 1.0 for f in own + plain)


@pytest.mark.skipif(not (MINI_MODEL / "model_index.json").exists(), reason="mini model not exported yet")
def test_shipped_mini_model_loads_and_follows_the_background() -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MINI_MODEL), torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a photo of a red circle on a blue background"] * 4,
        num_inference_steps=25,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images
    assert all(im.size == (32, 32) for im in images)
    backgrounds = [checker.read_image(im).background for im in images]
    assert backgrounds.count("blue") >= 3, backgrounds
