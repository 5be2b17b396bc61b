import numpy as np
import pytest
import torch
from torch import nn

from core.attacks import (AttackSettings, apgd_checkpoints, attack_loss, margin_of, project, quantize_in_ball,
                          run_attack)


@pytest.fixture
def toy():
    """A small fixed CNN on random 8-bit images, labelled with its own predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.round(torch.rand(16, 1, 8, 8, generator=g) * 255) / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_checkpoints_follow_the_paper():
    ck = apgd_checkpoints(100)
    assert ck[:4] == [0, 22, 41, 57] and ck[-1] <= 100


def test_losses_and_margin():
    logits = torch.tensor([[3.0, 1.0, 0.5, 0.0], [0.0, 2.0, 1.0, -1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(margin_of(logits, y), torch.tensor([2.0, -2.0]))
    dlr = attack_loss(logits, y, "dlr")
    assert dlr[0] == pytest.approx(-2.0 / 2.5) and dlr[1] == pytest.approx(2.0 / 2.0)
    t = attack_loss(logits, y, "dlr-targeted", torch.tensor([1, 3]))
    assert t[0] == pytest.approx(-(3 - 1) / (3 - 0.25))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_and_quantization_stay_in_ball(norm):
    g = torch.Generator().manual_seed(1)
    x0 = torch.round(torch.rand(5, 1, 6, 6, generator=g) * 255) / 255
    far = torch.rand(5, 1, 6, 6, generator=g)
    eps = 0.1 if norm == "linf" else 0.5
    p = project(far, x0, eps, norm)
    q = quantize_in_ball(p, x0, eps, norm)
    for z in (p, q):
        d = (z - x0).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert (size <= eps + 1e-6).all() and z.min() >= 0 and z.max() <= 1
    assert torch.allclose(q * 255, torch.round(q * 255), atol=1e-4)


@pytest.mark.parametrize("method", ["apgd", "pgd"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 3.0)])
def test_large_eps_breaks_everything_and_results_validate(toy, method, norm, eps):
    model, x, y = toy
    records = []
    res = run_attack(model, x, y, AttackSettings(method=method, norm=norm, eps=eps, steps=30), records.append)
    assert len(records) == 30 and records[0].image.shape == x.shape
    assert res.success.float().mean() == 1.0
    assert all(res.checks.values())
    size = res.linf if norm == "linf" else res.l2
    assert (size <= eps + 1e-6).all()
    with torch.no_grad():
        assert (model(res.adversarial).argmax(1) != y).all()


def test_accuracy_decreases_with_eps(toy):
    model, x, y = toy
    acc = [1 - run_attack(model, x, y, AttackSettings(eps=e, steps=20)).success.float().mean().item()
           for e in (0.0, 0.01, 0.05, 0.3)]
    assert acc[0] == 1.0 and acc[-1] == 0.0
    assert all(a >= b for a, b in zip(acc, acc[1:]))


def test_targeted_dlr_reaches_the_target(toy):
    model, x, y = toy
    res = run_attack(model, x, y, AttackSettings(loss="dlr-targeted", eps=0.5, steps=40))
    assert res.success.float().mean() > 0.9


def test_cancel_returns_no_result(toy):
    from core.attacks import attack

    model, x, y = toy
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 3

    gen = attack(model, x, y, AttackSettings(steps=50), cancelled)
    steps = list(gen)
    assert len(steps) == 3


def test_settings_validation():
    with pytest.raises(ValueError):
        AttackSettings(norm="l1")
    with pytest.raises(ValueError):
        AttackSettings(loss="hinge")


def test_results_do_not_depend_on_batching(toy):
    """Per-example seeds: attacking in one batch or in two gives the same examples."""
    model, x, y = toy
    s = AttackSettings(eps=0.05, steps=10)
    whole = run_attack(model, x, y, s)
    first = run_attack(model, x[:7], y[:7], s, example_ids=list(range(7)))
    second = run_attack(model, x[7:], y[7:], s, example_ids=list(range(7, 16)))
    assert torch.equal(whole.adversarial, torch.cat([first.adversarial, second.adversarial]))
    assert torch.equal(whole.success, torch.cat([first.success, second.success]))
