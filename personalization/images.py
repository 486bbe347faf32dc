"""Loading and preparing subject images: every file is checked before anything is trained or written.

The rule, the same for the CLI and the app: every file given (or found directly in the images folder) is
used, refused with its reason, or skipped with a note, never silently ignored. Pillow decides what is an image,
not the file name. Only what is surely not a photo is skipped: operating-system files (``.DS_Store``,
``Thumbs.db``, ``._*`` resource forks) that Pillow cannot read, this project's ``subject.json``, and
sub-folders, which are not searched because people park their rejects in them.
Each refusal is a one-line :class:`ImageError` that names the file and the problem; the CLI stops at the first,
the app (:func:`sort_subject_images`) keeps the good files and lists the refused ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MAX_SUBJECT_IMAGES

# Files that operating systems and zip tools leave next to photos (lower-case names); skipped, with a note.
SYSTEM_FILES = {
    ".ds_store": "a macOS system file", ".localized": "a macOS system file",
    "thumbs.db": "a Windows system file", "ehthumbs.db": "a Windows system file",
    "desktop.ini": "a Windows system file",
    "subject.json": "this project's subject description",
}
SVG_REASON = "SVG is a vector drawing, not a photo; export it as PNG or JPEG"
HEIC_REASON = "HEIC/HEIF photo (the iPhone format) that this Pillow cannot read; export it as JPEG or PNG"
# Far above any photo people upload, far below what exhausts memory (Pillow's own default warns at ~89 Mpx).
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """A subject image (or the set of them) cannot be used; the message names the file."""


@dataclass
class SubjectImages:
    """Prepared, square RGB images of one subject plus the notes collected while preparing them."""

    images: list[Image.Image]
    names: list[str]
    notes: list[str] = field(default_factory=list)  # includes one "skipped ..." note per skipped file
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Rejection:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class Skipped:
    """A file or folder left out because it is surely not a photo; ``str()`` is the note both front ends show."""

    name: str  # a folder's name ends with "/"
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.name} ({self.reason})"


def skip_reason(path: Path) -> str | None:
    """Why ``path`` is skipped, or None when it is to be opened (and then used or refused)."""
    if path.is_dir():
        if path.name == "__MACOSX":
            return "a macOS archive folder, not photos"
        return "a sub-folder; only the files directly in the images folder are used"
    kind = "a macOS resource fork" if path.name.startswith("._") else SYSTEM_FILES.get(path.name.lower())
    # A real image under such a name is still a photo: the name alone never drops a readable image.
    if kind is None or not path.is_file() or _pillow_identifies(path):
        return None
    return f"{kind}, not a photo"


def _pillow_identifies(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except Image.DecompressionBombError:
        return True
    except Exception:  # anything Pillow cannot open is not an image to it
        return False


def scan_subject_files(source: Path | str | Sequence[Path | str]) -> tuple[list[Path], list[Skipped]]:
    """The files to open (a folder's entries, sorted, or the given paths) and the ones skipped, with why."""
    entries = _entries(source)
    files, skipped = [], []
    for path in entries:
        reason = skip_reason(path)
        if reason is None:
            files.append(path)
        else:
            skipped.append(Skipped(path.name + ("/" if path.is_dir() else ""), reason))
    if not files and isinstance(source, str | Path) and Path(source).is_dir():
        said = "".join(f"; {item}" for item in skipped)
        raise ImageError(f"{source}: the folder holds no image files{said}")
    return files, skipped


def _entries(source: Path | str | Sequence[Path | str]) -> list[Path]:
    if not isinstance(source, str | Path):
        return [Path(p) for p in source]
    folder = Path(source)
    if not folder.exists():
        raise ImageError(f"{folder}: no such file or folder")
    return sorted(folder.iterdir()) if folder.is_dir() else [folder]


def list_image_files(source: Path | str | Sequence[Path | str]) -> list[Path]:
    """The files :func:`load_subject_images` opens: every entry of :func:`scan_subject_files` not skipped."""
    return scan_subject_files(source)[0]


def open_subject_image(path: Path, resolution: int) -> tuple[Image.Image, list[str]]:
    """Open one file as an upright RGB image, or raise :class:`ImageError` naming it. Returns (image, notes)."""
    name = path.name
    notes: list[str] = []
    if not path.exists():
        raise ImageError(f"{name}: no such file")
    if not path.is_file():  # a pipe or device would block or stream forever when read
        raise ImageError(f"{name}: not a regular file")
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
        raise ImageError(f"{name}: {_unreadable_reason(path)}") from None
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


def _unreadable_reason(path: Path) -> str:
    """Say what the file is when people commonly mistake it for a photo, so the reason tells them what to do."""
    with path.open("rb") as handle:
        head = handle.read(1024)
    if b"<svg" in head.lower():
        return SVG_REASON
    if head[4:8] == b"ftyp" and head[8:12] in {b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1"}:
        return HEIC_REASON
    return "not an image file Pillow can read"


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
    """Open, check and square every image; raise :class:`ImageError` on the first bad file or a bad count.

    The strict side of the rule (the CLI): skipped files become notes, any refused file stops the load.
    """
    files, skipped = scan_subject_files(source)
    check_image_count(len(files), max_images)
    images, names, notes = [], [], [str(item) for item in skipped]
    for path in files:
        image, file_notes = open_subject_image(path, resolution)
        images.append(fit_square(image, resolution, center_crop))
        names.append(path.name)
        notes.extend(file_notes)
    return SubjectImages(images, names, notes, skipped)


def sort_subject_images(
    files: Iterable[Path | str], resolution: int, center_crop: bool = True, max_images: int = MAX_SUBJECT_IMAGES
) -> tuple[SubjectImages, list[Rejection]]:
    """Keep the good files and list the bad ones with their reason (the app shows both).

    The lenient side of the rule (the app): the same decisions and reasons as :func:`load_subject_images`;
    skipped files are in ``SubjectImages.skipped`` and, as notes, in ``SubjectImages.notes``.
    """
    candidates, skipped = scan_subject_files(list(files))
    images, names, notes, rejected = [], [], [str(item) for item in skipped], []
    for path in candidates:
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
    return SubjectImages(images, names, notes, skipped), rejected


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
