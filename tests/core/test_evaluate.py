"""core.evaluate helpers that the CLI tests do not pin down."""
import torch

from core.evaluate import module_device


def test_module_device_looks_at_parameters_when_there_are_no_buffers():
    cnn_like = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, device="meta"), torch.nn.ReLU())
    assert next(cnn_like.buffers(), None) is None and module_device(cnn_like) == torch.device("meta")
    with_buffer = torch.nn.BatchNorm2d(2, device="meta")
    assert module_device(with_buffer) == torch.device("meta")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # nothing to go by
