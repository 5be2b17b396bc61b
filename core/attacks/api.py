"""The attacks in the shape torchattacks and AutoAttack users know.

``APGD(model, norm="Linf", eps=8/255, steps=10)(images, labels)`` returns adversarial
images. Unlike torchattacks, the images returned are rounded to 8 bits inside the eps
ball and validated (what would be saved); the full record, with per-example success and
distances, is in ``last_result``. Each class is a thin layer over the step generators
(:meth:`Attack.steps`), which the desktop app streams for live plots.
"""
from __future__ import annotations

from typing import Generator

import torch
from torch import nn

from ..runtime import run_to_end
from .base import NORMS, AttackResult, AttackSettings, AttackStep, Cancelled
from .ensemble import EnsembleMember, EnsembleResult, EnsembleStep, ensemble_attack
from .run import attack


def _norm(name: str) -> str:
    """``Linf``/``L2`` (torchattacks' spelling) or ``linf``/``l2``."""
    norm = name.lower()
    if norm not in NORMS:
        raise ValueError(f"norm must be Linf or L2, not {name!r}")
    return norm


class Attack:
    """An attack on ``model`` with fixed settings; call it on (images, labels).

    Parameters
    ----------
    model
        Any module mapping NCHW images in [0, 1] to logits.
    settings
        The threat model and budget.
    """

    def __init__(self, model: nn.Module, settings: AttackSettings) -> None:
        self.model = model
        self.settings = settings
        self.last_result: AttackResult | EnsembleResult | None = None

    def steps(self, images: torch.Tensor, labels: torch.Tensor | None = None, cancelled: Cancelled | None = None,
              example_ids: list[int] | None = None) -> Generator[AttackStep, None, AttackResult | None]:
        """The step generator: one :class:`AttackStep` per iteration, then the result."""
        return attack(self.model, images, labels, self.settings, cancelled, example_ids)

    def run(self, images: torch.Tensor, labels: torch.Tensor | None = None,
            example_ids: list[int] | None = None) -> AttackResult | EnsembleResult:
        """Run to the end and return the full result (also kept in ``last_result``)."""
        self.last_result = run_to_end(self.steps(images, labels, example_ids=example_ids))
        return self.last_result

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The adversarial images (8-bit, validated). APGD, PGD, Square and Flip return their
        last iterate for unbroken examples too; APGDT (a worst case over target classes)
        returns the clean image where no target broke it."""
        return self.run(images, labels).adversarial

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.forward(images, labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"


class APGD(Attack):
    """APGD (Croce & Hein 2020) with the ``ce`` or ``dlr`` loss."""

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, seed: int = 0, loss: str = "ce", eot_iter: int = 1) -> None:
        super().__init__(model, AttackSettings(method="apgd", loss=loss, norm=_norm(norm), eps=eps, steps=steps,
                                               restarts=n_restarts, eot=eot_iter, seed=seed))


class PGD(Attack):
    """PGD with a fixed step size ``alpha`` (default 2.5 * eps / steps) and a random start."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None, steps: int = 10,
                 random_start: bool = True, norm: str = "Linf", loss: str = "ce", seed: int = 0,
                 eot_iter: int = 1) -> None:
        super().__init__(model, AttackSettings(method="pgd", loss=loss, norm=_norm(norm), eps=eps, steps=steps,
                                               step_size=alpha, random_start=random_start, eot=eot_iter, seed=seed))


class Square(Attack):
    """The gradient-free Square attack (Andriushchenko et al. 2020), margin loss."""

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 8 / 255, n_queries: int = 5000,
                 n_restarts: int = 1, p_init: float = 0.8, seed: int = 0, eot_iter: int = 1) -> None:
        super().__init__(model, AttackSettings(method="square", norm=_norm(norm), eps=eps, steps=n_queries,
                                               restarts=n_restarts, p_init=p_init, eot=eot_iter, seed=seed))


class Flip(Attack):
    """The threshold-flip attack (l-inf) on a defense that binarises its input at ``threshold``
    (:func:`core.attacks.flip.flip_attack`): greedy flips of the pixels eps can carry across it."""

    def __init__(self, model: nn.Module, eps: float = 0.3, threshold: float = 0.5, steps: int = 100,
                 n_restarts: int = 1, seed: int = 0) -> None:
        super().__init__(model, AttackSettings(method="flip", norm="linf", eps=eps, steps=steps,
                                               restarts=n_restarts, seed=seed, threshold=threshold))


class APGDT(Attack):
    """Targeted APGD with the targeted-DLR loss, run once per runner-up class
    (``n_target_classes`` of them), each on the examples still unbroken (AutoAttack's APGD-T)."""

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, seed: int = 0, n_target_classes: int = 9, eot_iter: int = 1) -> None:
        super().__init__(model, AttackSettings(method="apgd", loss="dlr-targeted", norm=_norm(norm), eps=eps,
                                               steps=steps, restarts=n_restarts, eot=eot_iter, seed=seed))
        self.n_target_classes = n_target_classes

    def steps(self, images: torch.Tensor, labels: torch.Tensor | None = None, cancelled: Cancelled | None = None,
              example_ids: list[int] | None = None) -> Generator[EnsembleStep, None, EnsembleResult | None]:
        """One :class:`EnsembleStep` for the targeted runs, then the :class:`EnsembleResult`."""
        if labels is None:
            with torch.no_grad():
                labels = self.model(images.detach()).argmax(1)
        member = EnsembleMember("apgd-t", self.settings, targets=self.n_target_classes)
        return ensemble_attack(self.model, images, labels, [member], example_ids, cancelled=cancelled)
