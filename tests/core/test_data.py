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
