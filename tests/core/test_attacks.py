import numpy as np
import pytest
import torch
from torch import nn

from rdc_studio.core.attacks import (APGD, APGDT, PGD, AttackSettings, EnsembleMember, Square, apgd_checkpoints, attack,
                                    attack_loss, ensemble_attack, margin_of, project, quantize_in_ball, run_to_end,
                                    square_fraction, square_side, standard_ensemble)


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


def test_l2_rounding_never_leaves_the_ball():
    """Many sub-level steps all round up to one level; shrinking by 2% cannot undo that."""
    x0 = torch.full((1, 1, 8, 8), 100 / 255)
    x = x0 + 0.6 / 255
    eps = 0.019  # |x - x0| = 0.0188, one level everywhere would be 0.0314
    q = quantize_in_ball(x, x0, eps, "l2")
    assert (q - x0).norm() <= eps + 1e-6
    assert torch.allclose(q * 255, torch.round(q * 255), atol=1e-4)


def test_l2_rounding_keeps_almost_all_of_eps_on_a_cifar_sized_image():
    """Rounding a point on the eps sphere moves each pixel by at most one level and gives
    away next to nothing (scaling the whole perturbation down gave away ~16% here)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.round(torch.rand(20, 3, 32, 32, generator=g) * 255) / 255
    d = torch.randn(20, 3, 32, 32, generator=g)
    x = project(x0 + d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.5, x0, 0.5, "l2")
    q = quantize_in_ball(x, x0, 0.5, "l2")
    size = (q - x0).flatten(1).norm(dim=1)
    assert (size <= 0.5 + 1e-6).all() and (size >= 0.99 * (x - x0).flatten(1).norm(dim=1)).all()
    assert ((q - x).abs() <= 1 / 255 + 1e-6).all()
    assert torch.allclose(q * 255, torch.round(q * 255), atol=1e-4)


def test_the_l2_random_start_lies_on_the_sphere():
    from rdc_studio.core.attacks.base import _random_start

    x0 = torch.full((4, 1, 8, 8), 0.5)
    start = _random_start(x0, 0.5, "l2", [1, 2, 3, 4])
    assert torch.allclose((start - x0).flatten(1).norm(dim=1), torch.full((4,), 0.5), atol=1e-5)


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("method,norm", [("apgd", "linf"), ("pgd", "linf"), ("apgd", "l2")])
def test_a_nan_gradient_is_an_error_never_a_robust_example(toy, method, norm):
    """A sign of NaN is 0 here: the attack would freeze at its start and pass the example as robust."""
    from rdc_studio.core.attacks import NonFiniteGradientError

    model, x, y = toy

    class Broken(nn.Module):
        def forward(self, z):
            return model(_NanGradient.apply(z))

    s = AttackSettings(method=method, norm=norm, eps=0.3 if norm == "linf" else 1.0, steps=3)
    with pytest.raises(NonFiniteGradientError, match="not finite .* for 16 of 16 examples"):
        run_to_end(attack(Broken(), x, y, s))


@pytest.mark.parametrize("method", ["apgd", "pgd"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 3.0)])
def test_large_eps_breaks_everything_and_results_validate(toy, method, norm, eps):
    model, x, y = toy
    records = []
    res = run_to_end(attack(model, x, y, AttackSettings(method=method, norm=norm, eps=eps, steps=30)), records.append)
    assert len(records) == 30 and records[0].image.shape == x.shape
    assert res.success.float().mean() == 1.0
    assert all(res.checks.values())
    size = res.linf if norm == "linf" else res.l2
    assert (size <= eps + 1e-6).all()
    with torch.no_grad():
        assert (model(res.adversarial).argmax(1) != y).all()


def test_accuracy_decreases_with_eps(toy):
    model, x, y = toy
    acc = [1 - run_to_end(attack(model, x, y, AttackSettings(eps=e, steps=20))).success.float().mean().item()
           for e in (0.0, 0.01, 0.05, 0.3)]
    assert acc[0] == 1.0 and acc[-1] == 0.0
    assert all(a >= b for a, b in zip(acc, acc[1:]))


def test_targeted_dlr_reaches_the_target(toy):
    model, x, y = toy
    res = run_to_end(attack(model, x, y, AttackSettings(loss="dlr-targeted", eps=0.5, steps=40)))
    assert res.success.float().mean() > 0.9


def test_cancel_returns_no_result(toy):
    from rdc_studio.core.attacks import attack

    model, x, y = toy
    stop = {"now": False}
    steps = []

    def on_step(step):
        steps.append(step)
        stop["now"] = len(steps) == 3

    assert run_to_end(attack(model, x, y, AttackSettings(steps=50), lambda: stop["now"]), on_step) is None
    assert len(steps) == 3


@pytest.mark.parametrize("method", ["apgd", "square"])
def test_cancel_takes_effect_between_eot_draws(toy, method):
    """A stop request is seen before the next pass of the model, not only between iterations."""
    model, x, y = toy
    passes = {"n": 0}

    class Counting(nn.Module):
        def forward(self, z):
            passes["n"] += 1
            return model(z)

    settings = AttackSettings(method=method, eps=0.05, steps=5, eot=20)
    assert run_to_end(attack(Counting(), x, y, settings, lambda: passes["n"] >= 7)) is None
    assert passes["n"] == 7  # stopped inside the first iteration's 20 draws


def test_torchattacks_shaped_classes_match_the_generators(toy):
    model, x, y = toy
    apgd = APGD(model, norm="Linf", eps=0.05, steps=5, loss="dlr")
    expected = run_to_end(attack(model, x, y, AttackSettings(loss="dlr", eps=0.05, steps=5)))
    assert torch.equal(apgd(x, y), expected.adversarial)
    assert apgd.last_result.success.dtype == torch.bool and all(apgd.last_result.checks.values())
    pgd = PGD(model, eps=0.05, alpha=0.01, steps=5)
    expected = run_to_end(attack(model, x, y, AttackSettings(method="pgd", eps=0.05, step_size=0.01, steps=5)))
    assert torch.equal(pgd(x, y), expected.adversarial)
    square = Square(model, norm="L2", eps=1.0, n_queries=20)
    expected = run_to_end(attack(model, x, y, AttackSettings(method="square", norm="l2", eps=1.0, steps=20)))
    assert torch.equal(square(x, y), expected.adversarial)
    apgdt = APGDT(model, eps=0.05, steps=3, n_target_classes=2)
    adv = apgdt(x, y)
    member = EnsembleMember("apgd-t", AttackSettings(loss="dlr-targeted", eps=0.05, steps=3), targets=2)
    assert torch.equal(adv, run_to_end(ensemble_attack(model, x, y, [member])).adversarial)
    assert len(list(APGD(model, eps=0.05, steps=4).steps(x, y))) == 4
    with pytest.raises(ValueError, match="norm"):
        APGD(model, norm="L1")


def test_attacks_refuse_images_off_the_8bit_grid_or_outside_the_convention(toy):
    """The attacks return 8-bit images within eps of the input: an input between grey levels
    (e.g. resized), 0-255 values or uint8 are refused before any work, not at validation."""
    model, x, y = toy
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for bad, message in ((x * 0.99 + 0.3 / 255, "8-bit values"), (x * 255, r"\[0, 1\]"),
                         ((x * 255).to(torch.uint8), "floating point")):
        for make in (lambda: APGD(model, eps=0.05, steps=2), lambda: APGDT(model, eps=0.05, steps=2,
                                                                            n_target_classes=1)):
            with pytest.raises(ValueError, match=message):
                make()(bad, y)
    assert not calls


def test_apgdt_result_says_which_examples_are_broken_like_the_others(toy):
    model, x, y = toy
    apgdt = APGDT(model, eps=0.05, steps=3, n_target_classes=2)
    adv = apgdt(x, y)
    result = apgdt.last_result
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert result.success.dtype == torch.bool and torch.equal(result.success, fooled)


def test_settings_validation():
    with pytest.raises(ValueError):
        AttackSettings(norm="l1")
    with pytest.raises(ValueError):
        AttackSettings(loss="hinge")
    # grey levels written as a whole number: an l-inf ball over the whole pixel range
    with pytest.raises(ValueError, match="e.g. 8/255"):
        AttackSettings(norm="linf", eps=8)
    assert AttackSettings(norm="linf", eps=1.0).eps == 1.0 and AttackSettings(norm="l2", eps=8).eps == 8


def test_results_do_not_depend_on_batching(toy):
    """Per-example seeds: attacking in one batch or in two gives the same examples."""
    model, x, y = toy
    s = AttackSettings(eps=0.05, steps=10)
    whole = run_to_end(attack(model, x, y, s))
    first = run_to_end(attack(model, x[:7], y[:7], s, example_ids=list(range(7))))
    second = run_to_end(attack(model, x[7:], y[7:], s, example_ids=list(range(7, 16))))
    assert torch.equal(whole.adversarial, torch.cat([first.adversarial, second.adversarial]))
    assert torch.equal(whole.success, torch.cat([first.success, second.success]))


def test_square_schedule_follows_the_paper():
    """p_init is halved at iterations 10, 50, 200, ..., 8000 of 10 000, rescaled to the budget."""
    p = [square_fraction(0.8, i, 10_000) for i in (10, 11, 50, 51, 200, 201, 8000, 8001, 10_000)]
    assert p == [0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 2 ** 8, 0.8 / 2 ** 9, 0.8 / 2 ** 9]
    assert square_fraction(0.8, 1, 1000) == 0.8 and square_fraction(0.8, 2, 1000) == 0.4
    assert square_side(0.8, 28, 28) == 25 and square_side(1e-4, 28, 28) == 1 and square_side(1.0, 28, 28) == 28
    assert square_side(1e-4, 28, 28, minimum=3) == 3


def test_square_l2_pattern():
    from rdc_studio.core.attacks import _pyramid

    eta = _pyramid(5)
    assert eta.norm().item() == pytest.approx(1.0)
    assert torch.equal(eta, eta.T) and torch.equal(eta, eta.flip(0))
    assert eta[2, 2] == eta.max() and eta[0, 0] == eta.min() and eta[1, 1] > eta[0, 1]


def test_square_settings():
    s = AttackSettings(method="square")
    assert s.loss == "margin" and s.to_dict()["p_init"] == 0.8
    for bad in (dict(loss="dlr"), dict(loss="dlr-targeted"), dict(p_init=0.0), dict(p_init=1.5)):
        with pytest.raises(ValueError):
            AttackSettings(method="square", **bad)
    with pytest.raises(ValueError):
        AttackSettings(target_rank=0)
    # other attacks keep their settings dicts (reports, resumable states) as they were
    assert set(AttackSettings().to_dict()) == {"method", "loss", "norm", "eps", "steps", "step_size", "restarts",
                                               "random_start", "eot", "target", "seed"}


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 3.0)])
def test_square_breaks_everything_at_large_eps_and_results_validate(toy, norm, eps):
    model, x, y = toy
    records = []
    settings = AttackSettings(method="square", norm=norm, eps=eps, steps=100)
    res = run_to_end(attack(model, x, y, settings), records.append)
    assert res.success.all() and all(res.checks.values())
    size = res.linf if norm == "linf" else res.l2
    assert (size <= eps + 1e-6).all() and res.adversarial.min() >= 0 and res.adversarial.max() <= 1
    with torch.no_grad():
        assert (model(res.adversarial).argmax(1) != y).all()
    # stops once all are broken; one query per iteration per example still unbroken
    assert 1 <= len(records) < 100 and records[0].image.shape == x.shape
    assert records[0].step_size[0] == pytest.approx(square_fraction(0.8, 1, 100))
    assert (res.example_queries >= 3).all() and (res.example_queries <= len(records) + 3).all()
    assert res.queries == len(records) + 3


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_square_is_seeded_per_example(toy, norm, eps):
    """Deterministic for a seed, independent of batching, margins only go down, inside the ball."""
    model, x, y = toy
    s = AttackSettings(method="square", norm=norm, eps=eps, steps=30)
    records = []
    whole = run_to_end(attack(model, x, y, s), records.append)
    assert torch.equal(whole.adversarial, run_to_end(attack(model, x, y, s)).adversarial)
    first = run_to_end(attack(model, x[:7], y[:7], s, example_ids=list(range(7))))
    second = run_to_end(attack(model, x[7:], y[7:], s, example_ids=list(range(7, 16))))
    assert torch.equal(whole.adversarial, torch.cat([first.adversarial, second.adversarial]))
    assert torch.equal(whole.success, torch.cat([first.success, second.success]))
    other = run_to_end(attack(model, x, y, AttackSettings(method="square", norm=norm, eps=eps, steps=30, seed=1)))
    assert not torch.equal(whole.adversarial, other.adversarial)
    margins = np.stack([r.margin for r in records])
    assert (np.diff(margins, axis=0) <= 0).all()
    for r in records:
        assert ((r.linf if norm == "linf" else r.l2) <= eps + 1e-6).all()
    assert ((whole.linf if norm == "linf" else whole.l2) <= eps + 1e-6).all() and all(whole.checks.values())


def test_square_accuracy_decreases_with_eps(toy):
    model, x, y = toy
    results = [run_to_end(attack(model, x, y, AttackSettings(method="square", eps=e, steps=50)))
               for e in (0.0, 0.02, 0.1, 0.3)]
    acc = [1 - r.success.float().mean().item() for r in results]
    assert acc[0] == 1.0 and acc[-1] == 0.0 and acc[1] < 1.0
    assert all(a >= b for a, b in zip(acc, acc[1:]))


def test_square_on_a_linear_model_finds_the_corner():
    """On a linear two-class model the best l-inf perturbation is -eps * sign(w) (margin
    reduction 2 * eps * |w|_1); with a margin too large to overturn, Square searches all its
    iterations and gets close to that optimum."""
    w = torch.tensor([1.0, -1.0]).repeat_interleave(32)
    model = nn.Linear(64, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([w, -w]))
        model.bias.copy_(torch.tensor([10.0, -10.0]))
    model = nn.Sequential(nn.Flatten(), model)
    x = torch.full((2, 1, 8, 8), 128 / 255)
    y = torch.tensor([0, 0])
    eps = 20 / 255
    records = []
    res = run_to_end(attack(model, x, y, AttackSettings(method="square", eps=eps, steps=200)), records.append)
    assert len(records) == 200 and not res.success.any()
    best = 2 * eps * 64
    reached = 20.0 - torch.from_numpy(records[-1].margin)
    assert (reached >= 0.9 * best).all() and (reached <= best + 1e-4).all()


def test_ensemble_runs_in_order_on_unbroken_examples(toy):
    model, x, y = toy
    y = y.clone()
    y[0] = (y[0] + 1) % 10  # misclassified clean: never attacked
    torch.manual_seed(3)
    surrogate = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    members = [EnsembleMember("nothing", AttackSettings(eps=0.0, steps=2))] + \
        standard_ensemble("linf", 0.05, steps=5, targets=2, square_queries=20)
    steps = []
    res = run_to_end(ensemble_attack(model, x, y, members, surrogate=surrogate), steps.append)
    assert [st.name for st in steps] == ["nothing", "apgd-ce", "apgd-dlr", "apgd-t", "square", "transfer"]
    assert res.broken_by[0] == "clean" and steps[0].broken == 0 and steps[0].attacked == 15
    left = 15
    for st in steps:
        assert st.attacked == left and st.broken == left - int(st.robust.sum())
        left = int(st.robust.sum())
    assert [b is None for b in res.broken_by] == res.robust.tolist()
    assert 0 < int(res.robust.sum()) < 15
    # per-example worst case: what APGD-CE alone breaks (same per-example seeds), the ensemble breaks
    alone = run_to_end(attack(model, x, y, AttackSettings(eps=0.05, steps=5)))
    assert not (alone.success & res.robust).any()
    broken = ~res.robust
    with torch.no_grad():
        assert (model(res.adversarial[broken]).argmax(1) != y[broken]).all()
    assert (res.linf <= 0.05 + 1e-6).all() and (res.queries >= 1).all()


def test_ensemble_transfer_and_targets():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.round(torch.rand(6, 1, 8, 8, generator=g) * 255) / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    s = AttackSettings(eps=0.03, steps=5)
    # transferring from the attacked model itself is the white-box attack
    res = run_to_end(ensemble_attack(model, x, y, [EnsembleMember("transfer", s, transfer=True)], surrogate=model))
    assert res.robust.tolist() == (~run_to_end(attack(model, x, y, s)).success).tolist()
    with pytest.raises(ValueError, match="surrogate"):
        run_to_end(ensemble_attack(model, x, y, [EnsembleMember("transfer", s, transfer=True)]))
    # targeted DLR runs once per runner-up class (nothing breaks at eps 0, so every run sees every example)
    t = AttackSettings(loss="dlr-targeted", eps=0.0, steps=3)
    one = run_to_end(ensemble_attack(model, x, y, [EnsembleMember("apgd-t", t, targets=1)]))
    three = run_to_end(ensemble_attack(model, x, y, [EnsembleMember("apgd-t", t, targets=3)]))
    assert three.attack_queries["apgd-t"] == 3 * one.attack_queries["apgd-t"] > 0
    fifty = run_to_end(ensemble_attack(model, x, y, [EnsembleMember("apgd-t", t, targets=50)]))
    assert fifty.attack_queries["apgd-t"] == 9 * one.attack_queries["apgd-t"]


class _TwoClassLinear(nn.Module):
    """Logits (0, w . x + c): on binarised input its margin is linear in the bits, so the
    lowest margin any set of flips reaches is known exactly."""

    def __init__(self, w: torch.Tensor, c: float) -> None:
        super().__init__()
        self.w, self.c = w, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w.flatten() + self.c
        return torch.stack([torch.zeros_like(score), score], 1)


def test_flippable_pixels_are_those_eps_carries_across_the_threshold():
    from rdc_studio.core.attacks import flippable_pixels

    x = torch.tensor([0.0, 0.1, 0.21, 0.5, 0.51, 0.79, 0.8, 0.81, 1.0]).view(1, 1, 1, 9)
    x = torch.round(x * 255) / 255
    flippable, value = flippable_pixels(x, 0.3, 0.5)
    # 0.8 is 204/255: the nearest 8-bit value within 0.3 is 128/255, still above 0.5
    assert flippable.flatten().tolist() == [False, False, True, True, True, True, False, False, False]
    binary = lambda z: (z > 0.5).float()  # noqa: E731  (as core.defense.InputBinarization sees it)
    assert torch.all(binary(value)[flippable] != binary(x)[flippable])
    assert float((value - x).abs().max()) <= 0.3 + 1e-6 and torch.equal(torch.round(value * 255), value * 255)


@pytest.mark.parametrize("seed", range(4))
def test_flip_attack_finds_the_exact_optimum_of_a_linear_model_on_bits(seed):
    """For a margin linear in the bits the best flips are known: flip every reachable pixel
    whose weight pushes the right way. The attack breaks exactly the examples that optimum
    breaks, and stays inside the ball, on the 8-bit grid."""
    from rdc_studio.core.attacks import Flip, flippable_pixels
    from rdc_studio.core.defense import InputBinarization

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 6, 6, generator=g)
    x = torch.round(torch.rand(12, 1, 6, 6, generator=g) * 255) / 255
    bits = (x > 0.5).float()
    flippable, value = flippable_pixels(x, 0.3, 0.5)
    gain = torch.where(flippable, ((value > 0.5).float() - bits) * w, torch.zeros_like(x)).clamp(max=0)
    lowest = (bits * w).flatten(1).sum(1) + gain.flatten(1).sum(1)  # the optimum without c
    c = float(-lowest.median()) + 1e-3  # about half the examples can be broken (no ties at 0)
    model = InputBinarization(_TwoClassLinear(w, c), 0.5)
    y = torch.ones(12, dtype=torch.long)
    clean_ok = model(x).argmax(1) == 1
    attacker = Flip(model, eps=0.3, threshold=0.5, steps=60)
    attacker(x, y)
    result = attacker.last_result
    breakable = (lowest + c < 0) & clean_ok
    assert torch.equal(result.success & clean_ok, breakable)
    assert bool(breakable.any()) and bool((clean_ok & ~breakable).any())
    assert float(result.linf.max()) <= 0.3 + 1e-6 and all(result.checks.values())


def test_flip_attack_is_independent_of_batching_and_stops_when_nothing_is_reachable(toy):
    from rdc_studio.core.attacks import Flip
    from rdc_studio.core.defense import InputBinarization

    model, x, y = toy
    binarised = InputBinarization(model, 0.5)
    y = binarised(x).argmax(1)
    together = Flip(binarised, eps=0.2, steps=8, n_restarts=2).run(x[:5], y[:5], example_ids=list(range(5)))
    for k in range(5):
        alone = Flip(binarised, eps=0.2, steps=8, n_restarts=2).run(x[k:k + 1], y[k:k + 1], example_ids=[k])
        assert torch.equal(alone.adversarial[0], together.adversarial[k])
    hard = (x[:3] > 0.5).float()  # 0 and 1 only: eps 0.3 reaches no threshold crossing
    result = Flip(binarised, eps=0.3, steps=50).run(hard, binarised(hard).argmax(1))
    assert not result.success.any() and torch.equal(result.adversarial, hard)
    assert int(result.example_queries.max()) <= 3  # the clean pass, one gradient, the final check


def test_flip_attack_settings_and_cancellation(toy):
    from rdc_studio.core.defense import InputBinarization

    with pytest.raises(ValueError, match="l-inf only"):
        AttackSettings(method="flip", norm="l2", eps=1.0)
    with pytest.raises(ValueError, match="threshold"):
        AttackSettings(method="flip", threshold=1.0)
    with pytest.raises(ValueError, match="margin"):
        AttackSettings(method="flip", loss="dlr")
    s = AttackSettings(method="flip", eps=0.3, steps=5, threshold=0.4)
    assert s.loss == "margin" and s.to_dict()["threshold"] == 0.4
    assert "threshold" not in AttackSettings().to_dict()  # other attacks' reports keep their form
    model, x, y = toy
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) > 3

    steps = list(attack(InputBinarization(model, 0.4), x, y, s, cancelled))
    assert len(steps) < 5 and run_to_end(attack(InputBinarization(model, 0.4), x, y, s, lambda: True)) is None


@pytest.mark.parametrize("method, phase", [("apgd", "forward"), ("apgd", "backward"), ("square", "forward"),
                                           ("ensemble", "forward"), ("ensemble", "backward")])
def test_a_stop_ends_an_attack_inside_a_diffusion_classifier_pass(tiny_net, method, phase):
    """The attack's ``cancelled`` reaches into the classifier's pass: no network call runs
    after the one during which Stop came (forward), nor after Stop in a backward pass."""
    from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier

    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=8), max_network_inputs=4)
    x = torch.round(torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255) / 255
    with torch.no_grad():
        y = clf(x).argmax(1)  # correctly classified, so every attack runs
    calls = {"forward": 0, "backward": 0, "after_stop": 0}
    stop = {"now": False}

    def on_forward(*_):
        calls["forward"] += 1
        calls["after_stop"] += stop["now"]
        if phase == "forward" and calls["forward"] == 6:  # pressed during the 6th call (of 4 per pass)
            stop["now"] = True

    def on_backward(*_):
        calls["backward"] += 1
        calls["after_stop"] += stop["now"]
        stop["now"] = True  # pressed during the first backward call

    handles = [tiny_net.conv_in.register_forward_pre_hook(on_forward),
               tiny_net.conv_in.register_full_backward_pre_hook(on_backward)]
    settings = AttackSettings(method="square" if method == "square" else "apgd", eps=0.1, steps=3)
    try:
        if method == "ensemble":
            steps = ensemble_attack(clf, x, y, [EnsembleMember("APGD-CE", settings)], cancelled=lambda: stop["now"])
        else:
            steps = attack(clf, x, y, settings, lambda: stop["now"])
        assert run_to_end(steps) is None
    finally:
        for handle in handles:
            handle.remove()
    assert stop["now"] and calls["after_stop"] == 0
    assert calls["backward"] == (1 if phase == "backward" else 0)


def test_a_stop_during_the_verdict_ends_the_session_quietly(toy):
    """attack_session's closing passes (attacked model, full defense, purification) stop too."""
    from rdc_studio.core.attacks import AttackResult, DefenseOutcome, attack_session
    from rdc_studio.core.runtime import raise_if_cancelled

    model, x, y = toy
    stop = {"now": False, "defense_passes": 0}

    class PollingDefense(nn.Module):  # as the diffusion classifier polls between its calls
        def forward(self, z):
            stop["defense_passes"] += 1
            stop["now"] = True
            raise_if_cancelled()
            return model(z)

    records = list(attack_session(model, x[:2], AttackSettings(eps=0.05, steps=2), defense=PollingDefense(),
                                  y=y[:2], cancelled=lambda: stop["now"]))
    assert stop["defense_passes"] == 1
    assert any(isinstance(r, AttackResult) for r in records)
    assert not any(isinstance(r, DefenseOutcome) for r in records)
