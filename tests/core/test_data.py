"""Dataset order: the first n CIFAR-10 images cover every class."""
import pytest
import torch

from rdc_studio.core.data import class_interleaved, data_root_candidates, load_dataset


def test_class_interleaved_visits_the_classes_in_turn_and_keeps_each_class_in_order():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # stored class by class, as the archive is
    order = class_interleaved(labels)
    assert sorted(order.tolist()) == list(range(9))
    assert labels[order].tolist() == [0, 1, 2, 0, 1, 2, 0, 2, 2]
    assert order.tolist() == [0, 3, 5, 1, 4, 6, 2, 7, 8]  # within a class: stored order


def test_first_cifar10_test_images_cover_every_class():
    if not any((root / "cifar10-jpeg.tar.gz").exists() for root in data_root_candidates()):
        pytest.skip("needs ../shared/data/cifar10-jpeg.tar.gz")
    ds = load_dataset("cifar10", "test")
    assert len(ds.labels) == 10000
    assert ds.labels[:10].tolist() == list(range(10))
    assert torch.bincount(ds.labels[:100], minlength=10).tolist() == [10] * 10


def _tiny_cifar_archive(root, colour: int):
    """A cifar10-jpeg.tar.gz with one PNG per class and split, every pixel ``colour``."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from rdc_studio.core.data import CIFAR10_CLASSES

    root.mkdir(parents=True, exist_ok=True)
    path = root / "cifar10-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in CIFAR10_CLASSES:
                png = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), colour, np.uint8)).save(png, format="PNG")
                info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{cls}/0.png")
                info.size = len(png.getvalue())
                tar.addfile(info, io.BytesIO(png.getvalue()))
    return path


def test_a_replaced_cifar10_archive_is_extracted_again(tmp_path):
    """The extraction cache follows the archive: replacing it (e.g. a JPEG copy by the
    official pixels) must not keep serving the old images."""
    import os

    root, cache = tmp_path / "data", tmp_path / "cache"
    _tiny_cifar_archive(root, 10)
    assert int(load_dataset("cifar10", "test", root, cache).images.max()) == 10
    archive = _tiny_cifar_archive(root, 200)
    os.utime(archive, ns=(1, 1))  # another file even where the clock's resolution hides a new mtime
    assert int(load_dataset("cifar10", "test", root, cache).images.max()) == 200
    assert sorted(p.name for p in cache.iterdir()) == ["cifar10-jpeg"]  # no temporary folders left
    archive.unlink()  # moved away: the extracted copy still serves
    assert len(load_dataset("cifar10", "test", root, cache)) == 10


def test_a_damaged_cifar10_archive_is_a_one_line_error_and_leaves_nothing(tmp_path):
    from rdc_studio.core.data import DatasetNotFoundError

    root, cache = tmp_path / "data", tmp_path / "cache"
    archive = _tiny_cifar_archive(root, 10)
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DatasetNotFoundError, match="is damaged"):
        load_dataset("cifar10", "test", root, cache)
    assert list(cache.iterdir()) == []


def test_an_incomplete_mnist_folder_names_the_missing_files(tmp_path):
    from rdc_studio.core.data import DatasetNotFoundError

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="incomplete: train-labels-idx1-ubyte, t10k-images"):
        load_dataset("mnist", "test", tmp_path, tmp_path / "cache")


def test_an_archive_with_other_class_folders_or_too_few_training_images_is_refused(tmp_path):
    import tarfile

    from rdc_studio.core.data import DatasetNotFoundError

    root, cache = tmp_path / "data", tmp_path / "cache"
    _tiny_cifar_archive(root, 10)
    with pytest.raises(ValueError, match="holds 10 images: the val split needs more than the 5000"):
        load_dataset("cifar10", "val", root, cache)
    other = tmp_path / "other"
    other.mkdir()
    with tarfile.open(root / "cifar10-jpeg.tar.gz") as tar:
        tar.extractall(other, filter="data")
    (other / "cifar10-jpeg" / "test" / "truck").rename(other / "cifar10-jpeg" / "test" / "lorry")
    with tarfile.open(root / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(other / "cifar10-jpeg", "cifar10-jpeg")
    with pytest.raises(DatasetNotFoundError, match="classes airplane, .*lorry, ship, not airplane"):
        load_dataset("cifar10", "test", root, cache)


def _idx(shape: tuple[int, ...], data: bytes) -> bytes:
    """An IDX file of uint8 data: magic 0x0000080N (N dimensions), the sizes, the data."""
    header = (0x800 + len(shape)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    return header + data


def _mnist_files(label: int = 3, n_train: int = 3, n_test: int = 2) -> dict[str, bytes]:
    """The four (uncompressed) MNIST files of a tiny set: images of pixel value 10 * index,
    every label ``label``."""
    def images(n: int) -> bytes:
        return b"".join(bytes([10 * i]) * 784 for i in range(n))

    return {"train-images-idx3-ubyte": _idx((n_train, 28, 28), images(n_train)),
            "train-labels-idx1-ubyte": _idx((n_train,), bytes([label]) * n_train),
            "t10k-images-idx3-ubyte": _idx((n_test, 28, 28), images(n_test)),
            "t10k-labels-idx1-ubyte": _idx((n_test,), bytes([label]) * n_test)}


def _fake_mnist(root, label: int = 3, **sizes):
    """A data root holding a tiny MNIST (gzip-compressed) under MNIST/raw."""
    import gzip

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, data in _mnist_files(label, **sizes).items():
        (raw / (name + ".gz")).write_bytes(gzip.compress(data))
    return raw


def _cache_files(cache) -> list[str]:
    return sorted(p.name for p in (cache / "MNIST" / "raw").iterdir())


_CACHED = sorted([".source.json", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                  "train-labels-idx1-ubyte"])


def test_the_mnist_cache_follows_its_source(tmp_path, monkeypatch):
    """Another data root, or a file replaced in one, is extracted again; the same source is not."""
    import os

    from rdc_studio.core import data

    cache = tmp_path / "cache"
    a = _fake_mnist(tmp_path / "a", label=3)
    _fake_mnist(tmp_path / "b", label=7)
    assert load_dataset("mnist", "test", tmp_path / "a", cache).labels.tolist() == [3, 3]
    assert load_dataset("mnist", "test", tmp_path / "b", cache).labels.tolist() == [7, 7]
    assert load_dataset("mnist", "train-full", tmp_path / "a", cache).labels.tolist() == [3, 3, 3]
    assert _cache_files(cache) == _CACHED  # no temporary files left

    copies = []
    copy_idx = data._copy_idx
    monkeypatch.setattr(data, "_copy_idx", lambda src, *args: copies.append(src.name) or copy_idx(src, *args))
    ds = load_dataset("mnist", "test", tmp_path / "a", cache)
    assert copies == [] and ds.images[1].unique().tolist() == [10]  # the same source: served from the cache

    other = _fake_mnist(tmp_path / "c", label=5)
    (other / "t10k-labels-idx1-ubyte.gz").replace(a / "t10k-labels-idx1-ubyte.gz")
    os.utime(a / "t10k-labels-idx1-ubyte.gz", ns=(1, 1))  # another file even where the clock hides a new mtime
    assert load_dataset("mnist", "test", tmp_path / "a", cache).labels.tolist() == [5, 5]
    assert copies == ["t10k-labels-idx1-ubyte.gz"]  # only the replaced file


def test_an_mnist_cache_made_before_the_source_record_is_extracted_again(tmp_path):
    """Copies without ``.source.json`` (an earlier version's, which kept the first data root's
    files for good) are not trusted: they are extracted again once."""
    _fake_mnist(tmp_path / "root", label=4)
    raw = tmp_path / "cache" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, content in _mnist_files(label=9).items():
        (raw / name).write_bytes(content)
    assert load_dataset("mnist", "test", tmp_path / "root", tmp_path / "cache").labels.tolist() == [4, 4]
    assert _cache_files(tmp_path / "cache") == _CACHED


def _truncated_gz(raw, name):
    path = raw / (name + ".gz")
    path.write_bytes(path.read_bytes()[:-30])


def _bad_crc(raw, name):
    path = raw / (name + ".gz")
    content = bytearray(path.read_bytes())
    content[-8] ^= 0xFF  # the gzip trailer's CRC-32
    path.write_bytes(bytes(content))


def _plain(change):
    """Replace the .gz by an uncompressed file, changed by ``change``."""
    def damage(raw, name):
        (raw / (name + ".gz")).unlink()
        (raw / name).write_bytes(change(_mnist_files()[name]))
    return damage


_DAMAGE = {
    "truncated_gz": (_truncated_gz, ".gz", "Compressed file ended"),
    "bad_crc": (_bad_crc, ".gz", "CRC check failed"),
    "not_gzip": (lambda raw, name: (raw / (name + ".gz")).write_bytes(b"garbage"), ".gz", "Not a gzipped file"),
    "truncated": (_plain(lambda b: b[:-100]), "", "it ends after 1468 of the 1568 data bytes its header declares"),
    "too_long": (_plain(lambda b: b + b"\0"), "", "it holds more than the 1568 data bytes"),
    "labels_magic": (_plain(lambda b: _idx((1568,), b[16:])), "", "not an IDX file of images .* 0x00000803"),
    "short_header": (_plain(lambda b: b[:10]), "", "its IDX header is cut short"),
    "empty": (_plain(lambda b: b""), "", "not an IDX file of images \\(it starts with 0xnothing"),
}


@pytest.mark.parametrize("case", sorted(_DAMAGE))
def test_a_damaged_mnist_file_is_a_one_line_error_and_is_not_cached(tmp_path, case):
    """A file that cannot be decompressed or does not fit its IDX header is named in one line;
    no copy of it (nor the copy of the file it replaced) stays in the cache."""
    from rdc_studio.core.data import DatasetNotFoundError

    damage, suffix, problem = _DAMAGE[case]
    root, cache = tmp_path / "root", tmp_path / "cache"
    raw = _fake_mnist(root)
    assert len(load_dataset("mnist", "test", root, cache)) == 2  # a good copy first
    damage(raw, "t10k-images-idx3-ubyte")
    for _ in range(2):  # the same error again: nothing damaged was kept
        with pytest.raises(DatasetNotFoundError, match=f"MNIST file {raw / 't10k-images-idx3-ubyte'}{suffix} "
                                                       f"is damaged: {problem}") as exc:
            load_dataset("mnist", "test", root, cache)
        assert "\n" not in str(exc.value)
        assert "t10k-images-idx3-ubyte" not in _cache_files(cache)
        assert not [name for name in _cache_files(cache) if name.endswith(".part")]
    _fake_mnist(root)  # repaired
    (raw / "t10k-images-idx3-ubyte").unlink(missing_ok=True)
    assert load_dataset("mnist", "test", root, cache).images[1].unique().tolist() == [10]


def test_mnist_image_and_label_files_must_agree(tmp_path):
    import gzip

    from rdc_studio.core.data import DatasetNotFoundError

    raw = _fake_mnist(tmp_path / "root")
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx((3,), bytes(3))))
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte holds 2 images, t10k-labels-idx1-ubyte 3"):
        load_dataset("mnist", "test", tmp_path / "root", tmp_path / "cache")


def test_a_cached_mnist_copy_that_fails_to_read_is_removed(tmp_path):
    from rdc_studio.core.data import DatasetNotFoundError

    root, cache = tmp_path / "root", tmp_path / "cache"
    _fake_mnist(root)
    load_dataset("mnist", "test", root, cache)
    copy = cache / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    copy.write_bytes(b"\0\0\x07\x01" + copy.read_bytes()[4:])  # the same size, an unknown data type
    with pytest.raises(DatasetNotFoundError, match="could not be read .*the copies were removed") as exc:
        load_dataset("mnist", "test", root, cache)
    assert "\n" not in str(exc.value)
    assert _cache_files(cache) == []
    assert load_dataset("mnist", "test", root, cache).labels.tolist() == [3, 3]


def test_an_mnist_label_file_holding_a_label_beyond_nine_is_damaged(tmp_path):
    import gzip

    from rdc_studio.core.data import DatasetNotFoundError

    raw = _fake_mnist(tmp_path / "root")
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx((2,), bytes([3, 200]))))
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte.gz is damaged: it holds the label 200"):
        load_dataset("mnist", "test", tmp_path / "root", tmp_path / "cache")
    assert "t10k-labels-idx1-ubyte" not in _cache_files(tmp_path / "cache")


def test_stale_torchvision_files_in_the_cache_never_replace_the_checked_copies(tmp_path):
    """torchvision's MNIST reads ``processed/*.pt`` when it finds them, before the raw files."""
    root, cache = tmp_path / "root", tmp_path / "cache"
    _fake_mnist(root, label=3)
    processed = cache / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):  # what an old torchvision left: other data
        torch.save((torch.zeros(5, 28, 28, dtype=torch.uint8), torch.full((5,), 8)), processed / name)
    assert load_dataset("mnist", "test", root, cache).labels.tolist() == [3, 3]
