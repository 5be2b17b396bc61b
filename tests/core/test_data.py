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
