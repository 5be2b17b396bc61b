"""Loading user image files and converting them to a model's input.

Pipeline
--------
:func:`load_image` opens one file (PNG, JPEG, BMP, WebP, TIFF, GIF - first frame),
checks it against size limits *before* decoding, decodes it fully (so truncated files
fail here, not later) and applies the EXIF orientation.

:func:`convert_image` turns a PIL image of any mode into a float32 array
``(channels, image_size, image_size)`` in ``[0, 1]``:

1. transparency (RGBA, LA, PA, palette or L/RGB with a transparent colour) is
   composited over a white background;
2. 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) images are scaled to
   ``[0, 1]`` by their nominal range (not clipped at 255);
3. everything else (CMYK, 1-bit, palette, YCbCr, ...) is converted to RGB;
4. the image is centre-cropped to a square and resized (Lanczos when shrinking,
   bicubic when enlarging, in floating point so there is no 8-bit rounding);
5. 1-channel models get the ITU-R 601 luminance, 3-channel models get RGB;
6. for 1-channel models the image may be inverted (see ``invert``), because MNIST
   digits are white on black while photos and scans of digits are dark on light.

:func:`save_png_atomic` writes a ``(C, H, W)`` array back out as a lossless 8-bit PNG.

This module must not import Qt: it is shared by the command line and the GUI.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .models import replacing_file

MAX_PIXELS = 50_000_000
"""Decompression-bomb guard: files whose header declares more pixels are refused."""

MAX_FILE_BYTES = 200 * 1024 * 1024
"""Files larger than this many bytes are refused without being read."""

BACKGROUND_RGB = (255, 255, 255)
"""Colour that transparent pixels are composited over (for both RGB and grayscale models)."""

AUTO_INVERT_BORDER_THRESHOLD = 0.5
"""``invert=None`` inverts 1-channel images whose mean border brightness exceeds this."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L"
_PRE_REDUCE_FACTOR = 4  # box-reduce images more than this many times larger than the target


class ImageLoadError(ValueError):
    """An image file cannot be used; the message names the file and the problem."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, with its EXIF orientation applied.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read. Multi-frame files (animated GIF, multi-page TIFF) give their
        first frame.

    Returns
    -------
    PIL.Image.Image
        A decoded image, detached from the file (the file is closed on return).

    Raises
    ------
    ImageLoadError
        The file is missing, not a regular file, unreadable, empty, larger than
        :data:`MAX_FILE_BYTES`, not an image, truncated or corrupt, or declares more
        than :data:`MAX_PIXELS` pixels (checked from the header before decoding; Pillow's
        own decompression-bomb warning and error are reported the same way).
    """
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if not path.is_file():
        raise ImageLoadError(f"{path}: not a regular file")
    if stat.st_size == 0:
        raise ImageLoadError(f"{path}: file is empty (0 bytes)")
    if stat.st_size > MAX_FILE_BYTES:
        raise ImageLoadError(f"{path}: file is too large ({stat.st_size / 2**20:.0f} MB; "
                             f"the limit is {MAX_FILE_BYTES / 2**20:.0f} MB)")
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    with file:
        return _decode(file, path)


def _decode(file: Any, path: Path) -> Image.Image:
    """Decode an opened image file; every failure becomes an :class:`ImageLoadError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:  # reads the header only
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageLoadError(
                        f"{path}: image is {width}x{height} = {width * height:,} pixels, more than the "
                        f"{MAX_PIXELS:,} allowed (decompression-bomb guard)")
                if width == 0 or height == 0:
                    raise ImageLoadError(f"{path}: image has no pixels ({width}x{height})")
                img.load()  # decodes the first frame; raises on truncated data
                # exif_transpose always returns a new image, detached from the file.
                return ImageOps.exif_transpose(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{path}: image has more pixels than the {MAX_PIXELS:,} allowed; "
                             f"refused without decoding (decompression-bomb guard)") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{path}: not a recognised image format") from exc
    except MemoryError as exc:
        raise ImageLoadError(f"{path}: not enough memory to decode the image") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted input: decoders raise many types
        detail = str(exc) or type(exc).__name__
        raise ImageLoadError(f"{path}: cannot decode image, the file may be truncated or corrupt "
                             f"({detail})") from exc


def _normalise_mode(img: Image.Image) -> Image.Image:
    """Return an equivalent image in mode ``L``, ``RGB`` or ``F`` (F holds values in [0, 1]).

    Transparency is composited over :data:`BACKGROUND_RGB`; high-bit-depth modes are
    scaled by their nominal range into a float image.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_scale_high_depth(img), mode="F")
    has_alpha = mode in _ALPHA_MODES or (
        "transparency" in img.info and mode in ("P", "L", "RGB", "1", "I"))
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode in ("L", "RGB"):
            return img
        if mode == "1":
            return img.convert("L")  # exact: 0 -> 0, 1 -> 255
        return img.convert("RGB")  # P, CMYK, YCbCr, HSV, ...
    except ValueError as exc:  # Pillow cannot convert this mode
        raise ImageLoadError(f"unsupported image mode {mode!r} ({exc})") from exc


def _scale_high_depth(img: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float single-band image as float32 in [0, 1].

    ``I;16*``: divided by 65535. ``I`` (32-bit integer; also how some 16-bit files
    open): divided by 255 if all values fit in 8 bits, by 65535 if they fit in 16 bits,
    otherwise by the maximum. ``F``: used as is when its values lie in [0, 1], divided
    by 255 when they go above 1. NaN becomes 0, values outside [0, 1] are clipped.
    """
    arr = np.asarray(img).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(arr.max(initial=0.0))
    if img.mode in _SIXTEEN_BIT_MODES:
        scale = 65535.0
    elif img.mode == "I":
        scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    else:  # "F"
        scale = 1.0 if peak <= 1.0 else 255.0
    return np.clip(arr / scale, 0.0, 1.0).astype(np.float32)


def _centre_square(img: Image.Image) -> Image.Image:
    """The largest centred square of ``img`` (the odd pixel, if any, is dropped right/bottom)."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img if width == height else img.crop((left, top, left + side, top + side))


def _resize_bands(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize an L/RGB/F image to ``image_size`` squared, per band in float; (H, W, bands)."""
    side = img.size[0]
    if side >= _PRE_REDUCE_FACTOR * image_size:  # cheap exact box-average of huge images first
        img = img.reduce(side // (2 * image_size))
        side = img.size[0]
    bands = []
    for band in img.split():
        values = np.asarray(band, dtype=np.float32)
        if band.mode != "F":
            values = values / np.float32(255.0)
        if side != image_size:
            resample = Image.Resampling.LANCZOS if side > image_size else Image.Resampling.BICUBIC
            values = np.asarray(Image.fromarray(values, mode="F").resize((image_size, image_size), resample))
        bands.append(values)
    return np.clip(np.stack(bands, axis=2), 0.0, 1.0)


def border_mean(arr: np.ndarray) -> float:
    """Mean of the outer ring of pixels of a ``(C, H, W)`` or ``(H, W)`` array."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    ring = np.concatenate([arr[:, 0, :].ravel(), arr[:, -1, :].ravel(),
                           arr[:, 1:-1, 0].ravel(), arr[:, 1:-1, -1].ravel()])
    return float(ring.mean())


def convert_image(img: Image.Image, image_size: int, channels: int, invert: bool | None = None) -> np.ndarray:
    """Convert a PIL image of any mode and size to a model input.

    Parameters
    ----------
    img : PIL.Image.Image
        Any mode (RGB, RGBA, L, LA, P with or without transparency, PA, 1, CMYK,
        I;16, I, F, ...) and any size.
    image_size : int
        Output height and width. The image is centre-cropped to a square first.
    channels : {1, 3}
        1: grayscale (ITU-R 601 luminance); 3: RGB.
    invert : bool or None, default None
        Only used when ``channels == 1``. MNIST-style models expect a light digit on a
        dark background, while a photo or scan of a handwritten digit is usually dark
        on light. ``True`` inverts (``1 - x``), ``False`` never does, and ``None``
        decides automatically: the result is inverted when the mean of its outer ring
        of pixels is above :data:`AUTO_INVERT_BORDER_THRESHOLD` (0.5), i.e. when the
        background is bright. Ignored for ``channels == 3``.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(channels, image_size, image_size)``, values in ``[0, 1]``.

    Raises
    ------
    ValueError
        ``channels`` is not 1 or 3, or ``image_size`` is not a positive integer.
    ImageLoadError
        The image mode cannot be converted.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if img.size[0] == 0 or img.size[1] == 0:
        raise ImageLoadError(f"image has no pixels ({img.size[0]}x{img.size[1]})")
    square = _centre_square(_normalise_mode(img))
    hwc = _resize_bands(square, int(image_size))
    if channels == 1 and hwc.shape[2] == 3:
        hwc = np.clip(hwc @ _LUMA_WEIGHTS, 0.0, 1.0)[..., None]
    elif channels == 3 and hwc.shape[2] == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1), dtype=np.float32)
    if channels == 1:
        if invert is None:
            invert = border_mean(chw) > AUTO_INVERT_BORDER_THRESHOLD
        if invert:
            chw = 1.0 - chw
    return chw


def load_for_model(path: str | os.PathLike, image_size: int, channels: int,
                   invert: bool | None = None) -> np.ndarray:
    """Load an image file and convert it to a model input.

    :func:`load_image` followed by :func:`convert_image`; see those for the parameters.
    Conversion problems are reported as :class:`ImageLoadError` naming ``path``.
    """
    img = load_image(path)
    try:
        return convert_image(img, image_size, channels, invert)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{path}: {exc}") from exc


def conversion_changes(img: Image.Image, converted: np.ndarray) -> list[str]:
    """What :func:`convert_image` changed to make ``converted`` (C, H, W) from ``img``: an
    empty list when the model input is the file's pixels exactly (an 8-bit L image for one
    channel, RGB for three, of the model's size)."""
    channels, height, width = converted.shape
    changes = []
    if img.size != (width, height):
        changes.append(f"{img.size[0]}x{img.size[1]} cropped/resized to {width}x{height}")
    if img.mode != ("L" if channels == 1 else "RGB"):
        changes.append(f"mode {img.mode} converted to {'grayscale' if channels == 1 else 'RGB'}")
    if not changes:
        stored = np.asarray(img, dtype=np.float32).reshape(height, width, -1).transpose(2, 0, 1) / 255.0
        if not np.allclose(stored, converted, atol=0.5 / 255):
            changes.append("inverted (a dark digit on a light background)")
    return changes


def image_from_array(arr: Any) -> Image.Image:
    """An 8-bit PIL image (mode L or RGB) from a ``(C, H, W)`` array in [0, 1].

    Parameters
    ----------
    arr : array-like or torch.Tensor
        Shape ``(1, H, W)`` or ``(3, H, W)``; values are clipped to [0, 1], NaN counts
        as 0, and each value is rounded to the nearest of the 256 levels.
    """
    if hasattr(arr, "detach"):  # a torch tensor, possibly requiring grad or on a GPU
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3) or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"expected a (1, H, W) or (3, H, W) array, got shape {arr.shape}")
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    levels = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    if levels.shape[0] == 1:
        return Image.fromarray(levels[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(levels.transpose(1, 2, 0)), mode="RGB")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (also through links; False when either is missing)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:
        return False


def save_png_atomic(arr: Any, path: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Save a ``(C, H, W)`` array in [0, 1] as a lossless 8-bit PNG, atomically.

    The PNG is written to a temporary ``*.part`` file in the destination directory,
    flushed to disk and then renamed over ``path`` with :func:`os.replace`, so ``path``
    is never left half-written and the temporary file is removed on any failure.
    Values are rounded to the nearest 8-bit level (see :func:`image_from_array`).

    Parameters
    ----------
    arr : array-like or torch.Tensor
        ``(1, H, W)`` or ``(3, H, W)`` in [0, 1].
    path : str or os.PathLike
        Destination; missing parent directories are created. PNG is written whatever
        the suffix.
    source : str or os.PathLike, optional
        The image the array came from; saving over it is refused.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        ``path`` is the same file as ``source``, or ``arr`` has the wrong shape.
    """
    path = Path(path)
    if source is not None and same_file(path, Path(source)):
        raise ValueError(f"{path}: refusing to overwrite the input image")
    img = image_from_array(arr)
    with replacing_file(path) as tmp, open(tmp, "wb") as file:
        img.save(file, format="PNG")
        file.flush()
        os.fsync(file.fileno())
    return path
