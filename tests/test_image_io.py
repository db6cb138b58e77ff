"""Bad or unusual images give clear errors or correct RGB, never a crash or a silent mis-read."""

import io

import numpy as np
import pytest
from PIL import Image

from assistant.image_io import MAX_PIXELS, ImageError, fit_long_side, load_image, shrink_long_side


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_missing_empty_and_non_image_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(text)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_truncated_file_is_reported_as_corrupt():
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    # A PNG header claiming a huge canvas: tiny on disk, enormous in memory.
    bomb = encoded(Image.new("1", (10000, 10000)))
    assert len(bomb) < 100_000 and 10000 * 10000 > MAX_PIXELS
    with pytest.raises(ImageError, match="megapixel limit|too large"):
        load_image(bomb)


def test_sixteen_bit_grayscale_keeps_its_dynamic_range():
    array = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(np.uint16)
    image = load_image(encoded(Image.fromarray(array)))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new(mode, (20, 10))
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    result = load_image(encoded(image, fmt))
    assert result.mode == "RGB" and result.size == (20, 10)


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    rotated = load_image(encoded(image, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (20, 40)


def test_arrays_and_bad_arrays():
    assert load_image(np.zeros((5, 6), dtype=np.uint8)).size == (6, 5)
    wide = load_image(np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000)
    assert np.asarray(wide).max() == 255 and np.asarray(wide).min() == 0
    assert load_image(np.ones((5, 6, 3), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((3, 3), np.nan))
    with pytest.raises(ImageError, match="unsupported"):
        load_image(12345)


def test_fitting_the_long_side_keeps_the_official_roundings():
    """MMAD's scripts truncate `int(side * scale)`; the ROI source, preview and metrics round."""
    rng = np.random.default_rng(0)
    for height, width, side in rng.integers(1, 5000, size=(5000, 3)).tolist():
        scale = side / max(height, width)
        official = max(1, int(height * scale)), max(1, int(width * scale))
        assert fit_long_side((height, width), side, floor=True, upscale=True) == official
        expected = (height, width) if scale >= 1 else (max(1, round(height * scale)), max(1, round(width * scale)))
        assert fit_long_side((height, width), side) == expected
    assert fit_long_side((3, 20_000), 1024) == (1, 1024)  # a line-scan strip keeps at least one row


def test_anomaly_ov_shrinks_the_long_side_to_exactly_1024():
    """Anomaly-OV's scripts: long side 1024, short `int(1024 * short / long)`; `int(long * (1024 / long))` would
    give 1023 for many sizes."""
    off_by_one = 0
    for long in range(1025, 6000):
        for short in (1, 7, long // 3, (3 * long) // 4, long):
            expected = (1024, int(1024 * short / long))
            assert shrink_long_side((long, short), 1024) == (expected[0], max(1, expected[1]))
            assert shrink_long_side((short, long), 1024) == (max(1, expected[1]), expected[0])
        off_by_one += int(long * (1024 / long)) != 1024
    assert off_by_one > 0  # the rule this replaces
    assert shrink_long_side((4032, 3024), 1024) == (1024, 768)
    assert shrink_long_side((800, 1024), 1024) == (800, 1024)
    assert shrink_long_side((5000, 3000), None) == (5000, 3000)
