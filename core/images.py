"""Loading user image files and converting them to a model's input.

Any size and mode (RGBA, LA, palette, 16-bit, float, CMYK, 1-bit, grayscale) is turned
into a float32 array (C, H, W) in [0, 1]: transparency composited over white, channels
converted (luminance for 1-channel models), centre-cropped to a square, resized.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .models import publish_file

MAX_PIXELS = 50_000_000  # decompression-bomb guard (declared width * height)
MAX_FILE_BYTES = 200 * 1024 * 1024
SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class ImageLoadError(ValueError):
    """An image file cannot be used; the message names the file and the problem."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file (first frame), with EXIF orientation applied.

    Raises
    ------
    ImageLoadError
        Missing, empty, oversized, truncated, undecodable files and decompression bombs.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"{path}: file not found")
    if not path.is_file():
        raise ImageLoadError(f"{path}: not a file")
    size = path.stat().st_size
    if size == 0:
        raise ImageLoadError(f"{path}: file is empty")
    if size > MAX_FILE_BYTES:
        raise ImageLoadError(f"{path}: file is too large ({size / 2**20:.0f} MB > {MAX_FILE_BYTES / 2**20:.0f} MB)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageLoadError(f"{path}: image is {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed "
                                     "(decompression-bomb guard)")
            if w == 0 or h == 0:
                raise ImageLoadError(f"{path}: image has no pixels ({w}x{h})")
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{path}: image too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{path}: not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{path}: cannot decode image ({exc})") from exc
    return img


def _to_float_array(img: Image.Image, channels: int) -> np.ndarray:
    """(H, W, channels) float in [0, 1], transparency composited over white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float64) / 65535.0
        arr = arr[..., None]
    elif mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "I":
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        else:
            arr = arr / (255.0 if arr.max() > 1.0 else 1.0)
        arr = arr[..., None]
    else:
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba).convert("RGB")
        elif mode not in ("RGB", "L"):
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.float64) / 255.0
        if arr.ndim == 2:
            arr = arr[..., None]
    arr = np.clip(arr, 0.0, 1.0)
    if channels == 1 and arr.shape[2] == 3:
        arr = (arr @ np.array([0.299, 0.587, 0.114]))[..., None]  # ITU-R 601 luma, as PIL's "L"
    elif channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def _centre_crop_resize(arr: np.ndarray, image_size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    arr = arr[top:top + side, left:left + side]
    if side == image_size:
        return arr
    resample = Image.Resampling.LANCZOS if side > image_size else Image.Resampling.BICUBIC
    out = [np.asarray(Image.fromarray(arr[..., c].astype(np.float32), mode="F").resize(
        (image_size, image_size), resample)) for c in range(arr.shape[2])]
    return np.clip(np.stack(out, axis=2), 0.0, 1.0)


def convert_image(img: Image.Image, image_size: int, channels: int, invert: bool | None = None) -> np.ndarray:
    """Convert a PIL image to a model input: float32 (channels, image_size, image_size) in [0, 1].

    Parameters
    ----------
    img : PIL.Image.Image
        Any mode.
    image_size : int
        Output height and width (after a centre crop to a square).
    channels : {1, 3}
        Grayscale (luminance) or RGB.
    invert : bool or None
        1-channel models only. MNIST digits are white on black; ``None`` inverts
        automatically when the border of the converted image is mostly bright (a dark
        digit on paper), ``True``/``False`` force it.
    """
    if channels not in (1, 3):
        raise ValueError("channels must be 1 or 3")
    arr = _centre_crop_resize(_to_float_array(img, channels), image_size)
    if channels == 1:
        if invert is None:
            border = np.concatenate([arr[0].ravel(), arr[-1].ravel(), arr[:, 0].ravel(), arr[:, -1].ravel()])
            invert = float(border.mean()) > 0.5
        if invert:
            arr = 1.0 - arr
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def load_for_model(path: str | os.PathLike, image_size: int, channels: int, invert: bool | None = None) -> np.ndarray:
    """:func:`load_image` followed by :func:`convert_image`."""
    return convert_image(load_image(path), image_size, channels, invert)


def image_from_array(arr: np.ndarray) -> Image.Image:
    """A (C, H, W) float array in [0, 1] as an 8-bit PIL image (L or RGB), rounded to nearest."""
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1|3, H, W) array, got shape {arr.shape}")
    u8 = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(u8[0], mode="L") if u8.shape[0] == 1 else Image.fromarray(u8.transpose(1, 2, 0), "RGB")


def save_png_atomic(arr: np.ndarray, path: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Save a (C, H, W) array in [0, 1] as a lossless 8-bit PNG, atomically.

    Refuses to overwrite ``source`` (the user's input file).
    """
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise ValueError(f"{path}: refusing to overwrite the input image")
    img = image_from_array(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
