"""Novel subjects: instances of a known shape class with an appearance the base model never saw.

The base model's U-Net and text encoder are trained on plain-coloured shapes only; these subjects add a pattern
(wide stripes, big dots, a face, a two-tone split) that survives the VAE at 32 px, so a personalization method has
to learn it from the 4-5 reference images written to `examples/<name>/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from personalization.mini_world.world import COLOR_NAMES, COLORS, Pattern, render_pattern

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples"

# Subjects are drawn large so that their pattern keeps a few pixels per band / dot at 32 px.
REFERENCE_MIN_RADIUS = 0.33
REFERENCE_MAX_RADIUS = 0.42


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLORS[name], dtype=np.float32)


def _striped(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Five horizontal bands over the object's height, red at top and bottom.
    band = np.clip(np.floor((v + 1.0) / 0.4), 0, 4)
    return np.where((band % 2 == 0)[..., None], _rgb("red"), _rgb("white"))


def _dotted(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    spacing, radius = 0.8, 0.25
    gu = (u / spacing + 0.5) % 1.0 - 0.5
    gv = (v / spacing + 0.5) % 1.0 - 0.5
    dot = np.hypot(gu, gv) * spacing < radius
    return np.where(dot[..., None], _rgb("white"), _rgb("purple"))


def _smiley(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    eyes = (np.hypot(u + 0.38, v + 0.3) < 0.2) | (np.hypot(u - 0.38, v + 0.3) < 0.2)
    r = np.hypot(u, v - 0.05)
    mouth = (np.abs(r - 0.55) < 0.13) & (v > 0.2)
    return np.where((eyes | mouth)[..., None], _rgb("black"), _rgb("yellow"))


def _split(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.where((u + v < 0)[..., None], _rgb("blue"), _rgb("orange"))


@dataclass(frozen=True)
class Subject:
    """A novel subject. `colors` are the palette colours it is made of (its backgrounds avoid them)."""

    name: str
    class_noun: str
    description: str
    colors: tuple[str, ...]
    pattern: Pattern = field(repr=False, compare=False)

    @property
    def backgrounds(self) -> tuple[str, ...]:
        """Palette backgrounds that contrast with every colour of the subject (yellow and orange are too close)."""
        near = {"yellow": "orange", "orange": "yellow"}
        avoid = set(self.colors) | {near[c] for c in self.colors if c in near}
        return tuple(c for c in COLOR_NAMES if c not in avoid)


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject(
            "striped_star",
            "star",
            "a star with wide red and white horizontal stripes",
            ("red", "white"),
            _striped,
        ),
        Subject("dotted_heart", "heart", "a purple heart with big white polka dots", ("purple", "white"), _dotted),
        Subject("smiley_circle", "circle", "a yellow circle with a black smiling face", ("yellow", "black"), _smiley),
        Subject(
            "split_square",
            "square",
            "a square split diagonally, blue top-left and orange bottom-right",
            ("blue", "orange"),
            _split,
        ),
    )
}


def render_subject(
    subject: Subject | str, background: str, cx: float, cy: float, radius: float, size: int = 32
) -> Image.Image:
    """Render the subject at a given place over a palette background."""
    subj = SUBJECTS[subject] if isinstance(subject, str) else subject
    return render_pattern(subj.class_noun, subj.pattern, COLORS[background], cx, cy, radius, size)


def sample_subject_image(subject: Subject | str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """The subject on a random contrasting background, at a random size and place."""
    subj = SUBJECTS[subject] if isinstance(subject, str) else subject
    background = subj.backgrounds[int(rng.integers(len(subj.backgrounds)))]
    radius = float(rng.uniform(REFERENCE_MIN_RADIUS, REFERENCE_MAX_RADIUS))
    margin = radius + 1.0 / 32
    cx, cy = (float(rng.uniform(margin, 1.0 - margin)) for _ in range(2))
    return render_subject(subj, background, cx, cy, radius, size)


def reference_images(subject: Subject | str, count: int = 5, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """The subject's reference images: deterministic, each on a different background."""
    subj = SUBJECTS[subject] if isinstance(subject, str) else subject
    rng = np.random.default_rng([seed, sum(map(ord, subj.name))])
    backgrounds = [subj.backgrounds[i] for i in rng.permutation(len(subj.backgrounds))[:count]]
    images = []
    for background in backgrounds:
        radius = float(rng.uniform(REFERENCE_MIN_RADIUS, REFERENCE_MAX_RADIUS))
        margin = radius + 1.0 / 32
        cx, cy = (float(rng.uniform(margin, 1.0 - margin)) for _ in range(2))
        images.append(render_subject(subj, background, cx, cy, radius, size))
    return images


def write_examples(root: Path = EXAMPLES_DIR, count: int = 5, size: int = 32) -> list[Path]:
    """Write examples/<name>/{0..count-1}.png and subject.json for every subject; returns the folders."""
    folders = []
    for subj in SUBJECTS.values():
        folder = Path(root) / subj.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(reference_images(subj, count, size)):
            image.save(folder / f"{i}.png")
        meta = {
            "class_noun": subj.class_noun,
            "description": subj.description,
            "colors": list(subj.colors),
            "image_size": size,
            "generated_by": "personalization.mini_world.subjects.write_examples",
        }
        (folder / "subject.json").write_text(json.dumps(meta, indent=2) + "\n")
        folders.append(folder)
    return folders


def load_examples(name: str, root: Path = EXAMPLES_DIR) -> tuple[list[Image.Image], dict]:
    """The reference images and subject.json of examples/<name>/."""
    folder = Path(root) / name
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    return images, json.loads((folder / "subject.json").read_text())
