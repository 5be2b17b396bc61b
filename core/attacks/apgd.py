"""PGD and APGD (Croce & Hein 2020) with CE, DLR and targeted-DLR losses, l-inf and l2,
as step generators."""
from __future__ import annotations

import math
from typing import Generator

import torch
from torch import nn

from .base import (AttackResult, AttackSettings, AttackStep, Cancelled, NonFiniteGradientError, _example_seed,
                   _normalized, _random_start, attack_loss, check_cancelled, finalize, margin_of, project,
                   stops_when_cancelled)


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step size (Croce & Hein 2020, sec. 3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({int(math.ceil(v * steps - 1e-9)) for v in p if v <= 1})


@stops_when_cancelled
def gradient_attack(model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, s: AttackSettings,
                    cancelled: Cancelled | None = None,
                    example_ids: list[int] | None = None) -> Generator[AttackStep, None, AttackResult | None]:
    """APGD (``method`` "apgd") or PGD ("pgd"): yields an :class:`AttackStep` per iteration and
    returns the validated :class:`AttackResult` (None when cancelled).

    ``cancelled`` is polled before every network pass (each EOT draw, each iteration) and,
    for a diffusion classifier, between its network calls (:func:`stops_when_cancelled`),
    so a stop request takes effect within one network call, forward or backward.
    """
    x0 = x0.detach()
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
            check_cancelled(cancelled)
            zz = z.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(zz)
                loss = attack_loss(logits, y, s.loss, target)
                (g,) = torch.autograd.grad(loss.sum(), zz)
            queries += 1
            if not torch.isfinite(g).all() or not torch.isfinite(loss).all():
                bad = (~torch.isfinite(g.flatten(1)).all(1)) | ~torch.isfinite(loss)
                raise NonFiniteGradientError(
                    f"the defense's loss or gradient is not finite (NaN or inf) for {int(bad.sum())} of "
                    f"{bad.numel()} examples (ids {[ids[i] for i in bad.nonzero().flatten().tolist()][:10]}): "
                    f"an attack cannot follow it, and counting those examples as robust would over-state "
                    f"robustness; attack another gradient mode (smooth, BPDA) or check the model")
            grad += g
            losses = losses + loss.detach()
            logits_sum = logits_sum + logits.detach()
        return losses / s.eot, grad / s.eot, logits_sum / s.eot

    for restart in range(s.restarts):
        seeds = [_example_seed(s.seed, i, restart) for i in ids]
        cur = _random_start(x0, s.eps, s.norm, seeds) if s.random_start else x0.clone()
        loss, grad, logits = loss_and_grad(cur)
        start_margin = margin_of(logits, y)  # a start that is already adversarial counts (as in AutoAttack)
        better = start_margin < best_margin
        best_margin = torch.where(better, start_margin, best_margin)
        best_adv[better] = cur[better]
        n = x0.shape[0]
        eta = torch.full((n,), float(step_size0), device=x0.device)
        view = (-1,) + (1,) * (x0.dim() - 1)
        best_loss, x_best_loss = loss.clone(), cur.clone()
        prev = cur.clone()
        checkpoints = apgd_checkpoints(s.steps)
        # condition 1 of the step-size rule counts steps that raised the loss over the step
        # before (AutoAttack's check_oscillation), not new bests
        last_ck, increase_count, prev_loss = 0, torch.zeros(n, device=x0.device), loss.clone()
        loss_at_last_ck = best_loss.clone()
        eta_reduced_last = torch.zeros(n, dtype=torch.bool, device=x0.device)
        for it in range(1, s.steps + 1):
            check_cancelled(cancelled)
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
            increase_count += (loss > prev_loss).float()
            prev_loss = loss.clone()
            improved = loss > best_loss
            x_best_loss[improved] = cur[improved]
            best_loss = torch.where(improved, loss, best_loss)
            if s.method == "apgd" and it in checkpoints:
                span = it - last_ck
                cond1 = increase_count <= 0.75 * span
                cond2 = (~eta_reduced_last) & (loss_at_last_ck >= best_loss)
                reduce = cond1 | cond2
                eta = torch.where(reduce, eta / 2, eta)
                if reduce.any():
                    cur[reduce] = x_best_loss[reduce]
                    prev[reduce] = x_best_loss[reduce]
                    loss_r, grad_r, _ = loss_and_grad(cur)
                    grad = torch.where(reduce.view(view), grad_r, grad)
                    prev_loss = torch.where(reduce, loss_r, prev_loss)
                eta_reduced_last = reduce
                loss_at_last_ck = best_loss.clone()
                increase_count.zero_()
                last_ck = it
            d = (cur - x0).flatten(1)
            yield AttackStep(restart, it, s.steps, loss.cpu().numpy().copy(), m.cpu().numpy().copy(),
                             logits.argmax(1).cpu().numpy().copy(), d.abs().amax(1).cpu().numpy().copy(),
                             d.norm(dim=1).cpu().numpy().copy(), cur.detach().cpu().numpy().copy(),
                             eta.cpu().numpy().copy())
    check_cancelled(cancelled)
    return finalize(model, x0, y, best_adv, s, clean_correct, queries)


