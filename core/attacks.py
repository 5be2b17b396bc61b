"""PGD and APGD (Croce & Hein 2020) with CE, DLR and targeted-DLR losses, the gradient-free
Square attack (Andriushchenko et al. 2020), l-inf and l2, and an AutoAttack-style ensemble.

Attacks are generators: one :class:`AttackStep` per iteration (for live plots), then
the finished :class:`AttackResult` is available as the generator's return value and via
:func:`run_attack`. Every returned example is validated (inside the eps ball, inside
[0, 1], finite) and re-checked after rounding to 8 bits, as it would be saved.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Generator, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr", "dlr-targeted", "margin")
METHODS = ("apgd", "pgd", "square")


@dataclass
class AttackSettings:
    """Threat model and budget (eps in [0, 1] pixel units).

    ``method`` "square" is gradient-free: ``steps`` is its number of iterations (one query
    of the model each), ``p_init`` the initial fraction of pixels changed per iteration, and
    it always minimises the margin loss (``loss`` "ce", the default, becomes "margin").
    """

    method: str = "apgd"  # "apgd", "pgd" or "square"
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}")
        if self.eps < 0 or self.steps < 1 or self.restarts < 1 or self.eot < 1:
            raise ValueError("need eps >= 0, steps >= 1, restarts >= 1, eot >= 1")
        if not 0 < self.p_init <= 1 or self.target_rank < 1:
            raise ValueError("need 0 < p_init <= 1 and target_rank >= 1")
        if self.method == "square":
            if self.loss not in ("ce", "margin"):
                raise ValueError("square is untargeted and uses the margin loss")
            self.loss = "margin"

    def to_dict(self) -> dict:
        """The settings as a plain dict, without the Square and target-rank fields where they
        play no part (so reports and resumable states of other attacks keep their form)."""
        d = dict(self.__dict__)
        if self.method != "square":
            d.pop("p_init")
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
        over = (q - x0q).flatten(1).norm(dim=1) > eps + 1e-6
        if over.any():  # shrinking stalls on one-level steps: round every pixel toward x0 instead
            q[over] = x0q[over] + torch.trunc((x[over] - x0q[over]) * 255) / 255
    return q.clamp(0.0, 1.0)


def _normalized(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return g.sign()
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


def _random_start(x0: torch.Tensor, eps: float, norm: str, seeds: list[int]) -> torch.Tensor:
    """Uniform start in the ball, drawn per example from its own seed, so an example's
    attack does not depend on which other examples share its batch (or shard)."""
    rs = []
    for seed in seeds:  # see _example_seed
        gen = torch.Generator().manual_seed(seed)
        if norm == "linf":
            r = (torch.rand(x0.shape[1:], generator=gen) * 2 - 1) * eps
        else:
            r = torch.randn(x0.shape[1:], generator=gen)
            r = r / r.norm().clamp_min(1e-12) * eps * torch.rand((), generator=gen)
        rs.append(r)
    return project(x0 + torch.stack(rs).to(x0), x0, eps, norm)


def _example_seed(seed: int, example_id: int, restart: int) -> int:
    """The random-number seed of one example's restart (independent of batching)."""
    return (seed * 1_000_003 + example_id) * 101 + restart


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
    if s.method == "square":
        return (yield from square_attack(model, x0, y, s, cancelled, ids))
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
            if s.target_rank > clean_logits.shape[1] - 1:
                raise ValueError(f"target_rank {s.target_rank} needs more than {clean_logits.shape[1]} classes")
            masked = clean_logits.clone()
            masked.scatter_(1, y[:, None], -float("inf"))
            target = masked.argmax(1) if s.target_rank == 1 else masked.topk(s.target_rank, dim=1).indices[:, -1]
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
        seeds = [_example_seed(s.seed, i, restart) for i in ids]
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


# --- Square attack (Andriushchenko et al. 2020) ---------------------------------------

SQUARE_CHECKPOINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of the paper's 10 000 iterations


def square_fraction(p_init: float, iteration: int, total: int) -> float:
    """Fraction of the pixels the square covers at ``iteration`` of ``total``.

    The paper halves ``p_init`` at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
    and 8000 of a 10 000-iteration run; the checkpoints are rescaled to ``total``.
    """
    scaled = int(iteration * 10_000 / max(1, total))
    return p_init / 2 ** sum(scaled > c for c in SQUARE_CHECKPOINTS)


def square_side(p: float, height: int, width: int, minimum: int = 1) -> int:
    """Side (pixels) of a square covering a fraction ``p`` of a ``height`` x ``width`` image."""
    side = int(round(math.sqrt(p * height * width)))
    return max(min(minimum, height, width), min(side, height, width))


@lru_cache(maxsize=64)
def _pyramid(h: int) -> torch.Tensor:
    """The paper's l2 update pattern (its eq. 2), unit l2 norm: concentric square rings,
    eta(r, s) = sum_{k=0}^{M(r, s)} 1 / (n + 1 - k)^2 with n = h // 2 and M growing
    from 0 on the border to n at the centre. (Cached: do not modify.)"""
    n = h // 2
    pos = torch.arange(1, h + 1, dtype=torch.float64)
    ring = torch.maximum((pos[:, None] - n - 1).abs(), (pos[None, :] - n - 1).abs())
    depth = (n - ring).long()
    sums = torch.cumsum(1.0 / (n + 1 - torch.arange(n + 1, dtype=torch.float64)) ** 2, 0)
    eta = sums[depth]
    return (eta / eta.norm()).float()


def _signs(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def _grid_box(x0: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest 8-bit values within eps of x0 (x0 assumed 8-bit), in [0, 1]."""
    lo = torch.ceil((x0 - eps) * 255 - 1e-6) / 255
    hi = torch.floor((x0 + eps) * 255 + 1e-6) / 255
    return lo.clamp(0.0, 1.0), hi.clamp(0.0, 1.0)


def _square_init(x0: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: float, norm: str,
                 gen: torch.Generator) -> torch.Tensor:
    """Starting point for one example (C, H, W): vertical stripes of -eps / +eps (l-inf: the
    8-bit values ``lo`` / ``hi``), or a grid of pyramid patterns with random signs scaled to
    l2 norm eps (l2)."""
    c, h, w = x0.shape
    if norm == "linf":
        return torch.where(_signs((c, 1, w), gen) > 0, hi, lo)
    tile = max(1, min(h, w) // 5)
    delta = torch.zeros_like(x0)
    for r in range(0, h, tile):
        for s in range(0, w, tile):
            patch = _pyramid(tile)[: h - r, : w - s]
            delta[:, r:r + tile, s:s + tile] = patch * _signs((c, 1, 1), gen)
    delta = delta / delta.norm().clamp_min(1e-12) * eps
    return project(x0 + delta, x0, eps, "l2")


def _corner(h: int, height: int, width: int, gen: torch.Generator) -> tuple[int, int]:
    r, s = torch.randint(0, height - h + 1, (1,), generator=gen), torch.randint(0, width - h + 1, (1,), generator=gen)
    return int(r), int(s)


def _square_linf_proposal(cur: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, h: int,
                          gen: torch.Generator) -> torch.Tensor:
    """Set one random h x h square of every channel to x0 - eps or x0 + eps (a sign per
    channel; the 8-bit values ``lo`` / ``hi``). Signs are redrawn (a few times) while the
    square would leave the image unchanged."""
    c, height, width = cur.shape
    r, s = _corner(h, height, width, gen)
    win = (slice(None), slice(r, r + h), slice(s, s + h))
    for _ in range(10):
        new = torch.where(_signs((c, 1, 1), gen) > 0, hi[win], lo[win])
        if not torch.equal(new, cur[win]):
            break
    out = cur.clone()
    out[win] = new
    return out


def _square_l2_proposal(cur: torch.Tensor, x0: torch.Tensor, eps: float, h: int,
                        gen: torch.Generator) -> torch.Tensor:
    """The paper's l2 update (its Algorithm 3): move the perturbation's mass in two random
    h x h windows W1, W2 (plus any unused budget) into W1, along a pyramid with a random
    sign per channel, keeping the total l2 norm at eps."""
    c, height, width = cur.shape
    nu = cur - x0
    r1, s1 = _corner(h, height, width, gen)
    r2, s2 = _corner(h, height, width, gen)
    w1 = (slice(None), slice(r1, r1 + h), slice(s1, s1 + h))
    w2 = (slice(None), slice(r2, r2 + h), slice(s2, s2 + h))
    union = torch.zeros(height, width, dtype=torch.bool)
    union[w1[1:]] = True
    union[w2[1:]] = True
    unused = max(eps ** 2 - float(nu.pow(2).sum()), 0.0)
    old = nu[w1]
    old_unit = old / old.flatten(1).norm(dim=1).clamp_min(1e-12).view(c, 1, 1)
    direction = _signs((c, 1, 1), gen) * _pyramid(h) + old_unit
    available = (nu[:, union].pow(2).sum(1) + unused / c).sqrt().view(c, 1, 1)
    new = nu.clone()
    new[w2] = 0.0
    new[w1] = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(c, 1, 1) * available
    return project(x0 + new, x0, eps, "l2")


def square_attack(model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, s: AttackSettings,
                  cancelled: Callable[[], bool] = lambda: False,
                  example_ids: list[int] | None = None) -> Generator[AttackStep, None, AttackResult | None]:
    """Square attack (Andriushchenko et al. 2020): random search over square-shaped updates.

    Gradient-free: each iteration proposes one random square per example still classified
    correctly, queries the model once (``eot`` draws averaged) and keeps the proposal when
    it lowers the margin loss z_y - max_{i != y} z_i. The square covers a fraction
    :func:`square_fraction` of the pixels. Each example draws from its own generator seeded
    by its id, so results do not depend on batching; it stops early once every example is
    misclassified. The search runs on what can be saved: l-inf squares take the extreme 8-bit
    values inside the ball, l2 candidates are rounded to 8 bits before they are queried
    (x0 is assumed 8-bit). Yields an :class:`AttackStep` per iteration (``loss`` is the negative
    margin, ``step_size`` the fraction ``p``); returns the validated :class:`AttackResult`.
    """
    n = x0.shape[0]
    ids = list(range(n)) if example_ids is None else [int(i) for i in example_ids]
    device = x0.device
    queries = 0
    per_example = torch.zeros(n, dtype=torch.long)

    def logits_of(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        nonlocal queries
        with torch.no_grad():
            out = model(z)
            for _ in range(s.eot - 1):
                out = out + model(z)
        queries += s.eot
        per_example[rows] += s.eot
        return out / s.eot

    everyone = torch.arange(n)
    clean_logits = logits_of(x0, everyone)
    if y is None:
        y = clean_logits.argmax(1)
    clean_correct = clean_logits.argmax(1) == y
    best_adv = x0.clone()
    best_margin = margin_of(clean_logits, y)
    fooled = (~clean_correct).cpu()
    x0c = x0.detach().cpu()
    lo, hi = _grid_box(x0c, s.eps)
    height, width = x0.shape[-2:]
    min_side = 1 if s.norm == "linf" else 3

    def init(rows: list[int], gens: list[torch.Generator]) -> torch.Tensor:
        z = torch.stack([_square_init(x0c[k], lo[k], hi[k], s.eps, s.norm, gens[k]) for k in rows])
        return z if s.norm == "linf" else quantize_in_ball(z, x0c[rows], s.eps, s.norm)

    def propose(cur: torch.Tensor, rows: list[int], h: int, gens: list[torch.Generator]) -> torch.Tensor:
        if s.norm == "linf":
            return torch.stack([_square_linf_proposal(cur[k], lo[k], hi[k], h, gens[k]) for k in rows])
        z = torch.stack([_square_l2_proposal(cur[k], x0c[k], s.eps, h, gens[k]) for k in rows])
        return quantize_in_ball(z, x0c[rows], s.eps, s.norm)

    def consider(rows: torch.Tensor, cand: torch.Tensor, logits: torch.Tensor, cur: torch.Tensor,
                 cur_margin: torch.Tensor, cur_pred: torch.Tensor) -> None:
        """Keep the proposals that lower the margin (per restart and overall)."""
        m = margin_of(logits, y[rows.to(device)]).cpu()
        pred = logits.argmax(1).cpu()
        accept = m < cur_margin[rows]
        keep = rows[accept]
        cur[keep] = cand[accept]
        cur_margin[keep] = m[accept]
        cur_pred[keep] = pred[accept]
        wrong = pred != y.cpu()[rows]
        better = accept & ((m < best_margin.cpu()[rows]) | wrong)  # (| wrong: a tie at margin 0)
        gone = rows[better]
        best_margin[gone.to(device)] = m[better].to(device)
        best_adv[gone.to(device)] = cand[better].to(device)
        fooled[rows[accept & wrong]] = True

    for restart in range(s.restarts):
        gens = [torch.Generator().manual_seed(_example_seed(s.seed, i, restart)) for i in ids]
        cur = x0c.clone()
        cur_margin = best_margin.cpu().clone()
        cur_pred = clean_logits.argmax(1).cpu()
        rows = (~fooled).nonzero()[:, 0]
        if len(rows):
            cand = init(rows.tolist(), gens)
            cur_margin[rows] = float("inf")  # a restart starts afresh from its initial point
            consider(rows, cand, logits_of(cand.to(device), rows), cur, cur_margin, cur_pred)
        for it in range(1, s.steps + 1):
            if cancelled():
                return None
            rows = (~fooled).nonzero()[:, 0]
            if len(rows) == 0:
                break
            p = square_fraction(s.p_init, it, s.steps)
            h = square_side(p, height, width, min_side)
            cand = propose(cur, rows.tolist(), h, gens)
            consider(rows, cand, logits_of(cand.to(device), rows), cur, cur_margin, cur_pred)
            d = (cur - x0c).flatten(1)
            finite = torch.where(torch.isfinite(cur_margin), cur_margin, best_margin.cpu())
            yield AttackStep(restart, it, s.steps, (-finite).numpy().copy(), finite.numpy().copy(),
                             cur_pred.numpy().copy(), d.abs().amax(1).numpy().copy(), d.norm(dim=1).numpy().copy(),
                             cur.numpy().copy(), np.full(n, p, dtype=np.float32))
    result = finalize(model, x0, y, best_adv, s, clean_correct, queries)
    result.example_queries = per_example + 1
    return result


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings,
               on_step: Callable[[AttackStep], None] | None = None,
               example_ids: list[int] | None = None,
               cancelled: Callable[[], bool] = lambda: False) -> AttackResult | None:
    """Drive :func:`attack` to the end and return its result (None when cancelled)."""
    gen = attack(model, x, y, settings, cancelled, example_ids=example_ids)
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


# --- AutoAttack-style ensemble -----------------------------------------------------------

ENSEMBLE_LABELS = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "square": "Square",
                   "transfer": "transfer (APGD-CE on the CNN)"}


@dataclass(frozen=True)
class EnsembleMember:
    """One attack of an ensemble.

    ``targets``: for a targeted-DLR member without a fixed target, how many runner-up
    classes are tried, one run each (AutoAttack's APGD-T). ``transfer``: craft the examples
    on the surrogate model, then classify them with the attacked model.
    """

    name: str
    settings: AttackSettings
    targets: int = 1
    transfer: bool = False

    @property
    def label(self) -> str:
        return ENSEMBLE_LABELS.get(self.name, self.name)


def standard_ensemble(norm: str, eps: float, steps: int = 100, restarts: int = 1, eot: int = 1, seed: int = 0,
                      targets: int = 9, square_queries: int = 5000, p_init: float = 0.8,
                      transfer: bool = True) -> list[EnsembleMember]:
    """The ensemble of DESIGN.md section 3, in order: APGD-CE, APGD-DLR, targeted APGD-DLR
    (``targets`` runner-up classes), Square (``square_queries`` iterations, one restart)
    and, with ``transfer``, APGD-CE crafted on a surrogate CNN."""
    base = AttackSettings(method="apgd", loss="ce", norm=norm, eps=eps, steps=steps, restarts=restarts, eot=eot,
                          seed=seed)
    members = [EnsembleMember("apgd-ce", base), EnsembleMember("apgd-dlr", replace(base, loss="dlr")),
               EnsembleMember("apgd-t", replace(base, loss="dlr-targeted"), targets=targets),
               EnsembleMember("square", AttackSettings(method="square", norm=norm, eps=eps, steps=square_queries,
                                                       eot=eot, seed=seed, p_init=p_init))]
    if transfer:
        members.append(EnsembleMember("transfer", replace(base, eot=1), transfer=True))
    return members


@dataclass(frozen=True)
class EnsembleStep:
    """One attack of the ensemble has run on the examples it had left."""

    stage: int
    total_stages: int
    name: str
    attacked: int  # examples still unbroken before it
    broken: int  # of those, the examples it broke
    robust: np.ndarray  # (N,) bool: still classified correctly
    seconds: float
    queries: int  # passes of the attacked model, summed over the examples


@dataclass
class EnsembleResult:
    """Per-example worst case over the ensemble."""

    adversarial: torch.Tensor  # the validated example that broke it, else the clean image
    labels: torch.Tensor
    clean_correct: torch.Tensor
    robust: torch.Tensor
    broken_by: list[str | None]  # "clean", the breaking attack's name, or None (robust)
    linf: torch.Tensor  # largest perturbation of all the examples tried on it
    l2: torch.Tensor
    queries: torch.Tensor  # (N,) passes of the attacked model per example
    seconds: dict[str, float]  # per attack
    attack_queries: dict[str, int]  # per attack, summed over the examples


def ensemble_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, members: list[EnsembleMember],
                    example_ids: list[int] | None = None, surrogate: nn.Module | None = None,
                    cancelled: Callable[[], bool] = lambda: False
                    ) -> Generator[EnsembleStep, None, EnsembleResult | None]:
    """Run ``members`` in order, each only on the examples no earlier attack has broken
    (as AutoAttack does); yields an :class:`EnsembleStep` per attack and returns the
    :class:`EnsembleResult`. Examples the model misclassifies clean are not attacked.
    Each attack validates its examples; ``example_ids`` seed them as in :func:`attack`.
    """
    x0 = x.detach()
    n = x0.shape[0]
    ids = list(range(n)) if example_ids is None else [int(i) for i in example_ids]
    with torch.no_grad():
        clean_logits = model(x0)
    queries = torch.ones(n, dtype=torch.long)
    clean_correct = clean_logits.argmax(1) == y
    robust = clean_correct.clone()
    broken_by: list[str | None] = [None if c else "clean" for c in clean_correct.tolist()]
    adversarial = x0.clone()
    linf = torch.zeros(n, device=x0.device)
    l2 = torch.zeros(n, device=x0.device)
    seconds: dict[str, float] = {}
    attack_queries: dict[str, int] = {}
    for stage, member in enumerate(members, 1):
        t0 = time.perf_counter()
        s = member.settings
        runs = [s]
        if s.loss == "dlr-targeted" and s.target is None:
            runs = [replace(s, target_rank=k) for k in range(1, min(member.targets, clean_logits.shape[1] - 1) + 1)]
        attacked, broken, spent = int(robust.sum()), 0, 0
        for run in runs:
            rows = robust.nonzero()[:, 0]
            if len(rows) == 0:
                break
            sub_ids = [ids[k] for k in rows.tolist()]
            if member.transfer:
                if surrogate is None:
                    raise ValueError(f"{member.name}: a transfer attack needs a surrogate model")
                res = run_attack(surrogate, x0[rows], y[rows], run, example_ids=sub_ids, cancelled=cancelled)
                if res is None:
                    return None
                with torch.no_grad():
                    success = model(res.adversarial).argmax(1) != y[rows]
                used = torch.ones(len(rows), dtype=torch.long)
            else:
                res = run_attack(model, x0[rows], y[rows], run, example_ids=sub_ids, cancelled=cancelled)
                if res is None:
                    return None
                success = res.success
                used = (res.example_queries.cpu() if res.example_queries is not None
                        else torch.full((len(rows),), res.queries, dtype=torch.long))
            queries[rows.cpu()] += used
            spent += int(used.sum())
            linf[rows] = torch.maximum(linf[rows], res.linf)
            l2[rows] = torch.maximum(l2[rows], res.l2)
            hit = rows[success]
            adversarial[hit] = res.adversarial[success]
            robust[hit] = False
            for k in hit.tolist():
                broken_by[k] = member.name
            broken += len(hit)
        seconds[member.name] = time.perf_counter() - t0
        attack_queries[member.name] = spent
        yield EnsembleStep(stage, len(members), member.name, attacked, broken, robust.cpu().numpy().copy(),
                           seconds[member.name], spent)
    return EnsembleResult(adversarial, y, clean_correct, robust, broken_by, linf, l2, queries, seconds,
                          attack_queries)


def run_ensemble(model: nn.Module, x: torch.Tensor, y: torch.Tensor, members: list[EnsembleMember],
                 example_ids: list[int] | None = None, surrogate: nn.Module | None = None,
                 on_step: Callable[[EnsembleStep], None] | None = None) -> EnsembleResult:
    """Drive :func:`ensemble_attack` to the end and return its result."""
    gen = ensemble_attack(model, x, y, members, example_ids, surrogate)
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_step is not None:
            on_step(step)
