"""Analytic reading of mini-world images, and a subject-fidelity score.

Because the world is rendered from a known palette and known shape outlines, an image can be read without a
learned classifier:

* background: the most common nearest-palette colour on the image border;
* object colour: the most common nearest-palette colour (other than the background) among the pixels far from the
  background colour;
* shape: the object mask (pixels at least halfway from the background colour to the object colour, holes filled,
  largest connected component) is compared with every shape's outline drawn into the mask's bounding box (with
  small shifts and scales); the best intersection-over-union wins.

`subject_fidelity` compares the object of a generated image with the objects of a subject's reference images after
normalizing position and scale (bounding box -> a 16x16 grid), so it measures appearance, not placement.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from personalization.mini_world.world import COLOR_NAMES, COLORS, SHAPES, full_caption, shape_mask

_PALETTE = np.asarray([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)

# A pixel counts as object when its distance from the background colour exceeds this fraction of the
# background-to-object distance (0.5 is the anti-aliased edge).
EDGE_FRACTION = 0.5
# Below this RGB distance from the background nothing is considered an object.
MIN_CONTRAST = 40.0
GRID = 16
# Two grid cells agree when their mean colours are closer than this (nearest palette colours are >= 77 apart).
CELL_TOLERANCE = 60.0


@dataclass(frozen=True)
class Reading:
    """What the checker reads from an image. color/shape are None when no object is found."""

    background: str
    color: str | None
    shape: str | None
    shape_iou: float = 0.0
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    return arr * 255.0 if arr.max() <= 1.0 else arr


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of the nearest palette colour, for an (..., 3) array."""
    d = np.linalg.norm(rgb[..., None, :] - _PALETTE, axis=-1)
    return d.argmin(axis=-1)


def _border(arr: np.ndarray, width: int = 1) -> np.ndarray:
    return np.concatenate(
        [
            arr[:width].reshape(-1, 3),
            arr[-width:].reshape(-1, 3),
            arr[width:-width, :width].reshape(-1, 3),
            arr[width:-width, -width:].reshape(-1, 3),
        ]
    )


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Pixels not reachable from the border through non-mask pixels are filled."""
    outside = np.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = ~mask[0], ~mask[-1], ~mask[:, 0], ~mask[:, -1]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown


def _largest_component(mask: np.ndarray) -> np.ndarray:
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        comp, queue = [], deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            comp.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


# Masks' centres and radii are half-pixel multiples, so the same few templates recur across images: drawing them
# was the larger part of reading an image.
@functools.lru_cache(maxsize=8192)
def _template(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    big = shape_mask(shape, cx / size, cy / size, radius / size, size)
    template = np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) >= 128
    template.flags.writeable = False  # shared between callers through the cache
    return template


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """Best-matching shape of a boolean object mask and its IoU (None if the mask is empty)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None, 0.0
    size = mask.shape[0]
    cx = (xs.min() + xs.max() + 1) / 2
    cy = (ys.min() + ys.max() + 1) / 2
    radius = (ys.max() - ys.min() + 1) / 2
    best_shape, best_iou = None, -1.0
    for shape in SHAPES:
        for dx, dy, dr in itertools.product((-0.5, 0.0, 0.5), (-0.5, 0.0, 0.5), (-0.5, 0.0, 0.5)):
            tpl = _template(shape, cx + dx, cy + dy, max(radius + dr, 1.0), size)
            iou = float((tpl & mask).sum() / max((tpl | mask).sum(), 1))
            if iou > best_iou:
                best_shape, best_iou = shape, iou
    return best_shape, best_iou


def _object(arr: np.ndarray) -> tuple[int, np.ndarray, int | None, np.ndarray | None]:
    """(background index, background rgb, object colour index, object mask) of an HxWx3 float array."""
    border = _border(arr, width=1)
    labels = nearest_color(border)
    bg = int(np.bincount(labels, minlength=len(COLOR_NAMES)).argmax())
    bg_rgb = np.median(border[labels == bg], axis=0)
    dist = np.linalg.norm(arr - bg_rgb, axis=-1)
    candidates = dist > MIN_CONTRAST
    if candidates.sum() < 4:
        return bg, bg_rgb, None, None
    pixels = arr[candidates]
    labels = nearest_color(pixels)
    counts = np.bincount(labels, minlength=len(COLOR_NAMES))
    counts[bg] = 0
    if counts.max() == 0:
        return bg, bg_rgb, None, None
    obj = int(counts.argmax())
    # Patterned objects have several colours; the edge threshold follows the one closest to the background, or
    # e.g. red stripes on an orange background would drop out of a white-and-red star's mask.
    shares = counts / counts.sum()
    gaps = [
        float(np.linalg.norm(np.median(pixels[labels == c], axis=0) - bg_rgb))
        for c in range(len(COLOR_NAMES))
        if shares[c] >= 0.15
    ]
    threshold = max(MIN_CONTRAST, EDGE_FRACTION * min(gaps))
    mask = _largest_component(_fill_holes(dist > threshold))
    return bg, bg_rgb, obj, mask


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Read background colour, object colour and shape of a mini-world image (PIL or HxWx3 array)."""
    arr = _as_array(image)
    bg, _, obj, mask = _object(arr)
    if obj is None or mask is None:
        return Reading(COLOR_NAMES[bg], None, None)
    shape, iou = classify_shape(mask)
    return Reading(COLOR_NAMES[bg], COLOR_NAMES[obj], shape, iou, mask)


# ---------------------------------------------------------------------------------------------------------------
# Subject fidelity


@dataclass(frozen=True)
class _Descriptor:
    grid: np.ndarray  # GRID x GRID x 3 mean colours over the object's bounding box
    grid_mask: np.ndarray  # GRID x GRID bool, cells mostly covered by the object
    histogram: np.ndarray  # fraction of object pixels nearest to each palette colour


def _describe(image: Image.Image | np.ndarray) -> _Descriptor | None:
    arr = _as_array(image)
    _, _, obj, mask = _object(arr)
    if obj is None or mask is None or mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    crop = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).crop(box)
    grid = np.asarray(crop.resize((GRID, GRID), Image.Resampling.BILINEAR), dtype=np.float32)
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255).crop(box)
    grid_mask = np.asarray(mask_img.resize((GRID, GRID), Image.Resampling.BILINEAR), dtype=np.float32) >= 128
    hist = np.bincount(nearest_color(arr[mask]), minlength=len(COLOR_NAMES)).astype(np.float32)
    return _Descriptor(grid, grid_mask, hist / hist.sum())


def _similarity(a: _Descriptor, b: _Descriptor) -> float:
    both = a.grid_mask & b.grid_mask
    either = a.grid_mask | b.grid_mask
    if not both.any():
        return 0.0
    outline = both.sum() / either.sum()
    close = np.linalg.norm(a.grid[both] - b.grid[both], axis=-1) < CELL_TOLERANCE
    layout = float(close.mean())
    palette = float(np.minimum(a.histogram, b.histogram).sum())
    return float(outline * layout * palette)


def subject_fidelity(image: Image.Image | np.ndarray, reference_images: Sequence[Image.Image | np.ndarray]) -> float:
    """How much the object in `image` looks like the subject of `reference_images`, in [0, 1].

    Per reference: (outline IoU of the normalized object masks) x (fraction of normalized grid cells whose colour
    matches) x (palette-histogram intersection); the score is the mean over references. 0 when no object is found.
    """
    desc = _describe(image)
    if desc is None:
        return 0.0
    return SubjectReferences(reference_images).similarity(desc)


class SubjectReferences:
    """A subject's reference images, read once: :func:`subject_fidelity` against them for many images (a scorer
    reads 16 images per checkpoint against the same references)."""

    def __init__(self, reference_images: Sequence[Image.Image | np.ndarray]) -> None:
        self.images = list(reference_images)
        self._descriptors: list[_Descriptor] | None = None

    def fidelity(self, image: Image.Image | np.ndarray) -> float:
        """:func:`subject_fidelity` of ``image`` against these references."""
        desc = _describe(image)
        return 0.0 if desc is None else self.similarity(desc)

    def similarity(self, desc: _Descriptor) -> float:
        if self._descriptors is None:
            self._descriptors = [d for d in (_describe(r) for r in self.images) if d is not None]
        if not self._descriptors:
            raise ValueError("no object found in any reference image")
        return float(np.mean([_similarity(desc, r) for r in self._descriptors]))


# ---------------------------------------------------------------------------------------------------------------
# Evaluating a pipeline


@dataclass
class EvalResult:
    """Accuracies over generated images, and one row per image (prompt, expected, read)."""

    background: float
    color: float
    shape: float
    all_three: float
    rows: list[dict]

    def as_dict(self) -> dict[str, float]:
        return {"background": self.background, "color": self.color, "shape": self.shape, "all": self.all_three}


def evaluate_prompts(
    pipeline: object,
    combos: Iterable[tuple[str, str, str]],
    n_images: int = 200,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 50,
    guidance_rescale: float = 0.0,
) -> EvalResult:
    """Generate n_images for 'a photo of a {color} {shape} on a {background} background' cycling over combos, read
    them back and return accuracies. Samples with DDIM (trailing spacing from the pipeline's scheduler config)."""
    from diffusers import DDIMScheduler

    combos = list(combos)
    jobs = [combos[i % len(combos)] for i in range(n_images)]
    original = pipeline.scheduler  # type: ignore[attr-defined]
    pipeline.scheduler = DDIMScheduler.from_config(original.config)  # type: ignore[attr-defined]
    rows: list[dict] = []
    try:
        import torch

        for start in range(0, n_images, batch_size):
            chunk = jobs[start : start + batch_size]
            prompts = [full_caption(s, c, b) for s, c, b in chunk]
            generator = torch.Generator("cpu").manual_seed(seed + start)
            images = pipeline(  # type: ignore[operator]
                prompts,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
                generator=generator,
            ).images
            for (shape, color, background), prompt, image in zip(chunk, prompts, images, strict=True):
                r = read_image(image)
                rows.append(
                    {
                        "prompt": prompt,
                        "expected": (shape, color, background),
                        "read": (r.shape, r.color, r.background),
                        "image": image,
                    }
                )
    finally:
        pipeline.scheduler = original  # type: ignore[attr-defined]
    n = max(len(rows), 1)
    bg = sum(r["read"][2] == r["expected"][2] for r in rows) / n
    col = sum(r["read"][1] == r["expected"][1] for r in rows) / n
    shp = sum(r["read"][0] == r["expected"][0] for r in rows) / n
    allr = sum(r["read"] == r["expected"] for r in rows) / n
    return EvalResult(bg, col, shp, allr, rows)
