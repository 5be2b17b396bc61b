"""The RDC paper's settings as named presets (no torch import).

A preset fixes the classifier's quadrature (noise levels, weighting, grid, pixel
reduction, randomness) and the likelihood maximisation (steps, noise levels, budget,
optimiser) as one source describes them. It sits between a model card's defaults and
explicit options: card < preset < options (``--levels 8 --preset paper`` is the paper's
classifier with 8 levels). The name is recorded in the settings (``preset``), so
reports, sessions and cards say which preset a run started from.

The paper's description and the released code differ, so there are two presets, each
with its source, and a third one for interactive use:

``paper``
    Chen et al., "Robust Classification via a Single Diffusion Model", ICML 2024:
    Sec. 3 (the diffusion classifier: Bayes' rule over the class-conditional weighted
    diffusion losses, the same noise for every class) and Algorithm 1 (likelihood
    maximisation: N projected steps on the unconditional diffusion loss, one noise level
    and noise draw per step, inside the l-inf ball of radius eta, momentum m <- mu m +
    g / ||g||_1 and a signed step of size gamma), with the CIFAR-10 values of its
    experiments: eta = 8/255, N = 5, sigma ~ U[0.4, 0.6], about 125 noise levels per
    class. The classifier's weighting is EDM's training weighting lambda(sigma) p(sigma)
    (the pre-trained EDM models the paper uses), as an equal-mass quantile grid over
    EDM's sigma range [0.002, 80], which turns the expectation into a plain average.
    gamma and mu are not restated in the paper's main text as numbers we could check;
    the preset uses gamma = 0.1 in the network's [-1, 1] units (0.05 in pixel units,
    the released code's step) and mu = 1 (MI-FGSM's decay factor, which Algorithm 1's
    update follows).

``paper-code``
    The released code, github.com/huanranchen/DiffusionClassifier (commit 8a82504), as
    its CIFAR-10 RDC demo ``RDCN+TK.py`` runs it:
    ``defenses/PurificationDefenses/DiffPure/DiffusionClassifier/EDMDC.py``
    (``EDMEulerIntegralDC``: 125 levels, the left Euler sum over
    ``torch.linspace(1e-4, 3, 126)``, weights lambda(sigma) p(sigma) d sigma, the squared
    error averaged over pixels, the same noise for every class) and
    ``defenses/PurificationDefenses/DiffPure/LikelihoodMaximization/EDMLM.py``
    (``likelihood_maximization_T1``: 5 Adam steps with learning rate 0.1 in [-1, 1]
    units, one sigma ~ U[0.4, 0.6] per step). The demo's RDC is deterministic: the
    purification reseeds every global generator with 1 (``utils/seed.py``), and the
    classifier's shared-noise seed is then drawn from the reseeded ``random`` module.
    Two bugs of that code are fixed, not copied:

    * its log-normal density ``exp(-(ln s - P_mean)^2 / 2 * P_std^2)`` multiplies by
      ``P_std^2`` where it must divide (operator precedence); the preset's weights use
      the correct density (:func:`core.diffusion.log_weight_density`);
    * its purification clamps to an l2 ball of radius ``eps * 2 = 200`` in [-1, 1] units
      (100 in pixel units) that never binds (5 Adam steps of 0.1 move an image by at
      most 0.5 * sqrt(3072) / 2 = 13.9 in pixel units), so the code has no working
      budget and clips to [0, 1] only at the end. The preset projects every step onto
      the method's l-inf ball of radius eta = 8/255 (the paper's budget) and onto [0, 1].

    What remains different from the code: the purification's objective is weighted by
    lambda(sigma) (the code's is the unweighted mean squared error; over sigma in
    [0.4, 0.6] lambda varies by a factor 1.5, which changes Adam's steps slightly).

``fast``
    ``paper`` with 16 noise levels instead of 125: about 8x cheaper, for interactive use
    on a CPU. Not the paper's setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_PAPER_CLASSIFIER: dict[str, Any] = {
    "steps": 125, "grid": "quantile", "weighting": "edm", "sigma_min": 0.002, "sigma_max": 80.0,
    "reduction": "sum", "mode": "deterministic", "screen_levels": 0, "keep_classes": 0,
}
_PAPER_PURIFY: dict[str, Any] = {
    "eta": 8 / 255, "steps": 5, "step_size": 0.05, "optimizer": "sign", "momentum": 1.0,
    "sigma_lo": 0.4, "sigma_hi": 0.6, "score": "uncond", "mode": "deterministic",
}


@dataclass(frozen=True)
class Preset:
    """A named set of classifier and purification settings and where they come from."""

    name: str
    description: str
    source: str
    classifier: dict[str, Any] = field(default_factory=dict)  # ClassifierSettings fields
    purify: dict[str, Any] = field(default_factory=dict)  # PurifySettings fields

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "classifier": dict(self.classifier), "purify": dict(self.purify)}


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        description="the RDC paper's method: 125 levels of EDM's training weighting (equal-mass grid), "
                    "5 signed momentum steps in the l-inf ball eta = 8/255",
        source="Chen et al., ICML 2024, Sec. 3 and Algorithm 1; CIFAR-10 values of Sec. 4",
        classifier=dict(_PAPER_CLASSIFIER),
        purify=dict(_PAPER_PURIFY),
    ),
    "paper-code": Preset(
        name="paper-code",
        description="the released code's RDC: 125-level Euler sum over sigma in [1e-4, 3], pixel-mean "
                    "errors, 5 Adam steps (lr 0.1 in [-1, 1] units); its P_std bug fixed and its "
                    "never-binding l2 clamp replaced by the l-inf ball eta = 8/255",
        source="github.com/huanranchen/DiffusionClassifier @8a82504: RDCN+TK.py; "
               "defenses/PurificationDefenses/DiffPure/DiffusionClassifier/EDMDC.py (EDMEulerIntegralDC); "
               "defenses/PurificationDefenses/DiffPure/LikelihoodMaximization/EDMLM.py "
               "(likelihood_maximization_T1)",
        classifier={"steps": 125, "grid": "uniform", "weighting": "edm", "sigma_min": 1e-4, "sigma_max": 3.0,
                    "reduction": "mean", "mode": "deterministic", "screen_levels": 0, "keep_classes": 0},
        purify={"eta": 8 / 255, "steps": 5, "step_size": 0.05, "optimizer": "adam", "momentum": 0.0,
                "sigma_lo": 0.4, "sigma_hi": 0.6, "score": "uncond", "mode": "deterministic"},
    ),
    "fast": Preset(
        name="fast",
        description="the paper preset with 16 noise levels instead of 125 (interactive use; not the "
                    "paper's setting)",
        source="derived from 'paper' (Chen et al., ICML 2024) with T = 16",
        classifier={**_PAPER_CLASSIFIER, "steps": 16},
        purify=dict(_PAPER_PURIFY),
    ),
}

def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
