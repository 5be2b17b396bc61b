import numpy as np
import pytest
import torch

from rdc_studio.core.classifier import ClassifierSettings
from rdc_studio.core.purify import LikelihoodMaximizer, PurifySettings
from rdc_studio.core.rdc import RobustDiffusionClassifier


@pytest.fixture
def net64(tiny_net):
    return tiny_net.double()


def _x(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (0.2 + 0.6 * torch.rand(2, 1, 28, 28, generator=g)).to(dtype)


@pytest.mark.parametrize("optimizer", ["sign", "adam"])
def test_purify_matches_the_step_generator(tiny_net, optimizer):
    """The RDC module and the step generator share one step implementation: identical results."""
    p = PurifySettings(eta=0.1, steps=3, step_size=0.02, optimizer=optimizer)
    rdc = RobustDiffusionClassifier(tiny_net, ClassifierSettings(steps=2), p)
    x = _x(torch.float32)
    gen = LikelihoodMaximizer(tiny_net, p)(x)
    assert torch.equal(rdc.purify(x), gen)
    # the differentiable path computes the same values
    assert torch.allclose(rdc.purify(x.clone().requires_grad_(True), create_graph=True).detach(), gen, atol=1e-6)
    assert not torch.equal(gen, x)


def test_exact_gradient_matches_finite_differences(net64):
    """Through two Adam LM steps and the classifier, in float64, deterministic mode."""
    p = PurifySettings(eta=0.5, steps=2, step_size=0.01, optimizer="adam")
    rdc = RobustDiffusionClassifier(net64, ClassifierSettings(steps=2), p, grad_mode="exact").double()
    x = _x()
    x.requires_grad_(True)
    f = lambda z: rdc(z)[:, 3].sum() - rdc(z)[:, 5].sum()  # noqa: E731
    (grad,) = torch.autograd.grad(f(x), x)
    g = torch.Generator().manual_seed(1)
    h = 1e-6  # Adam's first step is g/(|g|+eps): steep where |g| is tiny, so keep h small (float64)
    for _ in range(3):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        d /= d.norm()
        with torch.no_grad():
            fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
        an = (grad * d).sum()
        assert abs(float(an - fd)) <= 1e-2 * max(abs(float(fd)), 1e-6), (float(an), float(fd))


def test_bpda_gradient_is_the_classifier_gradient_at_the_purified_point(net64):
    p = PurifySettings(eta=0.1, steps=2, step_size=0.02)
    rdc = RobustDiffusionClassifier(net64, ClassifierSettings(steps=2), p, grad_mode="bpda").double()
    x = _x().requires_grad_(True)
    (g_bpda,) = torch.autograd.grad(rdc(x)[:, 0].sum(), x)
    xp = rdc.purify(x).detach().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(rdc.classifier(xp)[:, 0].sum(), xp)
    assert torch.allclose(g_bpda, g_ref)


def test_modes_agree_on_values_and_dc_only_skips_purification(tiny_net):
    p = PurifySettings(eta=0.1, steps=2, step_size=0.02)
    x = _x(torch.float32)
    out = {m: RobustDiffusionClassifier(tiny_net, ClassifierSettings(steps=2), p, m)(x.clone().requires_grad_(True))
           for m in ("exact", "bpda", "dc-only")}
    assert torch.allclose(out["exact"], out["bpda"], atol=1e-4)
    dc = RobustDiffusionClassifier(tiny_net, ClassifierSettings(steps=2), p).classifier(x)
    assert torch.allclose(out["dc-only"], dc)
    with torch.no_grad():
        assert torch.allclose(RobustDiffusionClassifier(tiny_net, ClassifierSettings(steps=2), p)(x), out["bpda"],
                              atol=1e-4)


@pytest.mark.parametrize("mode", ["exact", "bpda", "dc-only"])
def test_the_rdc_refuses_images_outside_0_1_as_the_dc_does(tiny_net, mode):
    """Before, a 0-255 image was clamped by the purification and classified without a word."""
    rdc = RobustDiffusionClassifier(tiny_net, ClassifierSettings(steps=2), PurifySettings(steps=1), mode)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[0, 1\]"):
        rdc(_x(torch.float32) * 255)


def test_bad_grad_mode(tiny_net):
    with pytest.raises(ValueError):
        RobustDiffusionClassifier(tiny_net, grad_mode="magic")


def test_apgd_against_the_full_defense_returns_valid_examples(tiny_net):
    from rdc_studio.core.attacks import AttackSettings, attack, run_to_end

    rdc = RobustDiffusionClassifier(tiny_net, ClassifierSettings(steps=2),
                                    PurifySettings(eta=0.1, steps=2, step_size=0.03), grad_mode="exact")
    x = torch.round(_x(torch.float32) * 255) / 255
    with torch.no_grad():
        y = rdc(x).argmax(1)
    res = run_to_end(attack(rdc, x, y, AttackSettings(eps=0.3, steps=4)))
    assert all(res.checks.values()) and (res.linf <= 0.3 + 1e-6).all()
    assert res.clean_correct.all() and res.queries >= 5


def test_attack_session_judges_with_the_full_defense(tiny_net):
    from rdc_studio.core.attacks import AttackResult, AttackSettings, AttackStep, DefenseOutcome, attack_session

    cs, ps = ClassifierSettings(steps=2), PurifySettings(eta=0.1, steps=1, step_size=0.03)
    full = RobustDiffusionClassifier(tiny_net, cs, ps, "exact")
    x = torch.round(_x(torch.float32)[:1] * 255) / 255
    records = list(attack_session(full.classifier, x, AttackSettings(eps=0.2, steps=3), defense=full,
                                  purify=full.purify))
    assert [type(r) for r in records] == [AttackStep] * 3 + [AttackResult, DefenseOutcome]
    out = records[-1]
    with torch.no_grad():
        expected = torch.softmax(full(torch.from_numpy(out.adversarial)), 1).numpy()
        dc_pred = full.classifier(torch.from_numpy(out.adversarial)).argmax(1).numpy()
    assert np.allclose(out.defense_probabilities, expected, atol=1e-5)
    assert np.array_equal(out.attacked_prediction, dc_pred)
    assert out.defense_recovered[0] == (expected.argmax(1)[0] == out.labels[0])
    assert out.purified.shape == x.shape and np.abs(out.purified - out.adversarial).max() <= 0.1 + 1e-6


def test_smooth_mode_keeps_values_and_sees_the_purification_respond(net64):
    """With sign steps the exact gradient ignores the LM's response (d sign = 0); smooth does not."""
    p = PurifySettings(eta=0.3, steps=3, step_size=0.05)
    x = _x()
    grads, values = {}, {}
    for mode in ("exact", "smooth", "bpda"):
        rdc = RobustDiffusionClassifier(net64, ClassifierSettings(steps=2), p, grad_mode=mode).double()
        z = x.clone().requires_grad_(True)
        out = rdc(z)
        values[mode] = out.detach()
        (grads[mode],) = torch.autograd.grad(out[:, 0].sum(), z)
    assert torch.allclose(values["smooth"], values["exact"]) and torch.allclose(values["smooth"], values["bpda"])
    assert torch.isfinite(grads["smooth"]).all() and grads["smooth"].abs().sum() > 0
    rel = (grads["smooth"] - grads["exact"]).norm() / grads["exact"].norm()
    assert rel > 1e-3, "the surrogate should change the gradient of sign steps"


def test_smooth_mode_equals_exact_for_adam(net64):
    p = PurifySettings(eta=0.3, steps=2, step_size=0.01, optimizer="adam")
    x = _x()
    grads = {}
    for mode in ("exact", "smooth"):
        rdc = RobustDiffusionClassifier(net64, ClassifierSettings(steps=2), p, grad_mode=mode).double()
        z = x.clone().requires_grad_(True)
        (grads[mode],) = torch.autograd.grad(rdc(z)[:, 0].sum(), z)
    assert torch.allclose(grads["exact"], grads["smooth"])


def test_masked_gradient_warning_only_for_exact_through_sign_steps():
    from rdc_studio.core.rdc import masked_gradient_warning

    sign, adam = PurifySettings(steps=3), PurifySettings(steps=3, optimizer="adam")
    assert "smooth" in masked_gradient_warning("exact", sign)
    assert masked_gradient_warning("smooth", sign) is None and masked_gradient_warning("bpda", sign) is None
    assert masked_gradient_warning("exact", adam) is None
    assert masked_gradient_warning("exact", PurifySettings(steps=0)) is None


def test_auto_gradient_mode_is_adaptive_for_each_optimiser(tiny_net):
    from rdc_studio.core.rdc import resolve_grad_mode

    assert resolve_grad_mode("auto", PurifySettings(steps=3)) == "smooth"
    assert resolve_grad_mode("auto", PurifySettings(steps=3, optimizer="adam")) == "exact"
    assert resolve_grad_mode("auto", PurifySettings(steps=0)) == "exact"
    for explicit in ("exact", "smooth", "bpda", "dc-only"):
        assert resolve_grad_mode(explicit, PurifySettings(steps=3)) == explicit
    # the module resolves "auto" itself, so every caller gets the same policy
    assert RobustDiffusionClassifier(tiny_net, purify=PurifySettings(steps=3), grad_mode="auto").grad_mode == "smooth"
    with pytest.raises(ValueError, match="grad_mode"):
        RobustDiffusionClassifier(tiny_net, grad_mode="sideways")
