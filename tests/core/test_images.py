import os

import numpy as np
import pytest
from PIL import Image

from core import images
from core.images import ImageLoadError, convert_image, load_for_model, load_image, save_png_atomic


def _rgb(size=(40, 40), colour=(200, 30, 30)):
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "CMYK", "P", "I;16", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_converts(mode, channels):
    base = _rgb((30, 20))
    img = base.convert("I") if mode == "I" else base.convert("F") if mode == "F" else base.convert(mode) \
        if mode != "I;16" else Image.fromarray(np.full((20, 30), 40000, np.uint16))
    arr = convert_image(img, 28, channels, invert=False)
    assert arr.shape == (channels, 28, 28) and arr.dtype == np.float32
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and np.isfinite(arr).all()


def test_sixteen_bit_is_scaled_not_clipped():
    img = Image.fromarray(np.array([[0, 32768], [65535, 65535]], np.uint16))
    arr = convert_image(img, 2, 1, invert=False)
    assert arr.max() == pytest.approx(1.0, abs=1e-3) and arr.min() == pytest.approx(0.0, abs=1e-3)
    assert 0.3 < np.sort(arr.ravel())[1] < 0.7


def test_transparency_is_composited_over_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    arr = convert_image(img, 8, 3)
    assert np.allclose(arr, 1.0)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert np.allclose(convert_image(pal, 8, 3), 1.0)


def test_luminance_for_grayscale_models():
    arr = convert_image(Image.new("RGB", (4, 4), (255, 0, 0)), 4, 1, invert=False)
    assert np.allclose(arr, 0.299, atol=2e-3)


def test_non_square_input_is_centre_cropped():
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    img.paste((0, 255, 0), (20, 0, 40, 20))  # the centre square is green
    arr = convert_image(img, 10, 3)
    assert np.allclose(arr[1], 1.0, atol=0.02) and np.allclose(arr[2], 0.0, atol=0.02)


def test_auto_invert_dark_digit_on_paper():
    paper = np.full((28, 28), 255, np.uint8)
    paper[8:20, 12:16] = 0
    arr = convert_image(Image.fromarray(paper), 28, 1)
    assert arr[0, 0, 0] == pytest.approx(0.0) and arr[0, 10, 13] == pytest.approx(1.0)
    mnist_like = 255 - paper
    arr2 = convert_image(Image.fromarray(mnist_like), 28, 1)
    assert np.allclose(arr, arr2)
    assert convert_image(Image.fromarray(paper), 28, 1, invert=False)[0, 0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("WEBP", ".webp"),
                                        ("TIFF", ".tiff"), ("GIF", ".gif")])
def test_file_formats(tmp_path, fmt, suffix):
    path = tmp_path / f"img{suffix}"
    _rgb().save(path, format=fmt)
    arr = load_for_model(path, 32, 3)
    assert arr.shape == (3, 32, 32)
    assert arr[0].mean() > arr[1].mean()  # still red


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not an image")
    with pytest.raises(ImageLoadError, match="notes.png.*not a recognised image"):
        load_image(path)


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(path)


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 200 * 200)
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(path)


def test_save_png_atomic_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.random((3, 9, 7)).astype(np.float32)
    out = save_png_atomic(arr, tmp_path / "sub" / "adv.png")
    back = np.asarray(Image.open(out)).transpose(2, 0, 1) / 255.0
    assert np.array_equal(np.round(back * 255), np.round(arr * 255))
    assert os.listdir(tmp_path / "sub") == ["adv.png"]


def test_save_refuses_to_overwrite_source(tmp_path):
    src = tmp_path / "input.png"
    _rgb().save(src)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="refusing"):
        save_png_atomic(np.zeros((3, 4, 4)), src, source=src)
    assert src.read_bytes() == before
