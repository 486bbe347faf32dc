"""Loading and preparing subject images: every file is checked before anything is trained or written.

Each refusal is a one-line :class:`ImageError` that names the file and the problem.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MAX_SUBJECT_IMAGES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Far above any photo people upload, far below what exhausts memory (Pillow's own default warns at ~89 Mpx).
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """A subject image (or the set of them) cannot be used; the message names the file."""


@dataclass
class SubjectImages:
    """Prepared, square RGB images of one subject plus the notes collected while preparing them."""

    images: list[Image.Image]
    names: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Rejection:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def list_image_files(source: Path | str | Sequence[Path | str]) -> list[Path]:
    """Files to load: a folder's image files (sorted) or the given files as they are."""
    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.exists():
            raise ImageError(f"{folder}: no such file or folder")
        if folder.is_file():
            return [folder]
        # Hidden files (macOS "._IMG.jpg" resource forks, ".DS_Store") are never photos.
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ImageError(f"{folder}: the folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    return [Path(p) for p in source]


def open_subject_image(path: Path, resolution: int) -> tuple[Image.Image, list[str]]:
    """Open one file as an upright RGB image, or raise :class:`ImageError` naming it. Returns (image, notes)."""
    name = path.name
    notes: list[str] = []
    if not path.is_file():
        raise ImageError(f"{name}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > MAX_PIXELS:
                    raise ImageError(f"{name}: {width}x{height} is too large to be a photo (decompression bomb?)")
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    notes.append(f"{name}: animated image ({frames} frames), used its first frame")
                    opened.seek(0)
                opened.load()
                image = ImageOps.exif_transpose(opened)
                image = _to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: the image is too large to be a photo (decompression bomb?)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    except OSError as error:
        raise ImageError(f"{name}: the file is damaged or truncated ({error})") from None
    except (SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{name}: the image data is invalid ({error})") from None
    min_side = resolution // 2
    if min(image.size) < min_side:
        raise ImageError(
            f"{name}: {image.size[0]}x{image.size[1]} is too small; each side needs at least {min_side} px "
            f"(half the training resolution {resolution})"
        )
    return image, notes


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode people upload; transparent areas become white, as a product photo would show them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255.0).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "CMYK":
        return image.convert("RGB")
    return image.convert("RGB")


def fit_square(image: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """Center-crop (or pad with the border colour) to a square, then resize to ``resolution``."""
    width, height = image.size
    if center_crop:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = image.crop((left, top, left + side, top + side))
    else:
        side = max(width, height)
        border = tuple(int(v) for v in np.asarray(image)[[0, -1], :, :].reshape(-1, 3).mean(axis=0))
        square = Image.new("RGB", (side, side), border)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)


def load_subject_images(
    source: Path | str | Sequence[Path | str],
    resolution: int,
    center_crop: bool = True,
    max_images: int = MAX_SUBJECT_IMAGES,
) -> SubjectImages:
    """Open, check and square every image; raise :class:`ImageError` on the first bad file or a bad count."""
    files = list_image_files(source)
    check_image_count(len(files), max_images)
    images, names, notes = [], [], []
    for path in files:
        image, file_notes = open_subject_image(path, resolution)
        images.append(fit_square(image, resolution, center_crop))
        names.append(path.name)
        notes.extend(file_notes)
    return SubjectImages(images, names, notes)


def sort_subject_images(
    files: Iterable[Path | str], resolution: int, center_crop: bool = True, max_images: int = MAX_SUBJECT_IMAGES
) -> tuple[SubjectImages, list[Rejection]]:
    """Keep the good files and list the bad ones with their reason (the app shows both)."""
    images, names, notes, rejected = [], [], [], []
    for raw in files:
        path = Path(raw)
        try:
            image, file_notes = open_subject_image(path, resolution)
        except ImageError as error:
            rejected.append(Rejection(path.name, str(error).removeprefix(f"{path.name}: ")))
            continue
        if len(images) >= max_images:
            rejected.append(Rejection(path.name, f"more than {max_images} images; this one was left out"))
            continue
        images.append(fit_square(image, resolution, center_crop))
        names.append(path.name)
        notes.extend(file_notes)
    return SubjectImages(images, names, notes), rejected


def check_image_count(count: int, max_images: int = MAX_SUBJECT_IMAGES) -> None:
    """Raise :class:`ImageError` unless ``1 <= count <= max_images``."""
    if count < 1:
        raise ImageError("no subject images: give at least 1 (3-10 photos work best)")
    if count > max_images:
        raise ImageError(f"{count} subject images is too many: at most {max_images} (3-10 photos work best)")


def to_tensor_batch(images: Sequence[Image.Image]) -> np.ndarray:
    """Images as float32 NCHW in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return (array / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()
