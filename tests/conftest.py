import os

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_sessionstart(session):
    """With RDC_REQUIRE_DATA=1 (CI), a missing MNIST is an error, not 18 silent skips."""
    if os.environ.get("RDC_REQUIRE_DATA") == "1":
        from rdc_studio.core.data import _find_mnist_raw

        _find_mnist_raw(None)  # raises DatasetNotFoundError naming where it looked


@pytest.fixture
def tiny_config():
    from rdc_studio.core.nets import NetConfig

    return NetConfig(channels=(8, 16), head_channels=(4,), emb_dim=32)


@pytest.fixture
def tiny_net(tiny_config):
    """A small multi-head denoiser with random (non-zero) weights."""
    from rdc_studio.core.nets import build_denoiser

    torch.manual_seed(0)
    net = build_denoiser(tiny_config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_net):
    from rdc_studio.core.models import save_checkpoint

    return save_checkpoint(tmp_path / "tiny.safetensors", tiny_net,
                           {"name": "tiny", "dataset": "mnist", "classes": [str(i) for i in range(10)]})


@pytest.fixture
def digit_png(tmp_path):
    """A 28x28 white-on-black stroke (a '1'-like digit) saved as PNG."""
    import numpy as np
    from PIL import Image

    arr = np.zeros((28, 28), np.uint8)
    arr[5:23, 12:16] = 255
    path = tmp_path / "digit.png"
    Image.fromarray(arr).save(path)
    return path
