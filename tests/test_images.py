import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personalization.images import (
    ImageError,
    check_image_count,
    fit_square,
    load_subject_images,
    sort_subject_images,
)
from tests.conftest import make_mixed_upload
from tests.tiny_pipeline import TINY_RESOLUTION


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path):
    # A 40x20 image whose EXIF says "rotate 90": upright it is 20 wide and 40 tall.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_subject_images(path, resolution=16, center_crop=False)
    array = np.asarray(loaded.images[0]).astype(int)
    # After the 90° turn the blue half is on top, the red half below.
    assert array[2, 8, 2] > 200 and array[13, 8, 0] > 200


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16", "L", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    source = Image.new("RGB", (32, 32), (10, 200, 30))
    if mode == "I;16":
        image = Image.fromarray((np.full((32, 32), 40000, dtype=np.uint16)), mode="I;16")
        path = save(image, tmp_path / "deep.png")
    else:
        image = source.convert(mode)
        path = save(image, tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
    loaded = load_subject_images(path, resolution=16)
    assert loaded.images[0].mode == "RGB" and loaded.images[0].size == (16, 16)


def test_transparency_becomes_white(tmp_path):
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    loaded = load_subject_images(save(image, tmp_path / "clear.png"), resolution=16)
    assert np.asarray(loaded.images[0]).min() >= 250


def test_sixteen_bit_keeps_its_brightness(tmp_path):
    image = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16), mode="I;16")
    loaded = load_subject_images(save(image, tmp_path / "deep.png"), resolution=16)
    assert 120 <= np.asarray(loaded.images[0]).mean() <= 135


def test_center_crop_and_pad():
    wide = Image.new("RGB", (60, 20), (0, 0, 0))
    wide.paste((255, 255, 255), (20, 0, 40, 20))
    assert np.asarray(fit_square(wide, 10, center_crop=True)).min() > 200
    padded = np.asarray(fit_square(wide, 12, center_crop=False))
    assert padded.shape == (12, 12, 3)


def test_non_image_is_named(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not a picture")
    with pytest.raises(ImageError, match=r"^notes.png: not an image file"):
        load_subject_images(path, resolution=16)


def test_truncated_file_is_named(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"^cut.png: the file is damaged or truncated"):
        load_subject_images(path, resolution=16)


def test_decompression_bomb_is_refused(tmp_path):
    path = save(Image.new("1", (10_000, 10_000)), tmp_path / "bomb.png")
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match=r"^bomb.png: .*decompression bomb"):
        load_subject_images(path, resolution=16)


def test_too_small_is_refused_with_the_size(tmp_path):
    path = save(Image.new("RGB", (100, 30)), tmp_path / "tiny.jpg")
    with pytest.raises(ImageError, match=r"^tiny.jpg: 100x30 is too small; each side needs at least 256 px"):
        load_subject_images(path, resolution=512)


def test_animated_image_uses_its_first_frame_and_says_so(tmp_path):
    frames = [Image.new("RGB", (32, 32), color) for color in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = load_subject_images(path, resolution=16)
    assert np.asarray(loaded.images[0])[..., 0].mean() > 200
    assert loaded.notes == ["anim.gif: animated image (2 frames), used its first frame"]


def test_counts_are_checked(tmp_path):
    with pytest.raises(ImageError, match="no subject images"):
        check_image_count(0)
    with pytest.raises(ImageError, match="51 subject images is too many: at most 50"):
        check_image_count(51)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no image files"):
        load_subject_images(tmp_path / "empty", resolution=16)


def test_sort_keeps_good_files_and_lists_bad_ones(tmp_path):
    good = save(Image.new("RGB", (32, 32), (1, 2, 3)), tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    kept, rejected = sort_subject_images([good, bad], resolution=16)
    assert kept.names == ["good.png"]
    assert [r.name for r in rejected] == ["bad.jpg"]
    assert "damaged" in rejected[0].reason or "not an image" in rejected[0].reason


def test_system_files_are_skipped_and_said(tmp_path):
    save(Image.new("RGB", (32, 32), (1, 2, 3)), tmp_path / "good.png")
    (tmp_path / "._good.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    loaded = load_subject_images(tmp_path, resolution=16)
    assert loaded.names == ["good.png"]
    assert loaded.notes == ["skipped .DS_Store (a macOS system file, not a photo)",
                            "skipped ._good.png (a macOS resource fork, not a photo)"]


def app_outcomes(files: list[Path]) -> dict[str, tuple[str, str]]:
    """The app's lenient path: every uploaded file at once; the good ones kept, the others listed."""
    kept, rejected = sort_subject_images(files, resolution=TINY_RESOLUTION)
    outcomes = {name: ("used", "") for name in kept.names}
    outcomes |= {r.name: ("refused", r.reason) for r in rejected}
    outcomes |= {s.name: ("skipped", str(s)) for s in kept.skipped}
    assert [str(s) for s in kept.skipped] == [n for n in kept.notes if n.startswith("skipped ")]
    return outcomes


def cli_outcomes(folder: Path) -> dict[str, tuple[str, str]]:
    """The CLI's strict path: the run stops at the first refused file; the user removes it and runs again."""
    refused: dict[str, tuple[str, str]] = {}
    for _ in range(len(list(folder.iterdir())) + 1):
        try:
            loaded = load_subject_images(folder, resolution=TINY_RESOLUTION)
            break
        except ImageError as error:
            name = next(p.name for p in folder.iterdir() if str(error).startswith(f"{p.name}: "))
            refused[name] = ("refused", str(error).removeprefix(f"{name}: "))
            (folder / name).unlink()
    assert list(refused) == sorted(refused), "the CLI names the refused files in the folder's order"
    outcomes = {name: ("used", "") for name in loaded.names} | refused
    return outcomes | {s.name: ("skipped", str(s)) for s in loaded.skipped}


def test_every_file_is_used_refused_or_skipped_alike_in_cli_and_app(tmp_path):
    expected = make_mixed_upload(tmp_path / "upload")
    app = app_outcomes(sorted((tmp_path / "upload").iterdir()))
    cli = cli_outcomes(shutil.copytree(tmp_path / "upload", tmp_path / "cli"))
    assert {name: outcome for name, (outcome, _) in app.items()} == expected
    assert cli == app
    assert app["drawing.svg"][1] == "SVG is a vector drawing, not a photo; export it as PNG or JPEG"
    assert app["readme.txt"][1] == "not an image file Pillow can read"
    assert app["damaged.png"][1].startswith("the file is damaged or truncated")
    assert app["Thumbs.db"][1] == "skipped Thumbs.db (a Windows system file, not a photo)"
    assert app[".DS_Store"][1] == "skipped .DS_Store (a macOS system file, not a photo)"


def test_content_decides_not_the_name(tmp_path):
    (tmp_path / "logo.png").write_text('<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>')
    save(Image.new("RGB", (32, 32), (9, 9, 9)), tmp_path / "photo.txt", format="PNG")
    # A real photo under a system file's name is used: only non-images are ever skipped.
    save(Image.new("RGB", (32, 32), (9, 9, 9)), tmp_path / "._photo.jpg", format="JPEG")
    kept, rejected = sort_subject_images(sorted(tmp_path.iterdir()), resolution=16)
    assert kept.names == ["._photo.jpg", "photo.txt"] and not kept.notes
    assert [str(r) for r in rejected] == ["logo.png: SVG is a vector drawing, not a photo; export it as PNG or JPEG"]


def test_iphone_heic_gets_a_reason_that_says_what_to_do(tmp_path):
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    with pytest.raises(ImageError, match=r"^IMG_0001.HEIC: HEIC/HEIF .*export it as JPEG or PNG$"):
        load_subject_images(path, resolution=16)


def test_sub_folders_are_said_not_searched(tmp_path):
    save(Image.new("RGB", (32, 32), (1, 2, 3)), tmp_path / "good.png")
    save(Image.new("RGB", (32, 32), (1, 2, 3)), (tmp_path / "rejects").mkdir() or tmp_path / "rejects" / "old.png")
    (tmp_path / "__MACOSX").mkdir()
    loaded = load_subject_images(tmp_path, resolution=16)
    assert loaded.names == ["good.png"]
    assert loaded.notes == ["skipped __MACOSX/ (a macOS archive folder, not photos)",
                            "skipped rejects/ (a sub-folder; only the files directly in the images folder are used)"]
    kept, _ = sort_subject_images(sorted(tmp_path.iterdir()), resolution=16)
    assert kept.notes == loaded.notes
