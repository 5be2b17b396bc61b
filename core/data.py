"""Datasets (MNIST via torchvision, CIFAR-10 via ImageFolder) held in memory as tensors.

Loading can take a while (extracting CIFAR-10's archive, decoding its images): it polls the
active :func:`core.runtime.cancellation_scope` between archive members and files and stops
with :class:`core.runtime.OperationCancelled` when asked (a no-op outside any scope); an
interrupted extraction leaves no temporary folder behind.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch

from .models import replacing_file
from .runtime import raise_if_cancelled

DATASETS = ("mnist", "cifar10")
SPLITS = ("train", "val", "test", "train-full")
VAL_SIZE = 5000
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the data root says; the message is one line (for the
    command line); ``dataset`` and ``searched`` let a window phrase its own."""

    def __init__(self, message: str, dataset: str = "", searched: tuple[Path, ...] = ()) -> None:
        super().__init__(message)
        self.dataset, self.searched = dataset, tuple(searched)


def check_image_batch(x: torch.Tensor, channels: int | None = None, image_size: int | None = None,
                      what: str = "images") -> None:
    """Raise ``ValueError`` unless ``x`` is a float batch (N, C, H, W) in [0, 1] (with C,
    H and W those of the model when given): the convention of every classifier, defense
    and attack here (a dataset's ``images`` field is uint8: use ``float_images``)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, not {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point in [0, 1], not {x.dtype} (divide 8-bit images by 255)")
    if x.dim() != 4:
        raise ValueError(f"{what} must be a batch (N, C, H, W), not of shape {tuple(x.shape)} "
                         f"(one image: x.unsqueeze(0))")
    want = (channels if channels is not None else x.shape[1],
            image_size if image_size is not None else x.shape[2], image_size if image_size is not None else x.shape[3])
    if tuple(x.shape[1:]) != want:
        raise ValueError(f"{what} of shape {tuple(x.shape[1:])} per image do not fit the model's "
                         f"{want} (channels, height, width)")
    if x.numel():
        lo, hi = (float(v) for v in x.detach().aminmax())  # one pass (and one device sync)
        if not (lo >= -1e-4 and hi <= 1 + 1e-4):  # also false for NaN
            raise ValueError(f"{what} must lie in [0, 1], not [{lo:.4g}, {hi:.4g}] (the models scale to "
                             f"[-1, 1] themselves)")


def user_data_dir() -> Path:
    """The per-user data directory (``$XDG_DATA_HOME/rdc-studio/data``, default
    ``~/.local/share/rdc-studio/data``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "rdc-studio" / "data"


def source_checkout_data_dir() -> Path | None:
    """``../shared/data`` beside a source checkout (the folder holding ``core/``), if this
    module runs from one; None for an installed package."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "pyproject.toml").exists():
        return None
    return checkout.parent / "shared" / "data"


def data_root_candidates(data_root: str | Path | None = None) -> list[Path]:
    """Where datasets are looked for, in order: the explicit argument, ``RDC_DATA_ROOT``,
    the user data directory, ``../shared/data`` next to a source checkout."""
    if data_root:
        return [Path(data_root)]
    if os.environ.get("RDC_DATA_ROOT"):
        return [Path(os.environ["RDC_DATA_ROOT"])]
    shared = source_checkout_data_dir()
    return [user_data_dir()] + ([shared] if shared is not None else [])


def default_data_root() -> Path:
    """The data root in use: the first existing of :func:`data_root_candidates` (the
    first candidate when none exists, so that error messages name it)."""
    candidates = data_root_candidates()
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _missing(what: str, expected: str, data_root: str | Path | None) -> DatasetNotFoundError:
    searched = tuple(data_root_candidates(data_root))
    looked = ", ".join(str(c) for c in searched)
    return DatasetNotFoundError(
        f"{what} not found (looked for {expected} under: {looked}); "
        "set RDC_DATA_ROOT or pass --data-root to the folder that holds it", what, searched)


def default_cache_dir() -> Path:
    """Writable cache for extracted archives (``RDC_CACHE_DIR`` or ~/.cache/rdc-studio)."""
    env = os.environ.get("RDC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rdc-studio"


@dataclass
class TensorDataset:
    """Images as uint8 (N, C, H, W) and labels (N,) int64, with class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    split: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def float_images(self, index: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] as float32."""
        imgs = self.images if index is None else self.images[index]
        return imgs.float() / 255.0


def mnist_available(data_root: str | Path | None = None) -> bool:
    """Whether the MNIST IDX files can be found (see :func:`data_root_candidates`)."""
    try:
        _find_mnist_raw(data_root)
        return True
    except DatasetNotFoundError:
        return False


def _find_mnist_raw(data_root: str | Path | None) -> Path:
    """The folder holding MNIST's four IDX files (each plain or ``.gz``)."""
    def has(folder: Path, name: str) -> bool:
        return (folder / (name + ".gz")).exists() or (folder / name).exists()

    for root in data_root_candidates(data_root):
        for cand in (root / "MNIST" / "raw", root / "raw", root):
            if has(cand, _MNIST_FILES[0]):
                if missing := [name for name in _MNIST_FILES if not has(cand, name)]:
                    raise DatasetNotFoundError(f"MNIST in {cand} is incomplete: {', '.join(missing)} (.gz) missing",
                                               "MNIST", (cand,))
                return cand
    raise _missing("MNIST", f"MNIST/raw/{_MNIST_FILES[0]}.gz", data_root)


MNIST_SOURCE_FILE = ".source.json"  # in the cache's MNIST/raw: the source and shape of each copy
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # uint8 data with 3 and 1 dimensions


def _mnist_source(raw_src: Path, name: str) -> Path:
    """The source of one IDX file: the uncompressed file when there is one, else its ``.gz``."""
    plain = raw_src / name
    return plain if plain.exists() else raw_src / (name + ".gz")


def _mnist_identity(src: Path) -> dict[str, Any]:
    stat = src.stat()
    return {"source": str(src.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _idx_bytes(shape: list[int]) -> int:
    """The size of an IDX file of uint8 data: magic, one 4-byte size per dimension, the data."""
    return 4 + 4 * len(shape) + math.prod(shape)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _damaged_mnist(src: Path, problem: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"MNIST file {src} is damaged: {problem}", "MNIST", (src.parent,))


def _copy_idx(src: Path, out: BinaryIO, kind: str) -> list[int]:
    """Copy (decompressing a ``.gz``) the IDX file ``src`` to ``out``, checking it against its
    header: the magic number, then exactly the bytes its dimensions declare.

    Returns
    -------
    The dimensions, from the header.

    Raises
    ------
    DatasetNotFoundError
        Naming ``src``, when it cannot be read or decompressed, or does not fit its header.
    """
    def read(n: int) -> bytes:
        try:
            return f.read(n)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise _damaged_mnist(src, _one_line(exc)) from None

    try:
        f = gzip.open(src, "rb") if src.name.endswith(".gz") else open(src, "rb")
    except OSError as exc:
        raise DatasetNotFoundError(f"MNIST file {src} cannot be read ({_one_line(exc)})", "MNIST",
                                   (src.parent,)) from None
    magic = _IDX_MAGIC[kind]
    with f:
        head = read(4)
        if len(head) < 4 or int.from_bytes(head, "big") != magic:
            raise _damaged_mnist(src, f"not an IDX file of {kind} (it starts with 0x{head.hex() or 'nothing'}, "
                                      f"not the magic number 0x{magic:08x})")
        dims_raw = read(4 * (magic & 0xFF))
        if len(dims_raw) < 4 * (magic & 0xFF):
            raise _damaged_mnist(src, "its IDX header is cut short")
        dims = [int.from_bytes(dims_raw[i:i + 4], "big") for i in range(0, len(dims_raw), 4)]
        out.write(head + dims_raw)
        total = remaining = math.prod(dims)
        while remaining:
            chunk = read(min(remaining, 1 << 20))
            if not chunk:
                raise _damaged_mnist(src, f"it ends after {total - remaining} of the {total} data bytes its header "
                                          f"declares ({'x'.join(map(str, dims))})")
            if kind == "labels" and max(chunk) > 9:  # MNIST's ten digits; a larger one fails far later
                raise _damaged_mnist(src, f"it holds the label {max(chunk)}, not a digit 0-9")
            out.write(chunk)
            remaining -= len(chunk)
        if read(1):  # also makes gzip check the stream's CRC and length
            raise _damaged_mnist(src, f"it holds more than the {total} data bytes its header declares")
    return dims


def _read_mnist_record(raw_dst: Path) -> dict[str, Any]:
    try:
        record = json.loads((raw_dst / MNIST_SOURCE_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}  # not extracted yet, or by a version that did not record its sources
    return record if isinstance(record, dict) else {}


def _write_mnist_record(raw_dst: Path, record: dict[str, Any]) -> None:
    with replacing_file(raw_dst / MNIST_SOURCE_FILE) as tmp, open(tmp, "w") as out:
        json.dump(record, out, indent=1)


def _is_current(entry: Any, identity: dict[str, Any], copy: Path, ndim: int) -> bool:
    """Whether a record's entry says ``copy`` came from the source of ``identity`` and has the
    size of the shape it recorded."""
    if not isinstance(entry, dict) or {k: entry.get(k) for k in identity} != identity:
        return False
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == ndim
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        return False
    try:
        return copy.stat().st_size == _idx_bytes(shape)
    except OSError:
        return False


def _extract_mnist(data_root: str | Path | None, cache_dir: Path) -> Path:
    """Decompress the four MNIST IDX files into ``cache_dir/MNIST/raw``; returns ``cache_dir``.

    The copies follow their sources: ``MNIST/raw/.source.json`` records each one's source file
    (resolved path, size, modification time) and shape, and a copy is made again when its
    source differs (another data root, a replaced file) or it has another size. A cache
    without that record (made by an earlier version) is extracted again once. Each file is
    checked against its IDX header while it is copied, into a temporary file renamed into
    place, so a damaged source leaves nothing in the cache.

    Raises
    ------
    DatasetNotFoundError
        When MNIST is not found, a file is damaged (naming it), or a split's image and label
        files hold different numbers of examples.
    """
    raw_src = _find_mnist_raw(data_root)
    raw_dst = cache_dir / "MNIST" / "raw"
    raw_dst.mkdir(parents=True, exist_ok=True)
    record = _read_mnist_record(raw_dst)
    sources = {name: _mnist_source(raw_src, name) for name in _MNIST_FILES}
    identities = {name: _mnist_identity(src) for name, src in sources.items()}
    stale = [name for name in _MNIST_FILES
             if not _is_current(record.get(name), identities[name], raw_dst / name, 3 if "images" in name else 1)]
    if stale:
        # forget the stale copies first: an interruption then leaves no entry that vouches for them
        record = {name: record[name] for name in _MNIST_FILES if name in record and name not in stale}
        _write_mnist_record(raw_dst, record)
        for name in stale:  # another source's data, or damaged: not kept when the new copy fails
            (raw_dst / name).unlink(missing_ok=True)
    for name in stale:
        raise_if_cancelled()
        with replacing_file(raw_dst / name) as tmp, open(tmp, "wb") as out:
            shape = _copy_idx(sources[name], out, "images" if "images" in name else "labels")
        record[name] = dict(identities[name], shape=shape)
        _write_mnist_record(raw_dst, record)
    for split in ("train", "t10k"):
        images, labels = record[f"{split}-images-idx3-ubyte"]["shape"], record[f"{split}-labels-idx1-ubyte"]["shape"]
        if images[0] != labels[0]:
            raise DatasetNotFoundError(f"MNIST in {raw_src} does not fit together: {split}-images-idx3-ubyte holds "
                                       f"{images[0]} images, {split}-labels-idx1-ubyte {labels[0]} labels",
                                       "MNIST", (raw_src,))
    return cache_dir


def _forget_mnist_cache(cache_dir: Path) -> None:
    """Remove the extracted MNIST copies and their record (after one failed to read)."""
    raw_dst = cache_dir / "MNIST" / "raw"
    for name in (MNIST_SOURCE_FILE, *_MNIST_FILES):
        (raw_dst / name).unlink(missing_ok=True)


def _split_indices(n_train: int, split: str, seed: int = 0) -> np.ndarray:
    if split in ("train", "val") and n_train <= VAL_SIZE:
        raise ValueError(f"the training set holds {n_train} images: the {split} split needs more than the "
                         f"{VAL_SIZE} that validation takes (use train-full)")
    perm = np.random.default_rng(seed).permutation(n_train)
    if split == "val":
        return np.sort(perm[:VAL_SIZE])
    if split == "train":
        return np.sort(perm[VAL_SIZE:])
    return np.arange(n_train)


def load_mnist(split: str, data_root: str | Path | None = None, cache_dir: str | Path | None = None) -> TensorDataset:
    """Exact MNIST via ``torchvision.datasets.MNIST``.

    ``train`` is the 60k training set minus a fixed 5k validation subset (``val``);
    ``train-full`` is all 60k; ``test`` is the official 10k test set in order.
    """
    from torchvision.datasets import MNIST

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    root = _extract_mnist(data_root, Path(cache_dir or default_cache_dir()))
    for legacy in ("training.pt", "test.pt"):  # torchvision would read these instead of the checked copies
        (root / "MNIST" / "processed" / legacy).unlink(missing_ok=True)
    try:
        ds = MNIST(str(root), train=split != "test", download=False)
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError, OSError, EOFError) as exc:
        # the copies were checked when they were made; one that fails now is removed, not kept
        _forget_mnist_cache(root)
        raise DatasetNotFoundError(f"MNIST copied from {_find_mnist_raw(data_root)} to {root / 'MNIST' / 'raw'} "
                                   f"could not be read ({_one_line(exc)}); the copies were removed, "
                                   f"load it again to extract them anew", "MNIST", (root,)) from None
    images = ds.data.unsqueeze(1).contiguous()
    labels = ds.targets.long()
    if split != "test":
        idx = torch.from_numpy(_split_indices(len(labels), split))
        images, labels = images[idx], labels[idx]
    return TensorDataset(images, labels, list(MNIST_CLASSES), "mnist", split)


def class_interleaved(labels: torch.Tensor) -> torch.Tensor:
    """Indices visiting the examples class by class in turn: the first example of every
    class (in class order), then the second of every class, and so on, each class in its
    stored order. Every prefix is then as class-balanced as the data allows."""
    y = labels.numpy()
    rank = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        where = np.flatnonzero(y == c)
        rank[where] = np.arange(len(where))
    return torch.from_numpy(np.lexsort((y, rank)))


CIFAR10_SOURCE_FILE = ".source.json"  # in the extracted folder: which archive it came from


def _archive_identity(archive: Path) -> dict:
    stat = archive.stat()
    return {"archive": str(archive.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _members_until_cancelled(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members, read one by one, polling the cancellation scope before each."""
    for member in tar:
        raise_if_cancelled()
        yield member


def _extract_cifar10(data_root: str | Path | None, cache_dir: Path) -> Path:
    """``cache_dir/cifar10-jpeg``, extracted from the data root's ``cifar10-jpeg.tar.gz``
    (again when that archive is another one than the folder came from); the extraction
    happens in a temporary folder, so a failure or a concurrent load leaves no partial one."""
    folder = cache_dir / "cifar10-jpeg"
    archive = next((root / "cifar10-jpeg.tar.gz" for root in data_root_candidates(data_root)
                    if (root / "cifar10-jpeg.tar.gz").is_file()), None)
    if archive is None:
        if folder.is_dir():  # extracted before; the archive has been moved away since
            return folder
        raise _missing("CIFAR-10", "cifar10-jpeg.tar.gz", data_root)
    identity = _archive_identity(archive)
    try:
        current = json.loads((folder / CIFAR10_SOURCE_FILE).read_text()) == identity
    except (OSError, ValueError):
        current = False  # not extracted yet, or by a version that did not record its archive
    if current:
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".cifar10-"))
    try:
        try:
            with tarfile.open(archive) as tar:  # extractall still sets the folders' modes after their files
                tar.extractall(tmp, members=_members_until_cancelled(tar), filter="data")
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise DatasetNotFoundError(f"CIFAR-10 archive {archive} is damaged ({exc})", "CIFAR-10",
                                       (archive.parent,)) from exc
        if not (tmp / "cifar10-jpeg").is_dir():
            raise DatasetNotFoundError(f"CIFAR-10 archive {archive} holds no cifar10-jpeg/ folder", "CIFAR-10",
                                       (archive.parent,))
        (tmp / "cifar10-jpeg" / CIFAR10_SOURCE_FILE).write_text(json.dumps(identity))
        if folder.exists():  # another archive's images: set aside, then removed
            os.replace(folder, tmp / "previous")
        try:
            os.replace(tmp / "cifar10-jpeg", folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent load that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _decode_rgb(loader: Callable[[str], Any], path: str) -> np.ndarray:
    """One image file as (H, W, 3) uint8, after polling the cancellation scope (a split is
    tens of thousands of files)."""
    raise_if_cancelled()
    return np.asarray(loader(path).convert("RGB"))


def load_cifar10(split: str, data_root: str | Path | None = None, cache_dir: str | Path | None = None) -> TensorDataset:
    """The CIFAR-10 JPEG re-encoding via ``torchvision.datasets.ImageFolder``.

    The archive stores the images class by class; every split is put in
    :func:`class_interleaved` order, so the first n images (what ``rdc eval --n``
    takes) cover the ten classes evenly instead of being all airplanes. The archive may
    hold JPEG re-encodings or the lossless PNGs ``scripts/make_cifar10_archive.py``
    makes from the official release (docs/data.md).
    """
    from torchvision.datasets import ImageFolder

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    folder = _extract_cifar10(data_root, Path(cache_dir or default_cache_dir()))
    sub = "test" if split == "test" else "train"
    ds = ImageFolder(str(folder / sub))
    if list(ds.classes) != CIFAR10_CLASSES:
        raise DatasetNotFoundError(f"the CIFAR-10 archive's {sub} folder holds the classes {', '.join(ds.classes)}, "
                                   f"not {', '.join(CIFAR10_CLASSES)}", "CIFAR-10", (folder,))
    arrays = np.stack([_decode_rgb(ds.loader, p) for p, _ in ds.samples])
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([t for _, t in ds.samples], dtype=torch.long)
    if split != "test":
        idx = torch.from_numpy(_split_indices(len(labels), split))
        images, labels = images[idx], labels[idx]
    order = class_interleaved(labels)
    return TensorDataset(images[order], labels[order], list(ds.classes), "cifar10", split)


def load_dataset(name: str, split: str, data_root: str | Path | None = None, cache_dir: str | Path | None = None) -> TensorDataset:
    """Load ``mnist`` or ``cifar10`` for a split (``train``, ``val``, ``test``, ``train-full``)."""
    if name == "mnist":
        return load_mnist(split, data_root, cache_dir)
    if name == "cifar10":
        return load_cifar10(split, data_root, cache_dir)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
