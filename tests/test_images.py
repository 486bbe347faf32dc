import io

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


def test_hidden_files_are_skipped(tmp_path):
    save(Image.new("RGB", (32, 32), (1, 2, 3)), tmp_path / "good.png")
    (tmp_path / "._good.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    assert load_subject_images(tmp_path, resolution=16).names == ["good.png"]
