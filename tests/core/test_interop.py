"""The RDC module works unchanged with an independent attack library (torchattacks)."""
import pytest
import torch

from rdc_studio.core.classifier import ClassifierSettings
from rdc_studio.core.purify import PurifySettings
from rdc_studio.core.rdc import RobustDiffusionClassifier

torchattacks = pytest.importorskip("torchattacks")


@pytest.mark.parametrize("grad_mode", ["exact", "bpda"])
def test_torchattacks_pgd_on_rdc_returns_valid_examples(tiny_net, grad_mode):
    rdc = RobustDiffusionClassifier(tiny_net, ClassifierSettings(steps=2),
                                    PurifySettings(eta=0.1, steps=2, step_size=0.03), grad_mode=grad_mode)
    g = torch.Generator().manual_seed(0)
    x = torch.round(torch.rand(3, 1, 28, 28, generator=g) * 255) / 255
    with torch.no_grad():
        y = rdc(x).argmax(1)
    eps = 0.3
    atk = torchattacks.PGD(rdc, eps=eps, alpha=0.05, steps=3, random_start=True)
    adv = atk(x, y)
    assert adv.shape == x.shape and torch.isfinite(adv).all()
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)  # the attack moved the images using the module's gradients
    with torch.no_grad():
        out = rdc(adv)
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_torchattacks_apgd_on_dc(tiny_net):
    from rdc_studio.core.classifier import DiffusionClassifier

    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=2))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 28, 28, generator=g)
    with torch.no_grad():
        y = clf(x).argmax(1)
    adv = torchattacks.APGD(clf, norm="Linf", eps=0.3, steps=3, n_restarts=1)(x, y)
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and torch.isfinite(adv).all()
