"""The synthetic world the mini base model is trained on.

One object (a plain-coloured shape) on a plain background, with a caption. Rendering is deterministic given a
`Scene`, and `sample_scene` is deterministic given a numpy Generator, so every dataset is reproducible from a seed.
Geometry is stored as fractions of the image size so one scene renders at any resolution.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Colours are far apart in RGB so they stay tellable apart after the VAE blurs them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 145, 30),
    "yellow": (245, 220, 50),
    "green": (50, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond")

# Supersampling factor: shapes are drawn this much larger and box-filtered down, which anti-aliases the edges.
SUPERSAMPLE = 4

# Object half-extent as a fraction of the image size; small enough to leave background on every side.
MIN_RADIUS = 0.25
MAX_RADIUS = 0.42

# A pattern maps object-relative coordinates (u, v in [-1, 1], v pointing down) to RGB values (float, 0..255).
Pattern = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _unit_outline(shape: str) -> list[tuple[float, float]] | None:
    """The shape's outline in unit coordinates, its bounding box spanning [-1, 1] (None for the circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        points = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    elif shape == "triangle":
        points = [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    elif shape == "diamond":
        # Narrower than tall so that it never reads as a rotated square.
        points = [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
        return points
    elif shape == "star":
        points = []
        for k in range(10):
            # Fat inner radius: thin star arms vanish at 32 px.
            radius = 1.0 if k % 2 == 0 else 0.5
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
    elif shape == "heart":
        points = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            points.append((x, y))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    sx, sy = (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
    return [((x - cx) / sx, (y - cy) / sy) for x, y in points]


_OUTLINES = {shape: _unit_outline(shape) for shape in SHAPES}


@dataclass(frozen=True)
class Scene:
    """One object on a background. cx, cy, radius are fractions of the image size (radius = half the bbox height)."""

    shape: str
    color: str
    background: str
    cx: float
    cy: float
    radius: float


def shape_mask(
    shape: str, cx: float, cy: float, radius: float, size: int, supersample: int = SUPERSAMPLE
) -> Image.Image:
    """A mode-"L" mask of the shape drawn at size*supersample pixels (not yet downsampled)."""
    big = size * supersample
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    px, py, pr = cx * big, cy * big, radius * big
    outline = _OUTLINES[shape]
    if outline is None:
        draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=255)
    else:
        draw.polygon([(px + x * pr, py + y * pr) for x, y in outline], fill=255)
    return mask


def render_pattern(
    shape: str,
    pattern: Pattern,
    background: tuple[int, int, int],
    cx: float,
    cy: float,
    radius: float,
    size: int = 32,
) -> Image.Image:
    """Render a shape filled with an object-relative pattern over a plain background."""
    big = size * SUPERSAMPLE
    mask = np.asarray(shape_mask(shape, cx, cy, radius, size), dtype=np.float32)[..., None] / 255.0
    coords = (np.arange(big, dtype=np.float32) + 0.5) / big
    u = (coords[None, :] - cx) / radius
    v = (coords[:, None] - cy) / radius
    u, v = np.broadcast_to(u, (big, big)), np.broadcast_to(v, (big, big))
    fill = np.asarray(pattern(u, v), dtype=np.float32)
    if fill.ndim == 1:
        fill = np.broadcast_to(fill, (big, big, 3))
    bg = np.asarray(background, dtype=np.float32)
    out = fill * mask + bg * (1.0 - mask)
    image = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")
    return image.resize((size, size), Image.Resampling.BOX)


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Render a plain-coloured scene as an RGB image of size x size pixels."""
    color = np.asarray(COLORS[scene.color], dtype=np.float32)
    return render_pattern(
        scene.shape, lambda u, v: color, COLORS[scene.background], scene.cx, scene.cy, scene.radius, size
    )


def sample_placement(rng: np.random.Generator, min_radius: float = MIN_RADIUS) -> tuple[float, float, float]:
    """Random (cx, cy, radius) keeping the whole object at least ~1/32 of the image away from the border."""
    radius = float(rng.uniform(min_radius, MAX_RADIUS))
    margin = radius + 1.0 / 32
    cx = float(rng.uniform(margin, 1.0 - margin))
    cy = float(rng.uniform(margin, 1.0 - margin))
    return cx, cy, radius


def all_combos() -> list[tuple[str, str, str]]:
    """Every (shape, color, background) triple with color != background."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOR_NAMES, COLOR_NAMES) if c != b]


def _held_out() -> tuple[tuple[str, str, str], ...]:
    # A fixed draw; every shape, colour and background still appears in training through other triples.
    combos = all_combos()
    order = np.random.default_rng(20261126).permutation(len(combos))
    return tuple(sorted(combos[i] for i in order[:25]))


HELD_OUT_COMBOS: tuple[tuple[str, str, str], ...] = _held_out()
"""(shape, color, background) triples never shown to the text encoder / U-Net in training (the evaluation bar)."""

_HELD_OUT_SET = frozenset(HELD_OUT_COMBOS)


def is_held_out(shape: str, color: str, background: str) -> bool:
    return (shape, color, background) in _HELD_OUT_SET


def sample_scene(rng: np.random.Generator, allow_held_out: bool = False) -> Scene:
    """A random scene; by default never one of HELD_OUT_COMBOS (the training distribution)."""
    while True:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        background = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        if color == background or (not allow_held_out and is_held_out(shape, color, background)):
            continue
        cx, cy, radius = sample_placement(rng)
        return Scene(shape, color, background, cx, cy, radius)


def full_caption(shape: str, color: str | None = None, background: str | None = None, photo: bool = True) -> str:
    """'a photo of a red star on a blue background', leaving out the parts given as None/False."""
    text = f"{color} {shape}" if color else shape
    text = f"a photo of a {text}" if photo else f"a {text}"
    if background:
        text += f" on a {background} background"
    return text


def caption(scene: Scene, rng: np.random.Generator, drop_prob: float = 0.3) -> str:
    """A caption with some parts left out at random, so each word is learned on its own too.

    The shape noun is always kept: it is the class noun that personalization prompts rely on.
    """
    keep_color = rng.random() >= drop_prob
    keep_background = rng.random() >= drop_prob
    keep_photo = rng.random() >= 0.5
    return full_caption(
        scene.shape, scene.color if keep_color else None, scene.background if keep_background else None, keep_photo
    )


def scene_caption(scene: Scene) -> str:
    """The complete, deterministic caption of a scene."""
    return full_caption(scene.shape, scene.color, scene.background)


def to_array(image: Image.Image) -> np.ndarray:
    """uint8 HxWx3 array of an image (any mode)."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Generic two-colour patterns, used only to train the VAE so that it can encode textured objects (the novel
# subjects) without ever seeing the subjects themselves.


def _random_rgb(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.6:
        return np.asarray(COLORS[COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]], dtype=np.float32)
    return rng.uniform(0, 255, size=3).astype(np.float32)


def random_pattern(rng: np.random.Generator) -> Pattern:
    """A random two-colour pattern: stripes, dots, checkers, split halves, rings or small marks."""
    a, b = _random_rgb(rng), _random_rgb(rng)
    while float(np.abs(a - b).sum()) < 120:
        b = _random_rgb(rng)
    kind = int(rng.integers(6))
    angle = float(rng.uniform(0, math.pi))
    ca, sa = math.cos(angle), math.sin(angle)
    period = float(rng.uniform(0.35, 1.2))
    phase = float(rng.uniform(0, 1))

    def pick(cond: np.ndarray) -> np.ndarray:
        return np.where(cond[..., None], a, b)

    if kind == 0:  # stripes at any angle
        return lambda u, v: pick(np.floor((u * ca + v * sa) / period + phase) % 2 == 0)
    if kind == 1:  # dots on a grid
        radius = float(rng.uniform(0.12, 0.3)) * period / 0.7

        def dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            gu = (u / period + phase) % 1.0 - 0.5
            gv = (v / period + phase) % 1.0 - 0.5
            return pick(np.hypot(gu, gv) * period < radius)

        return dots
    if kind == 2:  # checkers
        return lambda u, v: pick((np.floor(u / period + phase) + np.floor(v / period + phase)) % 2 == 0)
    if kind == 3:  # split in two halves along a random line
        offset = float(rng.uniform(-0.4, 0.4))
        return lambda u, v: pick(u * ca + v * sa > offset)
    if kind == 4:  # concentric rings
        return lambda u, v: pick(np.floor(np.hypot(u, v) / (period * 0.5) + phase) % 2 == 0)
    # a few small blobs and a bar, like eyes and mouths
    blobs = rng.uniform(-0.6, 0.6, size=(int(rng.integers(1, 4)), 2))
    blob_r = float(rng.uniform(0.12, 0.25))
    bar_y, bar_w = float(rng.uniform(0.2, 0.6)), float(rng.uniform(0.3, 0.6))

    def marks(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        cond = (np.abs(v - bar_y) < 0.08 + blob_r / 3) & (np.abs(u) < bar_w)
        for bu, bv in blobs:
            cond |= np.hypot(u - bu, v - bv) < blob_r
        return pick(~cond)

    return marks


def render_random_textured(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A random shape filled with a random two-colour pattern on a random background (VAE training only)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    background = _random_rgb(rng)
    cx, cy, radius = sample_placement(rng)
    bg = tuple(int(x) for x in background)
    return render_pattern(shape, random_pattern(rng), bg, cx, cy, radius, size)  # type: ignore[arg-type]
