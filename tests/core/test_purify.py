import numpy as np
import pytest
import torch

from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier
from rdc_studio.core.purify import LikelihoodMaximizer, PurifySettings


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 1, 28, 28, generator=g)


@pytest.mark.parametrize("optimizer", ["sign", "adam"])
@pytest.mark.parametrize("score", ["uncond", "mixture"])
def test_steps_stay_in_eta_ball_and_box(tiny_net, x, optimizer, score):
    lm = LikelihoodMaximizer(tiny_net, PurifySettings(eta=0.05, steps=4, step_size=0.03, optimizer=optimizer,
                                                      score=score))
    recs = list(lm.run(x))
    assert [r.step for r in recs] == [0, 1, 2, 3, 4]
    assert np.allclose(recs[0].image, x.numpy()) and recs[0].linf.max() == 0
    for r in recs:
        d = r.image - x.numpy()
        assert np.abs(d).max() <= 0.05 + 1e-6 and r.image.min() >= 0 and r.image.max() <= 1
        assert np.allclose(r.linf, np.abs(d).reshape(3, -1).max(1), atol=1e-6)
        assert np.isfinite(r.objective).all() and r.objective.shape == (3,)
    assert recs[-1].linf.max() > 0


def test_sign_step_lowers_the_objective_at_fixed_noise(tiny_net, x):
    """A small signed-gradient step against the objective's gradient lowers it."""
    lm = LikelihoodMaximizer(tiny_net, PurifySettings(eta=1.0, steps=1, step_size=1e-3))
    sig, noise = lm.draws()
    xr = x.clone().requires_grad_(True)
    obj = lm.objective(xr, sig[0], noise[0])
    (g,) = torch.autograd.grad(obj.sum(), xr)
    with torch.no_grad():
        after = lm.objective((x - 1e-3 * g.sign()).clamp(0, 1), sig[0], noise[0])
    assert (after < obj.detach()).all()


def test_deterministic_and_randomized_modes(tiny_net, x):
    s = PurifySettings(eta=0.1, steps=3, step_size=0.05)
    a, b = LikelihoodMaximizer(tiny_net, s)(x), LikelihoodMaximizer(tiny_net, s)(x)
    assert torch.equal(a, b)
    r = PurifySettings(eta=0.1, steps=3, step_size=0.05, mode="randomized")
    lm = LikelihoodMaximizer(tiny_net, r, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(lm(x), lm(x))


def test_records_carry_classifier_logits_and_cancel(tiny_net, x):
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=2))
    lm = LikelihoodMaximizer(tiny_net, PurifySettings(steps=3))
    recs = list(lm.run(x, classifier=clf))
    assert all(r.logits.shape == (3, 10) for r in recs)
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 2

    assert len(list(lm.run(x, cancelled=cancelled))) == 3  # steps 0-2; the third update is cancelled


def test_zero_steps_returns_input(tiny_net, x):
    assert torch.equal(LikelihoodMaximizer(tiny_net, PurifySettings(steps=0))(x), x)


def test_settings_validation():
    with pytest.raises(ValueError):
        PurifySettings(optimizer="sgd")
    with pytest.raises(ValueError):
        PurifySettings(score="max")
    with pytest.raises(ValueError):
        PurifySettings(sigma_lo=0.6, sigma_hi=0.4)
