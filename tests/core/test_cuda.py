"""CUDA and CPU agree: the bundled model, the RDC's gradients and ``rdc eval`` on a GPU.

Skipped where CUDA is absent (CI); run on a GPU machine with
``pytest tests/core/test_cuda.py``.
"""
import json

import pytest
import torch

from rdc_studio.core.classifier import build_classifier
from rdc_studio.core.data import load_dataset, mnist_available
from rdc_studio.core.models import load_checkpoint
from rdc_studio.core.purify import PurifySettings
from rdc_studio.core.rdc import RobustDiffusionClassifier

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")]


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("mnist", "test")
    return data.float_images(slice(0, 16)), data.labels[:16]


@pytest.fixture(scope="module", autouse=True)
def full_fp32():
    """cuDNN's default TF32 convolutions round to 10-bit mantissas; compare in true fp32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _rdc(device: str, grad_mode: str) -> RobustDiffusionClassifier:
    model = load_checkpoint(device=device)
    clf = build_classifier(model, device)
    return RobustDiffusionClassifier(model.net, clf.settings, PurifySettings(**model.card["purify"]),
                                     grad_mode=grad_mode).to(device).eval()


def test_classifier_logits_match_cpu(digits):
    x, y = digits
    out = {}
    for device in ("cpu", "cuda"):
        clf = build_classifier(load_checkpoint(device=device), device)
        with torch.no_grad():
            out[device] = clf(x.to(device)).cpu()
    scale = out["cpu"].abs().max()
    assert torch.allclose(out["cuda"], out["cpu"], atol=1e-4 * float(scale), rtol=1e-4)
    assert torch.equal(out["cuda"].argmax(1), out["cpu"].argmax(1))
    assert float((out["cuda"].argmax(1) == y).float().mean()) >= 0.9


@pytest.mark.parametrize("grad_mode", ["smooth", "bpda"])
def test_rdc_values_and_gradients_match_cpu(digits, grad_mode):
    x, y = digits[0][:4], digits[1][:4]
    logits, grads = {}, {}
    for device in ("cpu", "cuda"):
        rdc = _rdc(device, grad_mode)
        xd = x.to(device).requires_grad_(True)
        out = rdc(xd)
        loss = torch.nn.functional.cross_entropy(out, y.to(device), reduction="sum")
        (g,) = torch.autograd.grad(loss, xd)
        logits[device], grads[device] = out.detach().cpu(), g.cpu()
    assert torch.equal(logits["cuda"].argmax(1), logits["cpu"].argmax(1))
    assert torch.allclose(logits["cuda"], logits["cpu"], atol=1e-3 * float(logits["cpu"].abs().max()))
    # sign steps can flip on ties, so compare gradient directions rather than values
    cos = torch.nn.functional.cosine_similarity(grads["cuda"].flatten(1), grads["cpu"].flatten(1))
    assert bool((cos > 0.99).all()), cos


def test_eval_ensemble_on_cuda_writes_a_gpu_report(tmp_path):
    from rdc_studio.core.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--dataset", "mnist", "--split", "test", "--n", "6", "--defense", "rdc", "--grad", "smooth",
                 "--attack", "ensemble", "--norm", "linf", "--eps", "0.3", "--steps", "3", "--square-queries", "5",
                 "--targets", "2", "--batch-size", "3", "--device", "cuda", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["settings"]["device"].startswith("cuda") and "GPU" in rep["hardware"]
    assert rep["n"] == 6 and rep["clean_acc"] >= 5 / 6 and rep["max_linf"] <= 0.3 + 1e-6
    assert [row["attack"] for row in rep["per_attack"]] == ["apgd-ce", "apgd-dlr", "apgd-t", "square", "transfer"]


def test_eval_of_the_cnn_on_cuda(tmp_path):
    """The CNN has parameters but no buffers: its inputs must still go to the GPU."""
    from rdc_studio.core.cli import main

    out = tmp_path / "cnn.json"
    assert main(["eval", "--dataset", "mnist", "--split", "test", "--n", "20", "--defense", "cnn", "--attack",
                 "ensemble", "--norm", "l2", "--eps", "1.5", "--steps", "5", "--square-queries", "10", "--targets",
                 "2", "--device", "cuda", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["settings"]["device"] == "cuda" and rep["clean_acc"] >= 0.9 and rep["max_l2"] <= 1.5 + 1e-4
