import numpy as np
import pytest
import torch

from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier
from rdc_studio.core.purify import ESTIMATE_LEVELS, LikelihoodMaximizer, PurifySettings


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


@pytest.mark.parametrize("score", ["uncond", "mixture"])
def test_objective_estimate_is_the_mean_over_its_fixed_bank(tiny_net, x, score):
    """The batched estimate equals the objective averaged level by level over the frozen bank."""
    lm = LikelihoodMaximizer(tiny_net, PurifySettings(steps=2, score=score))
    sigmas, noises = lm.estimate_bank
    assert sigmas.shape == (ESTIMATE_LEVELS,) and len(set(sigmas.tolist())) == ESTIMATE_LEVELS
    assert lm.settings.sigma_lo < float(sigmas.min()) and float(sigmas.max()) < lm.settings.sigma_hi
    with torch.no_grad():
        loop = torch.stack([lm.objective(x, s, n) for s, n in zip(sigmas, noises)]).mean(0)
    assert torch.allclose(lm.objective_estimate(x), loop, rtol=1e-5)


def test_objective_estimate_passes_follow_the_call_limit_and_stop_in_a_scope(tiny_net, x, monkeypatch):
    """The estimate's levels go in as few passes as the network's call limit allows (one by
    one for a costly network, with the same result), and a stop request ends it between two."""
    import rdc_studio.core.classifier as classifier_module
    from rdc_studio.core.runtime import OperationCancelled, cancellation_scope

    lm = LikelihoodMaximizer(tiny_net, PurifySettings(steps=2))
    macs = classifier_module.count_macs_per_input(tiny_net)  # (counted with a pass of its own, once)
    calls: list[int] = []
    hook = tiny_net.conv_in.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        whole = lm.objective_estimate(x)
        assert calls == [ESTIMATE_LEVELS * x.shape[0]]
        monkeypatch.setattr(classifier_module, "REFERENCE_MACS_PER_INPUT", macs / 160)  # 1 input per call
        calls.clear()
        assert torch.allclose(lm.objective_estimate(x), whole, rtol=1e-5)
        assert calls == [x.shape[0]] * ESTIMATE_LEVELS  # a level per pass (its images stay together)
        calls.clear()
        with cancellation_scope(lambda: len(calls) >= 3), pytest.raises(OperationCancelled):
            lm.objective_estimate(x)
        assert len(calls) == 3
    finally:
        hook.remove()


def test_objective_estimate_does_not_depend_on_the_steps_noise_draws(tiny_net, x):
    """Same image, different per-step draws: the one-draw objective changes, the estimate does not."""
    lm = LikelihoodMaximizer(tiny_net, PurifySettings(steps=3, mode="randomized"),
                             generator=torch.Generator().manual_seed(5))
    sig, noise = lm.draws()
    with torch.no_grad():
        one_draw = [lm.objective(x, sig[i], noise[i]) for i in (0, 1)]
    assert not torch.allclose(one_draw[0], one_draw[1])
    first, second = next(lm.run(x)), next(lm.run(x))  # step 0 (the input) of two runs with fresh draws
    assert np.array_equal(first.image, second.image) and not np.allclose(first.objective, second.objective)
    assert np.array_equal(first.objective_estimate, second.objective_estimate)
    other = LikelihoodMaximizer(tiny_net, PurifySettings(steps=7))  # other steps, other draws, same bank
    assert torch.equal(other.objective_estimate(x), lm.objective_estimate(x))
    assert len(set(first.objective_estimate.tolist())) == 3  # it does depend on the image


def test_records_carry_the_estimate_of_their_image(tiny_net, x):
    lm = LikelihoodMaximizer(tiny_net, PurifySettings(eta=0.2, steps=3, step_size=0.05))
    recs = list(lm.run(x))
    for r in recs:
        assert r.objective_estimate.shape == (3,)
        assert np.allclose(r.objective_estimate, lm.objective_estimate(torch.from_numpy(r.image)).numpy(), rtol=1e-5)
    assert not np.allclose(recs[0].objective_estimate, recs[-1].objective_estimate)
    assert all(r.objective_estimate is None for r in lm.run(x, estimate=False))


def test_zero_steps_returns_input(tiny_net, x):
    assert torch.equal(LikelihoodMaximizer(tiny_net, PurifySettings(steps=0))(x), x)


def test_settings_validation():
    with pytest.raises(ValueError):
        PurifySettings(optimizer="sgd")
    with pytest.raises(ValueError):
        PurifySettings(score="max")
    with pytest.raises(ValueError):
        PurifySettings(sigma_lo=0.6, sigma_hi=0.4)
    with pytest.raises(ValueError, match="e.g. 16/255"):  # grey levels written as a whole number
        PurifySettings(eta=16)
    with pytest.raises(ValueError, match="e.g. 4/255"):
        PurifySettings(step_size=4)
