"""The names the engine accepts for defenses, attacks and settings (no torch import).

Front ends build their menus and command-line choices from these; the CLI reads them
before parsing, so ``rdc --help`` answers without importing torch.
"""
from __future__ import annotations

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
