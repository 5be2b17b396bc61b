"""The gradient-free Square attack (Andriushchenko et al. 2020), l-inf and l2, as a step generator."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Generator

import numpy as np
import torch
from torch import nn

from .base import (AttackResult, AttackSettings, AttackStep, Cancelled, _example_seed, check_cancelled, finalize,
                   margin_of, project, quantize_in_ball, stops_when_cancelled)


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


@stops_when_cancelled
def square_attack(model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, s: AttackSettings,
                  cancelled: Cancelled | None = None,
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
            check_cancelled(cancelled)
            out = model(z)
            for _ in range(s.eot - 1):
                check_cancelled(cancelled)
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
            check_cancelled(cancelled)
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
    check_cancelled(cancelled)
    result = finalize(model, x0, y, best_adv, s, clean_correct, queries)
    result.example_queries = per_example + 1
    return result
