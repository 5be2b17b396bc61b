"""PGD and APGD (Croce & Hein 2020) with CE, DLR and targeted-DLR losses, l-inf and l2.

Attacks are generators: one :class:`AttackStep` per iteration (for live plots), then
the finished :class:`AttackResult` is available as the generator's return value and via
:func:`run_attack`. Every returned example is validated (inside the eps ball, inside
[0, 1], finite) and re-checked after rounding to 8 bits, as it would be saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr", "dlr-targeted")


@dataclass
class AttackSettings:
    """Threat model and budget (eps in [0, 1] pixel units)."""

    method: str = "apgd"  # "apgd" or "pgd"
    loss: str = "ce"
    norm: str = "linf"
    eps: float = 0.3
    steps: int = 100
    step_size: float | None = None  # PGD only; default 2.5 * eps / steps
    restarts: int = 1
    random_start: bool = True
    eot: int = 1  # gradient draws averaged per step (randomized defenses)
    target: int | None = None  # targeted-DLR: target class (None: the runner-up, per example)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("apgd", "pgd"):
            raise ValueError("method must be 'apgd' or 'pgd'")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}")
        if self.eps < 0 or self.steps < 1 or self.restarts < 1 or self.eot < 1:
            raise ValueError("need eps >= 0, steps >= 1, restarts >= 1, eot >= 1")


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
    queries: int
    checks: dict = field(default_factory=dict)


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


def quantize_in_ball(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Round to the 8-bit grid without leaving the eps ball (x0 assumed 8-bit)."""
    q = torch.round(x * 255) / 255
    if norm == "linf":
        lo = torch.ceil((x0 - eps) * 255 - 1e-6) / 255
        hi = torch.floor((x0 + eps) * 255 + 1e-6) / 255
        q = torch.minimum(torch.maximum(q, lo), hi)
    else:
        x0q = torch.round(x0 * 255) / 255
        for _ in range(8):  # shrink the rounding toward x0 until it fits
            over = (q - x0q).flatten(1).norm(dim=1) > eps + 1e-6
            if not over.any():
                break
            q[over] = torch.round((x0q[over] + 0.98 * (q[over] - x0q[over])) * 255) / 255
    return q.clamp(0.0, 1.0)


def _normalized(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return g.sign()
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


def _random_start(x0: torch.Tensor, eps: float, norm: str, seeds: list[int]) -> torch.Tensor:
    """Uniform start in the ball, drawn per example from its own seed, so an example's
    attack does not depend on which other examples share its batch (or shard)."""
    rs = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        if norm == "linf":
            r = (torch.rand(x0.shape[1:], generator=gen) * 2 - 1) * eps
        else:
            r = torch.randn(x0.shape[1:], generator=gen)
            r = r / r.norm().clamp_min(1e-12) * eps * torch.rand((), generator=gen)
        rs.append(r)
    return project(x0 + torch.stack(rs).to(x0), x0, eps, norm)


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step size (Croce & Hein 2020, sec. 3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({int(math.ceil(v * steps - 1e-9)) for v in p if v <= 1})


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, settings: AttackSettings,
           cancelled: Callable[[], bool] = lambda: False, example_ids: list[int] | None = None) -> Iterator[AttackStep]:
    """Run the attack, yielding a record per iteration; returns an :class:`AttackResult`.

    ``y`` None attacks the model's own clean predictions. ``example_ids`` (default
    0..N-1) seed each example's random starts, so results do not depend on batching.
    """
    s = settings
    x0 = x.detach()
    ids = list(range(x0.shape[0])) if example_ids is None else [int(i) for i in example_ids]
    queries = 0
    with torch.no_grad():
        clean_logits = model(x0)
        queries += 1
    if y is None:
        y = clean_logits.argmax(1)
    clean_correct = clean_logits.argmax(1) == y
    if s.loss == "dlr-targeted":
        if s.target is not None:
            target = torch.full_like(y, s.target)
        else:
            masked = clean_logits.clone()
            masked.scatter_(1, y[:, None], -float("inf"))
            target = masked.argmax(1)
    else:
        target = None
    best_adv = x0.clone()
    best_margin = margin_of(clean_logits, y)
    step_size0 = s.step_size if s.step_size is not None else (2.5 * s.eps / s.steps if s.method == "pgd" else 2 * s.eps)

    def loss_and_grad(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal queries
        grad = torch.zeros_like(z)
        losses, logits_sum = 0.0, 0.0
        for _ in range(s.eot):
            zz = z.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(zz)
                loss = attack_loss(logits, y, s.loss, target)
                (g,) = torch.autograd.grad(loss.sum(), zz)
            queries += 1
            grad += g
            losses = losses + loss.detach()
            logits_sum = logits_sum + logits.detach()
        return losses / s.eot, grad / s.eot, logits_sum / s.eot

    for restart in range(s.restarts):
        seeds = [(s.seed * 1_000_003 + i) * 101 + restart for i in ids]
        cur = _random_start(x0, s.eps, s.norm, seeds) if s.random_start else x0.clone()
        loss, grad, logits = loss_and_grad(cur)
        n = x0.shape[0]
        eta = torch.full((n,), float(step_size0), device=x0.device)
        view = (-1,) + (1,) * (x0.dim() - 1)
        best_loss, x_best_loss = loss.clone(), cur.clone()
        prev = cur.clone()
        checkpoints = apgd_checkpoints(s.steps)
        last_ck, improved_count = 0, torch.zeros(n, device=x0.device)
        loss_at_last_ck = best_loss.clone()
        eta_reduced_last = torch.zeros(n, dtype=torch.bool, device=x0.device)
        for it in range(1, s.steps + 1):
            if cancelled():
                return None
            direction = _normalized(grad, s.norm)
            if s.method == "pgd":
                nxt = project(cur + s.step_size * direction if s.step_size else cur + eta.view(view) * direction,
                              x0, s.eps, s.norm)
            else:
                z = project(cur + eta.view(view) * direction, x0, s.eps, s.norm)
                alpha = 1.0 if it == 1 else 0.75
                nxt = project(cur + alpha * (z - cur) + (1 - alpha) * (cur - prev), x0, s.eps, s.norm)
            prev, cur = cur, nxt
            loss, grad, logits = loss_and_grad(cur)
            m = margin_of(logits, y)
            better = m < best_margin
            best_margin = torch.where(better, m, best_margin)
            best_adv[better] = cur[better]
            improved = loss > best_loss
            improved_count += improved.float()
            x_best_loss[improved] = cur[improved]
            best_loss = torch.where(improved, loss, best_loss)
            if s.method == "apgd" and it in checkpoints:
                span = it - last_ck
                cond1 = improved_count < 0.75 * span
                cond2 = (~eta_reduced_last) & (loss_at_last_ck >= best_loss)
                reduce = cond1 | cond2
                eta = torch.where(reduce, eta / 2, eta)
                if reduce.any():
                    cur[reduce] = x_best_loss[reduce]
                    prev[reduce] = x_best_loss[reduce]
                    loss_r, grad_r, _ = loss_and_grad(cur)
                    grad = torch.where(reduce.view(view), grad_r, grad)
                eta_reduced_last = reduce
                loss_at_last_ck = best_loss.clone()
                improved_count.zero_()
                last_ck = it
            d = (cur - x0).flatten(1)
            yield AttackStep(restart, it, s.steps, loss.cpu().numpy().copy(), m.cpu().numpy().copy(),
                             logits.argmax(1).cpu().numpy().copy(), d.abs().amax(1).cpu().numpy().copy(),
                             d.norm(dim=1).cpu().numpy().copy(), cur.detach().cpu().numpy().copy(),
                             eta.cpu().numpy().copy())
    return finalize(model, x0, y, best_adv, s, clean_correct, queries)


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


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings,
               on_step: Callable[[AttackStep], None] | None = None,
               example_ids: list[int] | None = None) -> AttackResult:
    """Drive :func:`attack` to the end and return its result."""
    gen = attack(model, x, y, settings, example_ids=example_ids)
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_step is not None:
            on_step(step)


def attack_records(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, settings: AttackSettings,
                   cancelled: Callable[[], bool] = lambda: False) -> Iterator[AttackStep | AttackResult]:
    """Like :func:`attack`, but the final :class:`AttackResult` is yielded as the last record
    (for consumers that only iterate, such as the GUI's job runner)."""
    gen = attack(model, x, y, settings, cancelled)
    while True:
        try:
            yield next(gen)
        except StopIteration as stop:
            if stop.value is not None:
                yield stop.value
            return


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
                   cancelled: Callable[[], bool] = lambda: False):
    """Attack ``model``, then judge the result with the full ``defense`` (default: ``model``).

    Yields the attack's :class:`AttackStep` records, its :class:`AttackResult`, then a
    :class:`DefenseOutcome` (with the purified adversarial image when ``purify`` is given).
    """
    result = None
    for rec in attack_records(model, x, y, settings, cancelled):
        if isinstance(rec, AttackResult):
            result = rec
        yield rec
    if result is None or cancelled():
        return
    defense = defense or model
    adv = result.adversarial
    with torch.no_grad():
        attacked_pred = model(adv).argmax(1)
        probs = torch.softmax(defense(adv), dim=1)
        purified = purify(adv) if purify is not None else None
    yield DefenseOutcome(
        clean=x.detach().cpu().numpy().copy(), adversarial=adv.cpu().numpy().copy(),
        purified=None if purified is None else purified.cpu().numpy().copy(),
        labels=result.labels.cpu().numpy().copy(), attacked_prediction=attacked_pred.cpu().numpy().copy(),
        defense_probabilities=probs.cpu().numpy().copy(),
        attack_succeeded=(attacked_pred != result.labels).cpu().numpy().copy(),
        defense_recovered=(probs.argmax(1) == result.labels).cpu().numpy().copy(),
        linf=result.linf.cpu().numpy().copy(), l2=result.l2.cpu().numpy().copy())
