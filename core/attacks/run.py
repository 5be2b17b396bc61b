"""One attack by its settings (:func:`attack`), and an attack judged by the full defense
(:func:`attack_session`, the desktop app's attack)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Iterator

import numpy as np
import torch
from torch import nn

from ..runtime import OperationCancelled, cancellation_scope
from .apgd import gradient_attack
from .base import AttackResult, AttackSettings, AttackStep, Cancelled, check_attack_input
from .flip import flip_attack
from .square import square_attack


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, settings: AttackSettings,
           cancelled: Cancelled | None = None,
           example_ids: list[int] | None = None) -> Generator[AttackStep, None, AttackResult | None]:
    """Run the attack ``settings`` describe (APGD, PGD, Square or flip), yielding a record per
    iteration; returns the validated :class:`AttackResult` (None when cancelled).

    ``y`` None attacks the model's own clean predictions. ``example_ids`` (default
    0..N-1) seed each example's random draws, so results do not depend on batching.
    ``cancelled`` is polled before every pass of the model (every EOT draw) and, for a
    diffusion classifier, between its network calls, so a stop request takes effect within
    one network call. Drive it with :func:`run_to_end`, or use the
    torchattacks-shaped classes (:class:`APGD`, ...) for the adversarial images alone.
    """
    check_attack_input(x)
    x0 = x.detach()
    ids = list(range(x0.shape[0])) if example_ids is None else [int(i) for i in example_ids]
    if settings.method == "square":
        return (yield from square_attack(model, x0, y, settings, cancelled, ids))
    if settings.method == "flip":
        return (yield from flip_attack(model, x0, y, settings, cancelled, ids))
    return (yield from gradient_attack(model, x0, y, settings, cancelled, ids))


@dataclass(frozen=True)
class DefenseOutcome:
    """What the full defense makes of an attack's result (the GUI's verdict)."""

    clean: np.ndarray  # (N, C, H, W)
    adversarial: np.ndarray
    purified: np.ndarray | None  # the adversarial image after likelihood maximisation
    labels: np.ndarray
    attacked_prediction: np.ndarray  # prediction of the attacked module on the adversarial image
    defense_probabilities: np.ndarray  # full defense (purification + classifier) on the adversarial image
    attack_succeeded: np.ndarray
    defense_recovered: np.ndarray
    linf: np.ndarray
    l2: np.ndarray


def attack_session(model: nn.Module, x: torch.Tensor, settings: AttackSettings, defense: nn.Module | None = None,
                   purify: Callable[[torch.Tensor], torch.Tensor] | None = None, y: torch.Tensor | None = None,
                   cancelled: Cancelled | None = None) -> Iterator[AttackStep | AttackResult | DefenseOutcome]:
    """Attack ``model``, then judge the result with the full ``defense`` (default: ``model``).

    Yields the attack's :class:`AttackStep` records, its :class:`AttackResult`, then a
    :class:`DefenseOutcome` (with the purified adversarial image when ``purify`` is given).
    """
    result = yield from attack(model, x, y, settings, cancelled)
    if result is None:
        return
    yield result
    if cancelled is not None and cancelled():
        return
    defense = defense or model
    adv = result.adversarial
    try:
        with torch.no_grad(), cancellation_scope(cancelled):  # three full passes: stoppable inside them
            attacked_pred = model(adv).argmax(1)
            probs = torch.softmax(defense(adv), dim=1)
            purified = purify(adv) if purify is not None else None
    except OperationCancelled:
        return
    yield DefenseOutcome(
        clean=x.detach().cpu().numpy().copy(), adversarial=adv.cpu().numpy().copy(),
        purified=None if purified is None else purified.cpu().numpy().copy(),
        labels=result.labels.cpu().numpy().copy(), attacked_prediction=attacked_pred.cpu().numpy().copy(),
        defense_probabilities=probs.cpu().numpy().copy(),
        attack_succeeded=(attacked_pred != result.labels).cpu().numpy().copy(),
        defense_recovered=(probs.argmax(1) == result.labels).cpu().numpy().copy(),
        linf=result.linf.cpu().numpy().copy(), l2=result.l2.cpu().numpy().copy())
