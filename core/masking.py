"""Gradient-masking checks (docs/architecture.md, evaluation rules) over ``rdc eval`` reports.

Pure functions of the JSON report dicts that :func:`core.evaluate.robust_report` writes;
each returns a :class:`CheckResult` (PASS/FAIL with the numbers behind it):

* :func:`check_large_eps`: robust accuracy reaches ~0 at a large eps;
* :func:`check_monotone_eps`: robust accuracy does not increase with eps;
* :func:`check_whitebox_vs_blackbox`: the white-box attack is at least as strong as the
  black-box (Square) and transfer attacks;
* :func:`check_more_iterations`: doubling the iterations does not lower robust accuracy by
  a point or more (the shorter attack had not converged), nor raise it beyond noise (the
  attack's outcome depends on its schedule: a sign of unreliable gradients).

All reports of one check must cover the same test examples (they are compared per example).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

Report = dict[str, Any]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one gradient-masking check."""

    name: str  # "large_eps", "monotone_eps", "whitebox_vs_blackbox", "more_iterations"
    title: str  # what was checked, in words
    passed: bool
    summary: str  # the numbers, one line
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": self.verdict}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _ci(lo_hi: Sequence[float]) -> str:
    return f"95% CI {100 * lo_hi[0]:.1f}-{100 * lo_hi[1]:.1f}%"


def robust_flags(report: Report) -> dict[int, bool]:
    """Example index -> still classified correctly after the attack."""
    from .evaluate import example_rows

    return {row.index: row.robust_correct for row in example_rows(report)}


def attack_settings(report: Report) -> dict[str, Any]:
    """The attack settings of a single-attack report (eps, norm, steps, ...)."""
    return dict(report.get("settings", {}).get("attack_settings", {}))


def _describe(report: Report) -> str:
    st = report.get("settings", {})
    att = attack_settings(report)
    attack = st.get("attack", "?")
    if "eps" in att:
        what = f"{attack} {att.get('norm', '')} eps {att['eps']:g}"
        return what + (f", {att['steps']} {'queries' if att.get('method') == 'square' else 'steps'}"
                       if "steps" in att else "")
    return str(attack)


def _same_examples(reports: Sequence[Report]) -> None:
    sets = [sorted(robust_flags(r)) for r in reports]
    if any(s != sets[0] for s in sets[1:]):
        raise ValueError("the reports of a check must cover the same test examples")


def paired_difference_ci(first: Sequence[bool], second: Sequence[bool],
                         z: float = 1.959964) -> tuple[float, float]:
    """95% interval of mean(second) - mean(first) for paired yes/no outcomes.

    Tango's score interval (Tango 1998): all differences d whose score statistic, with
    the discordant-pair probabilities fitted under d, stays within ``z``. Unlike Wald or
    Newcombe intervals it keeps a positive width when no pair changed.
    """
    if len(first) != len(second):
        raise ValueError("paired outcomes need equal lengths")
    n = len(first)
    if n == 0:
        return (-1.0, 1.0)
    up = sum(1 for u, v in zip(first, second) if v and not u)  # pairs that went from no to yes
    down = sum(1 for u, v in zip(first, second) if u and not v)

    def score(d: float) -> float:
        w = -up - down + (2 * n - up + down) * d
        q = (math.sqrt(max(0.0, w * w + 8 * n * down * d * (1 - d))) - w) / (4 * n)  # fitted P(down) under d
        var = n * (2 * q + d - d * d)
        num = up - down - n * d
        if var <= 1e-15:
            return 0.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
        return num / math.sqrt(var)

    def root(lo: float, hi: float, target: float) -> float:
        for _ in range(60):  # score() decreases in d
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if score(mid) > target else (lo, mid)
        return (lo + hi) / 2

    d_hat = (up - down) / n
    lower = -1.0 if score(-1.0) <= z else root(-1.0, d_hat, z)
    upper = 1.0 if score(1.0) >= -z else root(d_hat, 1.0, -z)
    return (lower, upper)


def check_large_eps(report: Report, max_acc: float = 0.02) -> CheckResult:
    """(a) At a large eps (e.g. l-inf 0.6, l2 6 on MNIST) an attack that follows true
    gradients breaks (nearly) everything: PASS when robust accuracy <= ``max_acc``."""
    acc = report["robust_acc"]
    att = attack_settings(report)
    passed = acc <= max_acc + 1e-12
    summary = (f"{_describe(report)}: robust accuracy {_pct(acc)} ({_ci(report['robust_ci95'])}), n = {report['n']}; "
               f"needs <= {_pct(max_acc)}")
    return CheckResult("large_eps", "robust accuracy ~0 at a large eps", passed, summary,
                       {"eps": att.get("eps"), "norm": att.get("norm"), "robust_acc": acc,
                        "robust_ci95": list(report["robust_ci95"]), "n": report["n"], "max_acc": max_acc})


def check_monotone_eps(points: Sequence[tuple[float, Report]], tol: float = 0.0) -> CheckResult:
    """(b) Robust accuracy is non-increasing in eps (clean accuracy counts as eps 0).

    ``points`` are (eps, report) pairs of the same attack at different radii. PASS when no
    step to a larger eps raises robust accuracy by more than ``tol``. Examples broken at a
    smaller eps but not at a larger one are counted too (reported, not judged: the attacks
    at different radii are different runs).
    """
    if not points:
        raise ValueError("need at least one (eps, report) point")
    pts = sorted(points, key=lambda p: p[0])
    _same_examples([r for _, r in pts])
    eps = [0.0] + [float(e) for e, _ in pts]
    accs = [pts[0][1]["clean_acc"]] + [r["robust_acc"] for _, r in pts]
    rises = [{"from_eps": eps[i], "to_eps": eps[i + 1], "from_acc": accs[i], "to_acc": accs[i + 1]}
             for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + tol + 1e-12]
    flags = [robust_flags(r) for _, r in pts]
    non_monotone = sorted(i for i in flags[0]
                          if any(not flags[j][i] and any(flags[k][i] for k in range(j + 1, len(flags)))
                                 for j in range(len(flags))))
    curve = ", ".join(f"{e:g}: {_pct(a)}" for e, a in zip(eps, accs))
    summary = f"robust accuracy by eps {curve}"
    if rises:
        summary += "; rises at " + ", ".join(f"{r['from_eps']:g} -> {r['to_eps']:g}" for r in rises)
    summary += f"; {len(non_monotone)} example(s) broken at a smaller eps but not at a larger one"
    return CheckResult("monotone_eps", "robust accuracy non-increasing in eps", not rises, summary,
                       {"eps": eps, "robust_acc": accs, "rises": rises, "non_monotone_examples": non_monotone,
                        "n": pts[0][1]["n"], "tol": tol})


def check_whitebox_vs_blackbox(whitebox: Report, square: Report, transfer: Report,
                               ensemble: Report | None = None, tol: float = 0.0) -> CheckResult:
    """(c) The white-box gradient attack is at least as strong as the black-box (Square)
    and transfer attacks run alone on the same examples: PASS when its robust accuracy is
    <= both of theirs (+ ``tol``).

    With ``ensemble`` (an ensemble report), the examples that Square and the transfer
    attack broke after the APGD attacks had failed on them are reported as well.
    """
    _same_examples([whitebox, square, transfer])
    wb, sq, tr = whitebox["robust_acc"], square["robust_acc"], transfer["robust_acc"]
    passed = wb <= sq + tol + 1e-12 and wb <= tr + tol + 1e-12
    wb_flags, sq_flags, tr_flags = robust_flags(whitebox), robust_flags(square), robust_flags(transfer)
    only_square = sorted(i for i in wb_flags if wb_flags[i] and not sq_flags[i])
    only_transfer = sorted(i for i in wb_flags if wb_flags[i] and not tr_flags[i])
    summary = (f"white-box {_describe(whitebox)}: {_pct(wb)}; Square: {_pct(sq)}; transfer: {_pct(tr)} "
               f"(n = {whitebox['n']}); {len(only_square)} / {len(only_transfer)} example(s) broken by Square / "
               f"transfer but not by the white-box attack")
    values: dict[str, Any] = {
        "whitebox_acc": wb, "whitebox_ci95": list(whitebox["robust_ci95"]),
        "square_acc": sq, "square_ci95": list(square["robust_ci95"]),
        "transfer_acc": tr, "transfer_ci95": list(transfer["robust_ci95"]),
        "n": whitebox["n"], "tol": tol, "broken_only_by_square": only_square,
        "broken_only_by_transfer": only_transfer,
    }
    if ensemble is not None and ensemble.get("per_attack"):
        after = {row["attack"]: row["success"] for row in ensemble["per_attack"]
                 if not row["attack"].startswith("apgd")}
        values["ensemble_breaks_after_apgd"] = after
        values["ensemble_n"] = ensemble["n"]
        summary += (f"; in the main run (n = {ensemble['n']}) "
                    + ", ".join(f"{name} broke {k}" for name, k in after.items())
                    + " the APGD attacks had left")
    return CheckResult("whitebox_vs_blackbox", "white-box <= black-box (Square) and <= transfer", passed, summary,
                       values)


def check_more_iterations(short: Report, long: Report, max_change: float = 0.01) -> CheckResult:
    """(d) Doubling the attack iterations neither lowers robust accuracy by ``max_change`` (one
    point) or more, nor raises it beyond noise.

    A drop means the shorter attack had not converged, so the figure it gave is too high. A
    rise alone is what a different APGD step-size schedule gives a few borderline examples; it
    fails only when the paired 95% interval of the change (:func:`paired_difference_ci`) lies
    wholly above zero, i.e. the longer attack is reliably weaker, which points at unreliable
    (masked) gradients.
    """
    _same_examples([short, long])
    flags_s, flags_l = robust_flags(short), robust_flags(long)
    order = sorted(flags_s)
    diff = long["robust_acc"] - short["robust_acc"]
    lo, hi = paired_difference_ci([flags_s[i] for i in order], [flags_l[i] for i in order])
    steps_s, steps_l = attack_settings(short).get("steps"), attack_settings(long).get("steps")
    lowered = diff <= -max_change + 1e-12
    raised = lo > 0
    passed = not (lowered or raised)
    verdict = ("the longer attack lowers it: not converged" if lowered
               else "the longer attack is reliably weaker: unreliable gradients" if raised
               else "a rise within noise" if diff > 0 else "stable")
    summary = (f"{steps_s} -> {steps_l} steps: {_pct(short['robust_acc'])} -> {_pct(long['robust_acc'])}, "
               f"change {100 * diff:+.1f} points (paired 95% CI {100 * lo:+.1f} to {100 * hi:+.1f}), "
               f"n = {short['n']}; {verdict} (needs a drop of less than {100 * max_change:g} point(s) "
               f"and no rise beyond noise)")
    title = (f"doubling the iterations neither lowers robust accuracy by >= {100 * max_change:g} point(s) "
             "nor raises it beyond noise")
    return CheckResult("more_iterations", title, passed,
                       summary, {"steps": [steps_s, steps_l], "robust_acc": [short["robust_acc"], long["robust_acc"]],
                                 "robust_ci95": [list(short["robust_ci95"]), list(long["robust_ci95"])],
                                 "change": diff, "change_ci95": [lo, hi], "n": short["n"],
                                 "max_change": max_change, "lowered": lowered, "raised": raised})


def all_passed(checks: Sequence[CheckResult]) -> bool:
    """Whether every check passed (True for none)."""
    return all(c.passed for c in checks)
