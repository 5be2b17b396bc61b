"""The threshold-flip attack: a dedicated l-inf attack on a defense that binarises its input.

A defense that thresholds every pixel (:class:`core.defense.InputBinarization`) sees only
which side of the threshold each pixel lies on. Within an l-inf ball of radius eps, a pixel
can change what the defense sees only if some 8-bit value within eps of it lies on the other
side; every other pixel is out of the attacker's reach. The attack therefore searches over
which of the reachable ("flippable") pixels to flip, a discrete problem that gradient steps
through the straight-through estimate only approximate.
"""
from __future__ import annotations

from typing import Generator

import numpy as np
import torch
from torch import nn

from .base import (AttackResult, AttackSettings, AttackStep, Cancelled, _example_seed, check_cancelled, finalize,
                   margin_of, stops_when_cancelled)
from .square import _grid_box

MAX_BLOCK_SIZES = 8
"""Flip counts tried per iteration: 1, 2, 4, ... up to 2 ** (MAX_BLOCK_SIZES - 1) pixels."""
RANDOM_START_FRACTION = 0.1
"""Restarts after the first start from this fraction of the flippable pixels flipped at random."""
CANDIDATE_BATCH = 8
"""Images per forward pass when candidates are queried (a diffusion classifier evaluates its
network at every noise level and class of every image at once: 64 images of the DC took more
than 20 GB)."""


def flippable_pixels(x0: torch.Tensor, eps: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which pixels an l-inf perturbation of at most ``eps`` can carry across ``threshold``
    (as :class:`core.defense.InputBinarization` sees it: a pixel above it is 1), and the
    8-bit value inside the ball that does so (the farthest one, for a margin against rounding).

    Returns
    -------
    flippable, flipped_value
        A bool mask and a tensor of values, both shaped like ``x0`` (which is assumed 8-bit).
    """
    lo, hi = _grid_box(x0, eps)
    above = x0 > threshold
    flippable = torch.where(above, lo <= threshold, hi > threshold)
    return flippable, torch.where(above, lo, hi)


@stops_when_cancelled
def flip_attack(model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, s: AttackSettings,
                cancelled: Cancelled | None = None,
                example_ids: list[int] | None = None) -> Generator[AttackStep, None, AttackResult | None]:
    """Greedy search over the flippable pixels (:func:`flippable_pixels`) of a binarising defense.

    Each iteration takes one gradient of the margin z_y - max_{i != y} z_i at the current
    image (through the defense's straight-through estimate) and ranks the flippable pixels by
    the first-order change of the margin that toggling each would bring (flipping it, or
    restoring a flipped one). It then queries, in one batch, the images with the best 1, 2, 4,
    ... of them toggled (as many as the gradient says would help, at most
    :data:`MAX_BLOCK_SIZES` counts) and keeps the one of lowest margin if it beats the current
    image. When none does, the top-ranked pixel is set aside until the next accepted move, so
    the next iteration tries others. When the gradient leaves no pixel worth toggling, the
    iteration queries every single toggle exactly instead and keeps the best if it helps. An
    example stops once misclassified, or at a local minimum that no single toggle improves.
    The first start is the clean image; each further restart (``restarts``) starts from
    :data:`RANDOM_START_FRACTION` of the flippable pixels flipped, drawn from the example's own
    seed, so results do not depend on batching.

    ``steps`` is the number of iterations; ``threshold`` the defense's binarisation threshold.
    Yields an :class:`AttackStep` per iteration (``step_size`` holds the number of pixels
    flipped); returns the validated :class:`AttackResult` (None when cancelled).
    """
    if s.method != "flip":
        raise ValueError("flip_attack needs AttackSettings(method='flip')")
    n = x0.shape[0]
    ids = list(range(n)) if example_ids is None else [int(i) for i in example_ids]
    device = x0.device
    queries = 0
    per_example = torch.zeros(n, dtype=torch.long)

    def query(z: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Margins and predictions of the images ``z`` (one query each, in chunks), charged to ``rows``."""
        nonlocal queries
        margins, predictions = [], []
        with torch.no_grad():
            for start in range(0, z.shape[0], CANDIDATE_BATCH):
                check_cancelled(cancelled)
                logits = model(z[start:start + CANDIDATE_BATCH])
                margins.append(margin_of(logits, labels[start:start + CANDIDATE_BATCH]))
                predictions.append(logits.argmax(1))
                queries += 1
        per_example.index_add_(0, rows.cpu(), torch.ones(len(rows), dtype=torch.long))
        return torch.cat(margins), torch.cat(predictions)

    with torch.no_grad():
        check_cancelled(cancelled)
        clean_logits = model(x0)
        queries += 1
    per_example += 1
    if y is None:
        y = clean_logits.argmax(1)
    clean_correct = clean_logits.argmax(1) == y
    flippable, flipped_value = flippable_pixels(x0, s.eps, s.threshold)
    best_adv = x0.clone()
    best_margin = margin_of(clean_logits, y)
    fooled = ~clean_correct
    everyone = torch.arange(n, device=device)

    for restart in range(s.restarts):
        flipped = torch.zeros_like(flippable)
        if restart > 0:
            for k, i in enumerate(ids):
                gen = torch.Generator().manual_seed(_example_seed(s.seed, i, restart))
                draw = torch.rand(x0.shape[1:], generator=gen).to(device) < RANDOM_START_FRACTION
                flipped[k] = draw & flippable[k]
        cur = torch.where(flipped, flipped_value, x0)
        cur_margin = best_margin.clone()
        cur_pred = clean_logits.argmax(1)
        if restart > 0 and bool((~fooled).any()):
            rows = everyone[~fooled]
            cur_margin[rows], cur_pred[rows] = query(cur[rows], y[rows], rows)
        set_aside = torch.zeros_like(flippable)
        stuck = torch.zeros(n, dtype=torch.bool, device=device)
        for it in range(1, s.steps + 1):
            rows = everyone[~fooled & ~stuck]
            if len(rows) == 0:
                break
            check_cancelled(cancelled)
            z = cur[rows].clone().requires_grad_(True)
            with torch.enable_grad():
                grad, = torch.autograd.grad(margin_of(model(z), y[rows]).sum(), z)
            queries += 1
            per_example[rows.cpu()] += 1
            toggled_value = torch.where(flipped[rows], x0[rows], flipped_value[rows])
            change = (grad * (toggled_value - cur[rows])).flatten(1)  # first-order change of the margin
            usable = (flippable[rows] & ~set_aside[rows]).flatten(1) & (change < 0)
            order = torch.where(usable, change, torch.full_like(change, float("inf"))).argsort(dim=1)
            helpful = usable.sum(1).tolist()
            owners, masks = [], []  # candidate images: (example, its flips after toggling some pixels)
            pixels = order.shape[1]
            scanned = set()
            for k, row in enumerate(rows.tolist()):
                if helpful[k] == 0:  # the gradient sees no way down: try every single toggle exactly
                    scanned.add(row)
                    candidates = flippable[row].flatten().nonzero()[:, 0]
                    toggles = torch.zeros(len(candidates), pixels, dtype=torch.bool, device=device)
                    toggles[torch.arange(len(candidates), device=device), candidates] = True
                    stuck[row] = not bool(flippable[row].any())
                else:  # the gradient's best 1, 2, 4, ... pixels
                    counts = [2 ** j for j in range(MAX_BLOCK_SIZES) if 2 ** j <= helpful[k]]
                    rank = torch.empty(pixels, dtype=torch.long, device=device)
                    rank[order[k]] = torch.arange(pixels, device=device)
                    toggles = rank.unsqueeze(0) < torch.tensor(counts, device=device).unsqueeze(1)
                owners += [(k, row)] * len(toggles)
                masks.append(flipped[row].flatten().unsqueeze(0) ^ toggles)
            if owners:
                new_flipped = torch.cat(masks).view(-1, *flipped.shape[1:])
                owner_rows = torch.tensor([row for _, row in owners], device=device)
                images = torch.where(new_flipped, flipped_value[owner_rows], x0[owner_rows])
                margins, predictions = query(images, y[owner_rows], owner_rows)
                for k, row in sorted(set(owners)):
                    mine = (owner_rows == row).nonzero()[:, 0]
                    j = int(mine[margins[mine].argmin()])  # the first of equal bests, as before
                    if float(margins[j]) < float(cur_margin[row]):
                        flipped[row], cur[row] = new_flipped[j], images[j]
                        cur_margin[row], cur_pred[row] = margins[j], predictions[j]
                        set_aside[row] = False
                    elif row in scanned:  # no single toggle helps: a local minimum
                        stuck[row] = True
                    else:  # the gradient's favourite did not help: let the next iteration try others
                        set_aside[row].view(-1)[order[k, 0]] = True
            better = cur_margin < best_margin
            best_margin = torch.where(better, cur_margin, best_margin)
            best_adv[better] = cur[better]
            fooled = fooled | (cur_pred != y)
            d = (cur - x0).flatten(1)
            yield AttackStep(restart, it, s.steps, (-cur_margin).cpu().numpy().copy(),
                             cur_margin.cpu().numpy().copy(), cur_pred.cpu().numpy().copy(),
                             d.abs().amax(1).cpu().numpy().copy(), d.norm(dim=1).cpu().numpy().copy(),
                             cur.detach().cpu().numpy().copy(),
                             flipped.flatten(1).sum(1).cpu().numpy().astype(np.float32))
    check_cancelled(cancelled)
    result = finalize(model, x0, y, best_adv, s, clean_correct, queries)
    result.example_queries = per_example + 1
    return result
