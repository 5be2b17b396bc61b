"""Tests for core.images: every test image is generated in tmp_path or in memory."""
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rdc_studio.core import images
from rdc_studio.core.images import (ImageLoadError, border_mean, convert_image, image_from_array, load_for_model,
                         load_image, save_png_atomic)

SIZE = (30, 20)  # deliberately not square
TOL = 2.5 / 255  # 8-bit rounding in Pillow's conversions / compositing


def _luma(rgb):
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _palette_image(index, colour, transparent_index=None):
    img = Image.new("P", SIZE, index)
    palette = [0, 0, 0] * 256
    palette[3 * index:3 * index + 3] = colour
    img.putpalette(palette)
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


def _l_with_transparent_value():
    img = Image.new("L", SIZE, 7)
    img.info["transparency"] = 7
    return img


# (image factory, expected RGB in [0, 1] of every output pixel)
MODE_CASES = {
    "RGB": (lambda: Image.new("RGB", SIZE, (200, 30, 30)), (200 / 255, 30 / 255, 30 / 255)),
    "RGBA-opaque": (lambda: Image.new("RGBA", SIZE, (200, 30, 30, 255)), (200 / 255, 30 / 255, 30 / 255)),
    "RGBA-transparent": (lambda: Image.new("RGBA", SIZE, (0, 0, 0, 0)), (1.0, 1.0, 1.0)),
    "RGBA-half-black": (lambda: Image.new("RGBA", SIZE, (0, 0, 0, 128)), (127 / 255,) * 3),
    "LA-opaque": (lambda: Image.new("LA", SIZE, (100, 255)), (100 / 255,) * 3),
    "LA-transparent": (lambda: Image.new("LA", SIZE, (0, 0)), (1.0, 1.0, 1.0)),
    "L": (lambda: Image.new("L", SIZE, 100), (100 / 255,) * 3),
    "L-transparent-value": (_l_with_transparent_value, (1.0, 1.0, 1.0)),
    "1-white": (lambda: Image.new("1", SIZE, 1), (1.0, 1.0, 1.0)),
    "1-black": (lambda: Image.new("1", SIZE, 0), (0.0, 0.0, 0.0)),
    "P": (lambda: _palette_image(3, [10, 200, 60]), (10 / 255, 200 / 255, 60 / 255)),
    "P-transparent": (lambda: _palette_image(3, [10, 200, 60], transparent_index=3), (1.0, 1.0, 1.0)),
    "CMYK-cyan": (lambda: Image.new("CMYK", SIZE, (255, 0, 0, 0)), (0.0, 1.0, 1.0)),
    "I;16": (lambda: Image.fromarray(np.full(SIZE[::-1], 40000, np.uint16)), (40000 / 65535,) * 3),
    "I-16bit-values": (lambda: Image.new("I", SIZE, 1000), (1000 / 65535,) * 3),
    "I-8bit-values": (lambda: Image.new("I", SIZE, 100), (100 / 255,) * 3),
    "F": (lambda: Image.new("F", SIZE, 0.25), (0.25,) * 3),
    "F-0-255": (lambda: Image.new("F", SIZE, 51.0), (0.2,) * 3),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_converts_to_expected_values(case, channels):
    factory, expected_rgb = MODE_CASES[case]
    img = factory()
    arr = convert_image(img, 12, channels, invert=False)
    assert arr.shape == (channels, 12, 12) and arr.dtype == np.float32
    assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0
    expected = np.array(expected_rgb if channels == 3 else [_luma(expected_rgb)], np.float32)
    np.testing.assert_allclose(arr, np.broadcast_to(expected[:, None, None], arr.shape), atol=TOL)


def test_sixteen_bit_is_scaled_not_clipped():
    img = Image.fromarray(np.array([[0, 32768], [65535, 65535]], np.uint16))
    assert img.mode.startswith("I;16")
    arr = convert_image(img, 2, 1, invert=False)
    assert arr.max() == 1.0 and arr.min() == 0.0
    assert arr[0, 0, 1] == pytest.approx(32768 / 65535, abs=1e-6)  # would be 1.0 if clipped at 255


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_file_round_trip(tmp_path, fmt):
    values = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    path = tmp_path / f"deep.{fmt.lower()}"
    Image.fromarray(values).save(path, format=fmt)
    arr = load_for_model(path, 16, 1, invert=False)
    assert arr.max() == 1.0 and arr.min() == 0.0
    np.testing.assert_allclose(arr[0], values / 65535.0, atol=1e-6)


def test_float_image_with_nan_and_out_of_range_values_is_sanitised():
    values = np.array([[np.nan, -3.0], [0.5, 7.0]], np.float32)  # peak > 1: read as 0..255
    arr = convert_image(Image.fromarray(values, mode="F"), 2, 1, invert=False)
    assert np.isfinite(arr).all()
    np.testing.assert_allclose(arr[0], [[0.0, 0.0], [0.5 / 255, 7.0 / 255]], atol=1e-6)


def test_luminance_for_grayscale_models():
    arr = convert_image(Image.new("RGB", (4, 4), (255, 0, 0)), 4, 1, invert=False)
    np.testing.assert_allclose(arr, 0.299, atol=1e-6)


@pytest.mark.parametrize("size,centre_box", [((60, 20), (20, 0, 40, 20)), ((20, 60), (0, 20, 20, 40))])
def test_non_square_input_is_centre_cropped(size, centre_box):
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((0, 255, 0), centre_box)  # the centred square is green, the rest blue
    arr = convert_image(img, 10, 3)
    np.testing.assert_allclose(arr[0], 0.0, atol=0.02)
    np.testing.assert_allclose(arr[1], 1.0, atol=0.02)
    np.testing.assert_allclose(arr[2], 0.0, atol=0.02)


def test_large_image_is_downscaled_accurately():
    img = Image.new("L", (400, 400), 0)  # large enough to take the box pre-reduction path
    img.paste(255, (200, 0, 400, 400))  # right half white
    arr = convert_image(img, 28, 1, invert=False)[0]
    # away from the edge (Lanczos rings slightly next to it) both halves are exact
    np.testing.assert_allclose(arr[:, :10], 0.0, atol=0.005)
    np.testing.assert_allclose(arr[:, 18:], 1.0, atol=0.005)
    assert 0.3 < arr[:, 13:15].mean() < 0.7
    grey = convert_image(Image.new("L", (400, 400), 128), 28, 3)
    np.testing.assert_allclose(grey, 128 / 255, atol=1e-4)


def test_upscaling_keeps_range_and_colour():
    arr = convert_image(Image.new("RGB", (5, 5), (200, 30, 30)), 32, 3)
    assert arr.shape == (3, 32, 32) and arr.min() >= 0.0 and arr.max() <= 1.0
    np.testing.assert_allclose(arr[:, 16, 16], [200 / 255, 30 / 255, 30 / 255], atol=1e-3)


def test_invalid_arguments_are_rejected():
    img = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="channels"):
        convert_image(img, 4, 2)
    with pytest.raises(ValueError, match="image_size"):
        convert_image(img, 0, 3)


def _paper_with_dark_stroke():
    paper = np.full((28, 28), 255, np.uint8)
    paper[8:20, 12:16] = 0
    return paper


def test_auto_invert_dark_digit_on_white():
    paper = _paper_with_dark_stroke()
    arr = convert_image(Image.fromarray(paper), 28, 1)
    assert arr[0, 0, 0] == pytest.approx(0.0) and arr[0, 10, 13] == pytest.approx(1.0)
    assert border_mean(arr) < 0.5  # now MNIST-like: white on black
    mnist_like = convert_image(Image.fromarray(255 - paper), 28, 1)  # already white on black: unchanged
    np.testing.assert_allclose(arr, mnist_like, atol=1e-6)


def test_explicit_invert_overrides_auto_and_rgb_is_never_inverted():
    paper = Image.fromarray(_paper_with_dark_stroke())
    assert convert_image(paper, 28, 1, invert=False)[0, 0, 0] == pytest.approx(1.0)
    assert convert_image(Image.fromarray(255 - _paper_with_dark_stroke()), 28, 1, invert=True)[0, 0, 0] \
        == pytest.approx(1.0)
    assert convert_image(paper.convert("RGB"), 28, 3, invert=True)[:, 0, 0] == pytest.approx([1.0, 1.0, 1.0])


def test_auto_invert_from_an_rgba_scan_file(tmp_path):
    scan = Image.new("RGBA", (50, 40), (0, 0, 0, 0))  # transparent background composites to white
    scan.paste((20, 20, 20, 255), (22, 8, 28, 32))
    path = tmp_path / "scan.png"
    scan.save(path)
    arr = load_for_model(path, 28, 1)
    assert arr[0, 0, 0] == pytest.approx(0.0, abs=1e-3) and arr[0, 14, 14] > 0.8


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("WEBP", ".webp"),
                                        ("TIFF", ".tiff"), ("GIF", ".gif")])
def test_file_formats_round_trip(tmp_path, fmt, suffix):
    path = tmp_path / f"img{suffix}"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path, format=fmt)
    img = load_image(path)
    assert img.size == (40, 40)
    arr = load_for_model(path, 32, 3)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    lossy = fmt in ("JPEG", "WEBP", "GIF")
    np.testing.assert_allclose(arr[:, 16, 16], [200 / 255, 30 / 255, 30 / 255], atol=0.06 if lossy else 1e-6)


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100)
    arr = load_for_model(path, 16, 3)
    assert arr[0].mean() > 0.9 and arr[2].mean() < 0.1


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left, blue right
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # red on top after rotating clockwise
    assert bottom[2] > 200 and bottom[0] < 60


def test_loaded_image_is_detached_from_the_file(tmp_path):
    path = tmp_path / "x.gif"
    Image.new("RGB", (8, 8), (0, 255, 0)).save(path)
    img = load_image(path)
    os.replace(path, tmp_path / "moved.gif")  # would break a lazily loaded image
    assert img.convert("RGB").getpixel((4, 4))[1] > 200


def test_missing_path_directory_and_empty_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope\.png: file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png: file is empty"):
        load_image(empty)


def test_file_over_the_byte_limit_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (16, 16)).save(path)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 10)
    with pytest.raises(ImageLoadError, match=r"big\.png: file is too large"):
        load_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.png: not a recognised image format"):
        load_for_model(path, 28, 1)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file(tmp_path, fmt, suffix):
    path = tmp_path / f"cut{suffix}"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=rf"cut\{suffix}: cannot decode image"):
        load_image(path)


def _png_declaring_size(width, height):
    """A tiny 1x1 PNG whose IHDR chunk claims ``width`` x ``height`` (valid CRC)."""
    import io

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring_size(100_000, 100_000))
    assert path.stat().st_size < 200
    with pytest.raises(ImageLoadError, match=r"bomb\.png: .*decompression-bomb"):
        load_image(path)


def test_own_pixel_limit_is_checked(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 200 * 200)
    with pytest.raises(ImageLoadError, match=r"big\.png: image is 300x300 .*decompression-bomb"):
        load_image(path)


@pytest.mark.parametrize("pillow_limit", [60_000, 20_000])  # warning (1-2x over) and error (>2x over)
def test_pillow_decompression_bomb_warning_and_error_become_image_load_error(tmp_path, monkeypatch,
                                                                              pillow_limit):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)  # 90,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with pytest.raises(ImageLoadError, match=r"big\.png: .*decompression-bomb"):
        load_image(path)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_png_atomic_round_trip(tmp_path, channels):
    arr = np.random.default_rng(1).random((channels, 9, 7)).astype(np.float32)
    arr[0, 0, 0], arr[0, 0, 1] = -0.2, 1.3  # clipped
    out = save_png_atomic(arr, tmp_path / "sub" / "adv.png")
    assert out == tmp_path / "sub" / "adv.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == ("L" if channels == 1 else "RGB")
        saved = np.asarray(img)
    expected = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    saved = saved[None] if channels == 1 else saved.transpose(2, 0, 1)
    assert np.array_equal(saved, expected)
    # Reloading at the same size through the model pipeline gives the rounded values exactly.
    square = np.random.default_rng(2).random((channels, 8, 8))
    save_png_atomic(square, tmp_path / "square.png")
    reloaded = load_for_model(tmp_path / "square.png", 8, channels, invert=False)
    assert np.array_equal(reloaded, (np.round(square * 255) / 255).astype(np.float32))
    assert sorted(os.listdir(tmp_path / "sub")) == ["adv.png"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]


def test_save_png_atomic_failure_leaves_target_untouched_and_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous contents")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png_atomic(np.zeros((3, 4, 4)), target)
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["out.png"]


def test_save_refuses_to_overwrite_source(tmp_path):
    src = tmp_path / "input.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(src)
    before = src.read_bytes()
    for same in (src, str(src), tmp_path / "sub" / ".." / "input.png"):
        with pytest.raises(ValueError, match="refusing to overwrite"):
            save_png_atomic(np.zeros((3, 4, 4)), same, source=src)
    os.link(src, tmp_path / "hardlink.png")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_png_atomic(np.zeros((3, 4, 4)), tmp_path / "hardlink.png", source=src)
    assert src.read_bytes() == before
    save_png_atomic(np.zeros((3, 4, 4)), tmp_path / "other.png", source=src)  # a different path is fine
    assert (tmp_path / "other.png").exists()


def test_image_from_array_validates_and_accepts_tensors():
    with pytest.raises(ValueError, match="shape"):
        image_from_array(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        image_from_array(np.zeros((2, 4, 4)))
    import torch

    tensor = torch.full((1, 3, 3), 0.5, requires_grad=True)
    img = image_from_array(tensor)
    assert img.mode == "L" and np.all(np.asarray(img) == 128)  # round(127.5) = 128 (nearest even)
    assert np.asarray(image_from_array(np.full((3, 2, 2), np.nan))).max() == 0

