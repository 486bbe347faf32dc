from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from personalization.mini_world import subjects, world


def test_world_has_enough_classes_and_colours() -> None:
    assert len(world.SHAPES) >= 6
    assert len(world.COLORS) >= 8
    assert {"circle", "square", "triangle", "star", "heart", "diamond"} <= set(world.SHAPES)


def test_sampling_and_rendering_are_deterministic() -> None:
    a = [world.sample_scene(np.random.default_rng(7)) for _ in range(3)]
    b = [world.sample_scene(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        s1, s2 = world.sample_scene(rng1), world.sample_scene(rng2)
        assert world.to_array(world.render(s1)).tobytes() == world.to_array(world.render(s2)).tobytes()
        assert world.caption(s1, rng1) == world.caption(s2, rng2)
    t1 = world.render_random_textured(np.random.default_rng(5))
    t2 = world.render_random_textured(np.random.default_rng(5))
    assert np.array_equal(world.to_array(t1), world.to_array(t2))


def test_scenes_stay_inside_the_image_and_colours_differ() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = world.sample_scene(rng)
        assert scene.color != scene.background
        assert not world.is_held_out(scene.shape, scene.color, scene.background)
        image = world.render(scene, 32)
        assert image.size == (32, 32) and image.mode == "RGB"
        arr = world.to_array(image)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        assert (border == np.asarray(world.COLORS[scene.background], dtype=np.uint8)).all()


def test_render_at_other_sizes_keeps_geometry() -> None:
    scene = world.Scene("square", "red", "blue", 0.5, 0.5, 0.25)
    small = world.to_array(world.render(scene, 32))
    big = world.to_array(world.render(scene, 64))
    red = np.asarray(world.COLORS["red"])
    assert (small == red).all(axis=-1).sum() == 16 * 16
    assert (big == red).all(axis=-1).sum() == 32 * 32


def test_held_out_combos_leave_every_attribute_in_training() -> None:
    held = set(world.HELD_OUT_COMBOS)
    assert len(held) == 25
    train = [c for c in world.all_combos() if c not in held]
    assert {c[0] for c in train} == set(world.SHAPES)
    assert {c[1] for c in train} == set(world.COLOR_NAMES)
    assert {c[2] for c in train} == set(world.COLOR_NAMES)
    for shape, color, background in held:
        assert color != background
        # Each held-out triple's pairs are still seen in training.
        assert any(c[0] == shape and c[1] == color for c in train)
        assert any(c[1] == color and c[2] == background for c in train)


def test_captions_leave_words_out_but_keep_the_noun() -> None:
    rng = np.random.default_rng(1)
    scene = world.Scene("star", "red", "blue", 0.5, 0.5, 0.3)
    captions = {world.caption(scene, rng) for _ in range(300)}
    assert world.scene_caption(scene) == "a photo of a red star on a blue background"
    assert "a photo of a red star on a blue background" in captions
    assert "a red star" in captions
    assert "a star on a blue background" in captions
    assert "a photo of a star" in captions
    assert all("star" in c for c in captions)


def test_subjects_and_examples_on_disk() -> None:
    assert len(subjects.SUBJECTS) >= 3
    for name, subject in subjects.SUBJECTS.items():
        assert subject.class_noun in world.SHAPES
        folder = subjects.EXAMPLES_DIR / name
        pngs = sorted(folder.glob("*.png"))
        assert 4 <= len(pngs) <= 5
        meta = json.loads((folder / "subject.json").read_text())
        assert meta["class_noun"] == subject.class_noun
        assert meta["description"]
        # The shipped files are exactly what write_examples produces.
        for path, expected in zip(pngs, subjects.reference_images(subject, len(pngs)), strict=True):
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), world.to_array(expected))
        for background in subject.backgrounds:
            assert background not in subject.colors


@pytest.mark.parametrize("name", sorted(subjects.SUBJECTS))
def test_subject_pattern_is_not_a_plain_colour(name: str) -> None:
    image = subjects.render_subject(name, "black" if name != "smiley_circle" else "blue", 0.5, 0.5, 0.4)
    arr = world.to_array(image).reshape(-1, 3)
    inside = [tuple(p) for p in arr if tuple(p) in {world.COLORS[c] for c in subjects.SUBJECTS[name].colors}]
    assert len(set(inside)) == 2
