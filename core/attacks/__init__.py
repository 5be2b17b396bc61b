"""Adversarial attacks on any module mapping NCHW images in [0, 1] to logits.

PGD and APGD (Croce & Hein 2020) with CE, DLR and targeted-DLR losses, the gradient-free
Square attack (Andriushchenko et al. 2020), l-inf and l2, an AutoAttack-style ensemble, and
the threshold-flip attack on defenses that binarise their input (l-inf). Attacks are step
generators: one :class:`AttackStep` per iteration (for live plots), and the finished
:class:`AttackResult` as the generator's return value; :func:`run_to_end` drives any of
them to it. The torchattacks-shaped classes (:class:`APGD`, :class:`PGD`, :class:`Square`,
:class:`APGDT`, :class:`Flip`) wrap them. Every returned example is validated (inside the
eps ball, inside [0, 1], finite) and re-checked after rounding to 8 bits, as it would be
saved.

Modules: :mod:`.base` (settings, records, losses, projection, 8-bit rounding),
:mod:`.apgd` (APGD, PGD), :mod:`.square`, :mod:`.flip`, :mod:`.run` (:func:`attack` and
the app's :func:`attack_session`), :mod:`.ensemble`, :mod:`.api` (torchattacks shape).
"""
from ..runtime import run_to_end
from .api import APGD, APGDT, PGD, Attack, Flip, Square
from .apgd import apgd_checkpoints, gradient_attack
from .base import (ATTACK_REVISION, LOSSES, METHODS, NORMS, AttackCancelled, AttackResult, AttackSettings, AttackStep, Cancelled,
                   NonFiniteGradientError, attack_loss, check_attack_input, check_cancelled, finalize, margin_of, project, quantize_in_ball,
                   stops_when_cancelled)
from .ensemble import (ENSEMBLE_LABELS, EnsembleMember, EnsembleResult, EnsembleStep, ensemble_attack,
                       standard_ensemble)
from .flip import flip_attack, flippable_pixels
from .run import DefenseOutcome, attack, attack_session
from .square import SQUARE_CHECKPOINTS, _pyramid, square_attack, square_fraction, square_side

__all__ = [
    "APGD", "APGDT", "PGD", "Square", "Flip", "Attack", "flip_attack", "flippable_pixels", "run_to_end",
    "apgd_checkpoints", "gradient_attack", "LOSSES",
    "METHODS", "NORMS", "AttackCancelled", "AttackResult", "AttackSettings", "AttackStep", "Cancelled",
    "NonFiniteGradientError", "ATTACK_REVISION",
    "attack_loss", "check_attack_input", "check_cancelled", "finalize", "margin_of", "project", "quantize_in_ball",
    "stops_when_cancelled", "ENSEMBLE_LABELS", "EnsembleMember", "EnsembleResult", "EnsembleStep",
    "ensemble_attack", "standard_ensemble", "DefenseOutcome", "attack", "attack_session", "SQUARE_CHECKPOINTS",
    "square_attack", "square_fraction", "square_side",
]
