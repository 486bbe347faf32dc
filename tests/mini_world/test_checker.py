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


def test_shipped_mini_model_draws_held_out_prompts_with_plain_diffusers() -> None:
    """The bundled model, loaded as any user would (its own scheduler), draws combinations it never saw."""
    from diffusers import StableDiffusionPipeline

    from personalization.mini_world.world import HELD_OUT_COMBOS, full_caption

    pipe = StableDiffusionPipeline.from_pretrained(str(MINI_MODEL), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    combos = list(HELD_OUT_COMBOS[:4])
    images = pipe(
        [full_caption(shape, color, background) for shape, color, background in combos],
        num_inference_steps=25,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images
    assert all(im.size == (32, 32) for im in images)
    readings = [checker.read_image(im) for im in images]
    assert [r.background for r in readings] == [b for _, _, b in combos], readings
    assert sum(r.color == c for r, (_, c, _) in zip(readings, combos, strict=True)) >= 3, readings
    assert sum(r.shape == s for r, (s, _, _) in zip(readings, combos, strict=True)) >= 3, readings


def test_references_read_once_give_subject_fidelity() -> None:
    """A scorer reads its references once (SubjectReferences) and must get what subject_fidelity gives."""
    refs, _ = subjects.load_examples("dotted_heart")
    rng = np.random.default_rng(5)
    images = [subjects.sample_subject_image(name, rng) for name in subjects.SUBJECTS for _ in range(3)]
    images += [world.render(world.sample_scene(rng)) for _ in range(12)]
    images.append(Image.new("RGB", (32, 32), world.COLORS["green"]))
    read_once = checker.SubjectReferences(refs)
    assert [read_once.fidelity(image) for image in images] == [checker.subject_fidelity(image, refs)
                                                               for image in images]
    blank_refs = checker.SubjectReferences([Image.new("RGB", (32, 32), world.COLORS["blue"])])
    with pytest.raises(ValueError, match="no object found in any reference image"):
        blank_refs.fidelity(images[0])


def test_shape_templates_shared_through_the_cache_cannot_be_changed() -> None:
    template = checker._template("heart", 16.0, 16.0, 9.5, 32)
    assert template is checker._template("heart", 16.0, 16.0, 9.5, 32)
    with pytest.raises(ValueError, match="read-only"):
        template[0, 0] = True
