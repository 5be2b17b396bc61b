"""Gradient-masking checks on hand-made report dicts (pass and fail cases)."""
import pytest

from rdc_studio.core.evaluate import wilson_interval
from rdc_studio.core.masking import (all_passed, check_large_eps, check_monotone_eps, check_more_iterations,
                          check_whitebox_vs_blackbox, paired_difference_ci, robust_flags)


def report(robust, clean=None, eps=0.3, steps=100, method="apgd", norm="linf", per_attack=None):
    """A minimal ``rdc eval`` report: per-example robust flags (and clean flags) of examples 0..n-1."""
    clean = [True] * len(robust) if clean is None else clean
    n, k = len(robust), sum(robust)
    rep = {"n": n, "clean_acc": sum(clean) / n, "robust_acc": k / n, "robust_ci95": list(wilson_interval(k, n)),
           "per_example": [[i, 0, int(c), int(r)] for i, (c, r) in enumerate(zip(clean, robust))],
           "settings": {"attack": "square" if method == "square" else "apgd-ce",
                        "attack_settings": {"method": method, "norm": norm, "eps": eps, "steps": steps}}}
    if per_attack is not None:
        rep["per_attack"] = per_attack
    return rep


def flags(robust_count, n=10):
    return [i < robust_count for i in range(n)]


def test_large_eps_passes_at_zero_and_fails_otherwise():
    ok = check_large_eps(report(flags(0), eps=0.6))
    assert ok.passed and ok.verdict == "PASS" and ok.values["eps"] == 0.6 and "0.0%" in ok.summary
    bad = check_large_eps(report(flags(3), eps=0.6))
    assert not bad.passed and bad.verdict == "FAIL" and bad.values["robust_acc"] == pytest.approx(0.3)
    assert check_large_eps(report(flags(1)), max_acc=0.1).passed


def test_monotone_eps_pass_and_fail():
    clean = [True] * 9 + [False]
    sweep = [(0.1, report(flags(8), clean)), (0.3, report(flags(2), clean)), (0.2, report(flags(5), clean))]
    ok = check_monotone_eps(sweep)
    assert ok.passed and ok.values["eps"] == [0.0, 0.1, 0.2, 0.3]  # sorted, clean accuracy at eps 0
    assert ok.values["robust_acc"] == [0.9, 0.8, 0.5, 0.2] and ok.values["non_monotone_examples"] == []
    # more robust at 0.3 than at 0.2: a sign of masked gradients
    rising = [(0.1, report(flags(8))), (0.2, report(flags(2))), (0.3, report(flags(4)))]
    bad = check_monotone_eps(rising)
    assert not bad.passed and bad.values["rises"] == [{"from_eps": 0.2, "to_eps": 0.3, "from_acc": 0.2,
                                                       "to_acc": 0.4}]
    assert bad.values["non_monotone_examples"] == [2, 3] and "0.2 -> 0.3" in bad.summary
    assert check_monotone_eps(rising, tol=0.25).passed


def test_monotone_eps_counts_examples_that_swap():
    a = report([True, False, True, True])
    b = report([False, True, True, True])  # same accuracy, but example 1 came back
    res = check_monotone_eps([(0.1, a), (0.2, b)])
    assert res.passed and res.values["non_monotone_examples"] == [1]


def test_whitebox_vs_blackbox():
    wb = report(flags(3), per_attack=None)
    ok = check_whitebox_vs_blackbox(wb, report(flags(6), method="square", steps=1000), report(flags(9)))
    assert ok.passed and ok.values["whitebox_acc"] == 0.3 and ok.values["square_acc"] == 0.6
    assert ok.values["broken_only_by_square"] == [] and "Square: 60.0%" in ok.summary
    # Square finds more adversarial examples than the gradient attack: FAIL
    bad = check_whitebox_vs_blackbox(report(flags(5)), report(flags(2), method="square"), report(flags(9)))
    assert not bad.passed and bad.values["broken_only_by_square"] == [2, 3, 4]
    # the transfer attack beating white-box also fails
    assert not check_whitebox_vs_blackbox(report(flags(5)), report(flags(5)), report(flags(4))).passed


def test_whitebox_vs_blackbox_reports_ensemble_breaks_after_apgd():
    per_attack = [{"attack": "apgd-ce", "success": 5}, {"attack": "apgd-dlr", "success": 1},
                  {"attack": "apgd-t", "success": 0}, {"attack": "square", "success": 2},
                  {"attack": "transfer", "success": 0}]
    ens = report(flags(2, n=20), per_attack=per_attack)
    res = check_whitebox_vs_blackbox(report(flags(3)), report(flags(3)), report(flags(3)), ensemble=ens)
    assert res.passed and res.values["ensemble_breaks_after_apgd"] == {"square": 2, "transfer": 0}
    assert "square broke 2" in res.summary


def test_more_iterations_pass_and_fail():
    short = report(flags(50, n=100), steps=100)
    ok = check_more_iterations(short, report(flags(50, n=100), steps=200))
    assert ok.passed and ok.values["change"] == 0 and ok.values["steps"] == [100, 200]
    lo, hi = ok.values["change_ci95"]
    assert lo < 0 < hi
    bad = check_more_iterations(short, report(flags(47, n=100), steps=200))
    assert not bad.passed and bad.values["change"] == pytest.approx(-0.03)
    lo, hi = bad.values["change_ci95"]
    assert -0.1 < lo < -0.03 < 0 < hi < 0.02  # three examples broken by the longer attack, none recovered
    assert "-3.0 points" in bad.summary
    assert bad.values["lowered"] and not bad.values["raised"] and "not converged" in bad.summary
    # exactly one point is not "less than one point"
    assert not check_more_iterations(short, report(flags(49, n=100), steps=200)).passed


def test_more_iterations_tolerates_a_rise_within_noise_but_not_beyond():
    short = report(flags(50, n=100), steps=20)
    # three examples more robust with the longer attack (a different step-size schedule): the
    # paired interval still reaches below zero, and the shorter attack's figure is the lower one
    noise = check_more_iterations(short, report(flags(53, n=100), steps=40))
    assert noise.passed and noise.values["change"] == pytest.approx(0.03)
    assert noise.values["change_ci95"][0] < 0 and "a rise within noise" in noise.summary
    # eight more and none fewer: the longer attack is reliably weaker, the gradients unreliable
    weaker = check_more_iterations(short, report(flags(58, n=100), steps=40))
    assert not weaker.passed and weaker.values["raised"] and not weaker.values["lowered"]
    assert weaker.values["change_ci95"][0] > 0 and "unreliable gradients" in weaker.summary


def test_paired_difference_ci():
    same = [True] * 30 + [False] * 20
    lo, hi = paired_difference_ci(same, same)
    # no pair changed: a symmetric interval of positive width (Wilson-like: z^2 / (n + z^2))
    assert lo == pytest.approx(-hi) and hi == pytest.approx(1.959964 ** 2 / (50 + 1.959964 ** 2), rel=1e-6)
    # 10 of 50 pairs flip from yes to no: difference -0.2, interval around it and excluding 0
    second = [False] * 10 + [True] * 20 + [False] * 20
    lo, hi = paired_difference_ci(same, second)
    assert -0.35 < lo < -0.2 < hi < -0.1
    # mirror image
    lo2, hi2 = paired_difference_ci(second, same)
    assert (lo2, hi2) == pytest.approx((-hi, -lo))
    assert paired_difference_ci([], []) == (-1.0, 1.0)
    with pytest.raises(ValueError):
        paired_difference_ci([True], [True, False])


def test_checks_refuse_reports_of_different_examples():
    with pytest.raises(ValueError, match="same test examples"):
        check_more_iterations(report(flags(1, n=4)), report(flags(1, n=5)))


def test_helpers():
    assert robust_flags(report([True, False])) == {0: True, 1: False}
    results = [check_large_eps(report(flags(0))), check_large_eps(report(flags(5)))]
    assert not all_passed(results) and all_passed(results[:1]) and all_passed([])
    d = results[1].to_dict()
    assert d["verdict"] == "FAIL" and d["name"] == "large_eps" and d["passed"] is False
