"""Build the CIFAR-10 archive the project reads from the official binary release.

Converts ``cifar-10-binary.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html; no
pickles are read) into ``cifar10-jpeg.tar.gz`` holding ``cifar10-jpeg/{train,test}/CLASS/
NNNNN.png``: lossless PNGs, so the pixels are exactly the official ones, numbered by their
index in the official split (training batches 1 to 5 in order, then the test batch).

    python scripts/make_cifar10_archive.py cifar-10-binary.tar.gz
    python scripts/make_cifar10_archive.py cifar-10-binary.tar.gz --out DATA_ROOT/cifar10-jpeg.tar.gz

The output (default: the user data folder) is written to a temporary file beside it and
renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from rdc_studio.core.data import CIFAR10_CLASSES, user_data_dir

PROG = "make_cifar10_archive"
SOURCE_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BATCHES = ("test_batch.bin",)
META = "batches.meta.txt"
RECORD = 1 + 3 * 32 * 32  # label byte, then the R, G and B planes, each 32x32 row-major
TOP = "cifar10-jpeg"  # the folder name core/data.py expects, whatever the image format


def fail(message: str) -> SystemExit:
    """A ``SystemExit`` carrying a one-line error message."""
    return SystemExit(f"{PROG}: error: {message}")


def parse_counts(text: str) -> tuple[int, int]:
    """Parse ``TRAIN,TEST`` (two whole numbers) for ``--expect-counts``."""
    try:
        train, test = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST (two whole numbers), got {text!r}") from None
    if train < 1 or test < 1:
        raise argparse.ArgumentTypeError(f"counts must be positive, got {text!r}")
    return train, test


def decode_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Split one binary batch into labels and images.

    Parameters
    ----------
    data : bytes
        The batch file's contents: records of 1 label byte + 3072 pixel bytes.
    name : str
        The member's name, for error messages.

    Returns
    -------
    labels : np.ndarray
        (N,) uint8, each in 0-9.
    images : np.ndarray
        (N, 32, 32, 3) uint8, RGB.
    """
    if len(data) % RECORD:
        raise fail(f"{name} holds {len(data)} bytes, not a multiple of the record size {RECORD} "
                   "(truncated or not a CIFAR-10 binary batch)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise fail(f"{name}: record {int(bad[0])} has label {int(labels[bad[0]])}, outside 0-9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return labels, images


def read_source(tar: tarfile.TarFile, source: Path, expect: dict[str, int]) -> dict[str, list[tarfile.TarInfo]]:
    """Check the release's members (names, sizes, counts, class names) before any work.

    Returns the batch members of each split, in order.
    """
    members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
    wanted = {"train": TRAIN_BATCHES, "test": TEST_BATCHES}
    for name in (META,) + TRAIN_BATCHES + TEST_BATCHES:
        member = members.get(f"{SOURCE_DIR}/{name}")
        if member is None or not member.isfile():
            raise fail(f"{source} has no {SOURCE_DIR}/{name} (is it the binary release cifar-10-binary.tar.gz?)")
    classes = [line.strip() for line in tar.extractfile(members[f"{SOURCE_DIR}/{META}"]).read()
               .decode("ascii", "replace").splitlines() if line.strip()]
    if classes != CIFAR10_CLASSES:
        raise fail(f"{SOURCE_DIR}/{META} names the classes {classes}, not {CIFAR10_CLASSES}")
    batches = {}
    for split, names in wanted.items():
        batches[split] = [members[f"{SOURCE_DIR}/{name}"] for name in names]
        for m in batches[split]:
            if m.size % RECORD:
                raise fail(f"{m.name} holds {m.size} bytes, not a multiple of the record size {RECORD} "
                           "(truncated or not a CIFAR-10 binary batch)")
        count = sum(m.size // RECORD for m in batches[split])
        if count != expect[split]:
            raise fail(f"the {split} batches hold {count} records, expected {expect[split]}")
    return batches


def add_file(out: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    out.addfile(info, io.BytesIO(data))


def add_dir(out: tarfile.TarFile, name: str, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, int(mtime), 0o755
    out.addfile(info)


def convert(tar: tarfile.TarFile, batches: dict[str, list[tarfile.TarInfo]], out: tarfile.TarFile) -> dict[str, int]:
    """Write every record of ``batches`` as ``TOP/SPLIT/CLASS/NNNNN.png`` into ``out``.

    Returns the number of images written per split.
    """
    counts = {}
    for split, members in batches.items():
        mtime = members[0].mtime
        add_dir(out, f"{TOP}/{split}", mtime)
        for cls in CIFAR10_CLASSES:
            add_dir(out, f"{TOP}/{split}/{cls}", mtime)
        index = 0
        for member in members:
            labels, images = decode_batch(tar.extractfile(member).read(), member.name)
            for label, image in zip(labels, images):
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                add_file(out, f"{TOP}/{split}/{CIFAR10_CLASSES[label]}/{index:05d}.png", png.getvalue(), member.mtime)
                index += 1
        counts[split] = index
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("source", help="the official binary release, cifar-10-binary.tar.gz")
    p.add_argument("--out", default=None,
                   help=f"archive to write (default: {user_data_dir() / 'cifar10-jpeg.tar.gz'})")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--expect-counts", type=parse_counts, default=(50000, 10000), metavar="TRAIN,TEST",
                   help="records expected in the training and test batches (default: 50000,10000)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    source = Path(args.source)
    out = Path(args.out) if args.out else user_data_dir() / "cifar10-jpeg.tar.gz"
    if not source.exists():
        raise fail(f"{source} does not exist")
    if not source.is_file():
        raise fail(f"{source} is not a file")
    if out.resolve() == source.resolve() or (out.exists() and os.path.samefile(out, source)):
        raise fail(f"the output {out} is the input; name another --out")
    if out.is_dir():
        raise fail(f"the output {out} is a folder; name the archive file, e.g. {out / 'cifar10-jpeg.tar.gz'}")
    if out.exists() and not args.force:
        raise fail(f"{out} already exists (pass --force to replace it)")
    expect = {"train": args.expect_counts[0], "test": args.expect_counts[1]}
    try:
        tar = tarfile.open(source, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise fail(f"{source} is not a readable .tar.gz ({exc})") from None
    with tar:
        try:
            batches = read_source(tar, source, expect)
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
            try:
                # gzip header without a name or time: the same input gives the same bytes
                with os.fdopen(fd, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as packed:
                    counts = convert(tar, batches, packed)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would give
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise fail(f"{source} is damaged ({exc})") from None
        except OSError as exc:
            raise fail(f"writing {out} failed ({exc})") from None
    print(f"{PROG}: wrote {counts['train']} train + {counts['test']} test images (lossless PNG) "
          f"to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
