"""The names the engine accepts for defenses, attacks and settings, and the checks of
numeric settings (no torch import).

Front ends build their menus and command-line choices from these; the CLI reads them
before parsing, so ``rdc --help`` answers without importing torch.
"""
from __future__ import annotations

import math
import numbers

DATASETS = ("mnist", "cifar10")
DEFENSES = ("cnn", "dc", "rdc")
GRAD_MODES = ("auto", "exact", "smooth", "bpda")
"""Gradient modes of an attacked RDC a user chooses from (``dc-only`` is internal)."""
NORMS = ("linf", "l2")
OPTIMIZERS = ("sign", "adam")
WEIGHTINGS = ("elbo", "edm")
GRIDS = ("quantile", "log", "uniform")
"""Placements of the classifier's noise levels (:func:`core.diffusion.noise_grid`)."""
CLASSIFIER_MODES = ("deterministic", "randomized")
SAMPLER_CHURN_RANGE = (0.05, 50.0)
"""Noise levels at which the EDM sampler's churn adds fresh noise (EDM's S_tmin, S_tmax)."""
PRESETS = ("paper", "paper-code", "fast")
"""Named settings of :mod:`core.presets` (the RDC paper's, the released code's, a fast one)."""

NAMED_ATTACKS = {"apgd-ce": ("apgd", "ce"), "apgd-dlr": ("apgd", "dlr"), "apgd-t": ("apgd", "dlr-targeted"),
                 "pgd": ("pgd", "ce"), "square": ("square", "margin"), "flip": ("flip", "margin")}
"""Single attacks by name: (method, loss) of :class:`core.attacks.AttackSettings` (``flip``: only
against a defense that binarises its input, ``--binarize``)."""
EVAL_ATTACKS = ("none", "ensemble", "transfer") + tuple(sorted(NAMED_ATTACKS))
"""What an evaluation can run: nothing (clean accuracy), the ensemble, its transfer attack alone, or one attack."""


def whole_number(name: str, value: object, lo: int = 0, hi: int | None = None) -> int:
    """``value`` as a plain ``int`` when it is a whole number (numpy's too; never a bool) in
    ``lo``..``hi`` (no upper bound when ``hi`` is None).

    Raises
    ------
    ValueError
        "NAME must be a whole number in LO-HI, not VALUE" (or "of at least LO").
    """
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo
            or (hi is not None and value > hi)):
        bounds = f"of at least {lo}" if hi is None else f"in {lo}-{hi}"
        raise ValueError(f"{name} must be a whole number {bounds}, not {value!r:.60}")
    return int(value)


def real_number(name: str, value: object, lo: float = 0.0, hi: float = math.inf, *, above: bool = False) -> float:
    """``value`` as a plain ``float`` when it is a finite number (never a bool) of at least
    ``lo`` (above ``lo`` when ``above``) and at most ``hi``.

    Raises
    ------
    ValueError
        "NAME must be a positive number, not VALUE" (or "a number of at least LO", "a number
        in LO-HI", ...).
    """
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > lo if above else value >= lo) and value <= hi)
    if not ok:
        if above and lo == 0 and hi == math.inf:
            what = "a positive number"
        elif hi == math.inf:
            what = f"a number {'above' if above else 'of at least'} {lo:g}"
        else:
            what = f"a number {'above' if above else 'from'} {lo:g} {'and at most' if above else 'to'} {hi:g}"
        raise ValueError(f"{name} must be {what}, not {value!r:.60}")
    return float(value)


def parse_fraction(text: str | float) -> float:
    """A number in [0, 1] pixel units written as ``0.3`` or ``8/255`` (numbers pass through).

    Raises
    ------
    ValueError
        When ``text`` is neither a number nor a fraction of two numbers, or is not finite.
    """
    try:
        if isinstance(text, (int, float)):
            value = float(text)
        elif "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number or a fraction such as 8/255: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value
