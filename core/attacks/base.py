"""What every attack shares: threat-model settings, step and result records, losses,
projection onto the eps ball, 8-bit rounding inside the ball, per-example seeds, the
validation of returned examples, and cancellation.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import real_number, whole_number
from ..data import check_image_batch
from ..runtime import OperationCancelled, cancellation_scope

Cancelled = Callable[[], bool]
"""A zero-argument callable polled during an attack: True asks it to stop."""

R = TypeVar("R")


class AttackCancelled(OperationCancelled):
    """Raised inside an attack when its ``cancelled`` callback returns True (never escapes
    a generator decorated with :func:`stops_when_cancelled`)."""


def check_cancelled(cancelled: Cancelled | None) -> None:
    """Raise :class:`AttackCancelled` when ``cancelled`` says so (between network passes)."""
    if cancelled is not None and cancelled():
        raise AttackCancelled


def stops_when_cancelled(func: Callable[..., Generator[Any, None, R]]) -> Callable[..., Generator[Any, None, R | None]]:
    """Make a step generator return None as soon as its ``cancelled`` argument fires.

    Each resumption of the generator runs inside a :func:`core.runtime.cancellation_scope`
    of that callback, so a stop request also ends a network pass in progress (the
    diffusion classifier polls between its network calls, forward and backward), not only
    at the generator's own :func:`check_cancelled` calls.
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        cancelled = signature.bind(*args, **kwargs).arguments.get("cancelled")
        steps = func(*args, **kwargs)
        try:
            while True:
                with cancellation_scope(cancelled):  # around synchronous work only, not the yield
                    try:
                        record = next(steps)
                    except StopIteration as stop:
                        return stop.value
                yield record
        except OperationCancelled:
            return None
        finally:
            steps.close()

    return wrapper


ATTACK_REVISION = 2
"""Revision of the attacks' algorithms, recorded in evaluation reports. 2 (2026-12-06): l2
8-bit rounding that moves only the pixels it must, AutoAttack's step-size rule and l2
random start in APGD, adversarial starts count, NaN gradients are errors, APGD-T alone
tries all its target classes. Reports without it were made by revision 1."""


class NonFiniteGradientError(RuntimeError):
    """The attacked model's loss or gradient is NaN or infinite: a gradient attack cannot
    follow it, and the examples it stalls on would pass for robust."""


NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr", "dlr-targeted", "margin")
METHODS = ("apgd", "pgd", "square", "flip")


@dataclass
class AttackSettings:
    """Threat model and budget (eps in [0, 1] pixel units).

    ``method`` "square" is gradient-free: ``steps`` is its number of iterations (one query
    of the model each), ``p_init`` the initial fraction of pixels changed per iteration, and
    it always minimises the margin loss (``loss`` "ce", the default, becomes "margin").
    ``method`` "flip" (:func:`core.attacks.flip.flip_attack`, l-inf only) attacks a defense
    that binarises its input at ``threshold``: ``steps`` is its number of iterations, and it
    minimises the margin loss too.
    """

    method: str = "apgd"  # "apgd", "pgd", "square" or "flip"
    loss: str = "ce"
    norm: str = "linf"
    eps: float = 0.3
    steps: int = 100
    step_size: float | None = None  # PGD only; default 2.5 * eps / steps
    restarts: int = 1
    random_start: bool = True
    eot: int = 1  # gradient draws averaged per step (randomized defenses)
    target: int | None = None  # targeted-DLR: target class (None: ranked by target_rank, per example)
    seed: int = 0
    p_init: float = 0.8  # Square: initial fraction of pixels in the square (AutoAttack's standard value)
    target_rank: int = 1  # targeted-DLR without ``target``: 1 = runner-up class, 2 = third-ranked, ...
    threshold: float = 0.5  # flip only: the binarisation threshold of the attacked defense

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}")
        self.eps = real_number("eps", self.eps, 0)
        for name in ("steps", "restarts", "eot"):
            setattr(self, name, whole_number(name, getattr(self, name), 1, 10**7))
        if self.step_size is not None:
            self.step_size = real_number("the step size", self.step_size, above=True)
        self.seed = whole_number("seed", self.seed, -2**63, 2**64 - 1)  # what torch.manual_seed takes
        self.p_init = real_number("p_init", self.p_init, 0, 1, above=True)
        self.target_rank = whole_number("target_rank", self.target_rank, 1)
        if self.target is not None:
            self.target = whole_number("target", self.target, 0)
        self.threshold = real_number("threshold", self.threshold, 0, 1)
        if self.norm == "linf" and self.eps > 1:  # most likely grey levels meant as 8/255
            raise ValueError(f"an l-inf eps of {self.eps:g} exceeds the whole pixel range [0, 1]; "
                             f"write grey levels as a fraction, e.g. {self.eps:g}/255")
        if self.method in ("square", "flip"):
            if self.loss not in ("ce", "margin"):
                raise ValueError(f"{self.method} is untargeted and uses the margin loss")
            self.loss = "margin"
        if self.method == "flip":
            if self.norm != "linf":
                raise ValueError("the flip attack is l-inf only (a binarised pixel flips when it crosses the "
                                 "threshold, whatever the l2 cost)")
            if not 0 < self.threshold < 1:
                raise ValueError(f"the flip attack's threshold must lie strictly between 0 and 1, "
                                 f"not {self.threshold}")

    def to_dict(self) -> dict:
        """The settings as a plain dict, without the Square, flip and target-rank fields where
        they play no part (so reports and resumable states of other attacks keep their form)."""
        d = dict(self.__dict__)
        if self.method != "square":
            d.pop("p_init")
        if self.method != "flip":
            d.pop("threshold")
        if self.target_rank == 1:
            d.pop("target_rank")
        return d


@dataclass(frozen=True)
class AttackStep:
    """One attack iteration (all arrays per example)."""

    restart: int
    iteration: int
    total_iterations: int
    loss: np.ndarray
    margin: np.ndarray  # logit of the true class minus the best other logit (< 0: misclassified)
    prediction: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    image: np.ndarray  # current iterate (N, C, H, W)
    step_size: np.ndarray


@dataclass
class AttackResult:
    """Best adversarial examples found and their validation."""

    adversarial: torch.Tensor  # 8-bit-rounded, validated, (N, C, H, W)
    labels: torch.Tensor  # (N,) the labels attacked
    success: torch.Tensor  # (N,) bool: misclassified after 8-bit rounding
    clean_correct: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    queries: int  # forward(-backward) passes of the batch
    checks: dict = field(default_factory=dict)
    example_queries: torch.Tensor | None = None  # (N,) passes per example, where they differ (Square)


def margin_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, y[:, None], -float("inf"))
    return true - other.max(1).values


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example loss to maximise."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        return -margin_of(logits, y)
    srt = logits.sort(dim=1, descending=True).values
    if loss == "dlr":
        return -margin_of(logits, y) / (srt[:, 0] - srt[:, 2] + 1e-12)
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


def project(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps ball around x0 and the [0, 1] box."""
    if norm == "linf":
        x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps)
    else:
        d = x - x0
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        x = x0 + d * torch.clamp(eps / n, max=1.0)
    return x.clamp(0.0, 1.0)


def check_attack_input(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a float batch (N, C, H, W) in [0, 1] on the 8-bit
    grid: the attacks return 8-bit images (what a PNG holds) within eps of ``x``, which
    needs ``x`` itself on the grid."""
    check_image_batch(x)
    if not torch.allclose(x * 255, torch.round(x * 255), atol=1e-3):
        raise ValueError("images must be 8-bit values (k/255): the attacks return 8-bit images within eps of them; "
                         "round them first with torch.round(x * 255) / 255")


def quantize_in_ball(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Round to the 8-bit grid without leaving the eps ball (x0 assumed 8-bit), moving ``x``
    as little as possible.

    l-inf: each pixel to its nearest level inside the ball. l2: each pixel to its nearest
    level; when that leaves the ball, the pixels that rounded away from x0 are rounded
    toward it instead, those that gain the most first, until the point fits (scaling the
    whole perturbation down instead would give away ~15% of eps on a CIFAR-sized image).
    """
    q = torch.round(x * 255) / 255
    if norm == "linf":
        lo = torch.ceil((x0 - eps) * 255 - 1e-6) / 255
        hi = torch.floor((x0 + eps) * 255 + 1e-6) / 255
        return torch.minimum(torch.maximum(q, lo), hi).clamp(0.0, 1.0)
    x0q = torch.round(x0 * 255) / 255
    q = q.clamp(0.0, 1.0)
    limit = (eps + 1e-6) ** 2
    d_near = (q - x0q).flatten(1)
    excess = (d_near ** 2).sum(1) - limit
    over = excess > 0
    if over.any():
        # every pixel's level toward x0 (truncation of the offset): never farther than the nearest
        d_in = (torch.trunc((x - x0q) * 255) / 255).flatten(1)
        d_in = (x0q.flatten(1) + d_in).clamp(0.0, 1.0) - x0q.flatten(1)
        gain = d_near ** 2 - d_in ** 2  # what switching a pixel to its inward level saves
        order = gain.argsort(dim=1, descending=True)
        saved = gain.gather(1, order).cumsum(1)
        # the fewest switches that bring the point inside (all of them always do: |d_in| <= |x - x0|)
        count = (saved < excess[:, None]).sum(1) + 1
        switch = torch.arange(d_near.shape[1], device=x.device)[None, :] < count[:, None]
        chosen = torch.zeros_like(switch).scatter(1, order, switch) & over[:, None]
        d = torch.where(chosen, d_in, d_near)
        q = (x0q.flatten(1) + d).view_as(q)
    return q.clamp(0.0, 1.0)


def _normalized(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return g.sign()
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


def _random_start(x0: torch.Tensor, eps: float, norm: str, seeds: list[int]) -> torch.Tensor:
    """A random start (l-inf: uniform in the ball; l2: uniform on the sphere), drawn per
    example from its own seed, so an example's attack does not depend on which other
    examples share its batch (or shard)."""
    rs = []
    for seed in seeds:  # see _example_seed
        gen = torch.Generator().manual_seed(seed)
        if norm == "linf":
            r = (torch.rand(x0.shape[1:], generator=gen) * 2 - 1) * eps
        else:
            r = torch.randn(x0.shape[1:], generator=gen)
            r = r / r.norm().clamp_min(1e-12) * eps  # on the sphere, as AutoAttack starts
        rs.append(r)
    return project(x0 + torch.stack(rs).to(x0), x0, eps, norm)


def _example_seed(seed: int, example_id: int, restart: int) -> int:
    """The random-number seed of one example's restart (independent of batching)."""
    return (seed * 1_000_003 + example_id) * 101 + restart


def finalize(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, s: AttackSettings,
             clean_correct: torch.Tensor, queries: int) -> AttackResult:
    """Round to 8 bits inside the ball, validate, and re-classify what would be saved."""
    adv_q = quantize_in_ball(adv.detach(), x0, s.eps, s.norm)
    # a clean-misclassified example needs no perturbation
    adv_q[~clean_correct] = x0[~clean_correct]
    d = (adv_q - x0).flatten(1)
    linf, l2 = d.abs().amax(1), d.norm(dim=1)
    tol = 1e-6
    checks = {
        "finite": bool(torch.isfinite(adv_q).all()),
        "in_box": bool((adv_q >= 0).all() and (adv_q <= 1).all()),
        "in_ball": bool(((linf if s.norm == "linf" else l2) <= s.eps + tol).all()),
        "on_8bit_grid": bool(torch.allclose(adv_q * 255, torch.round(adv_q * 255), atol=1e-4)),
    }
    if not all(checks.values()):
        raise RuntimeError(f"adversarial examples failed validation: {checks}")
    with torch.no_grad():
        pred = model(adv_q).argmax(1)
    success = (pred != y) | ~clean_correct
    return AttackResult(adv_q, y, success, clean_correct, linf, l2, queries + 1, checks)


