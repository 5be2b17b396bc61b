"""How close the threshold-flip attack comes to the exact optimum, on problems small enough to
search exhaustively.

Random small CNNs see binarised 8-bit images (``core.defense.InputBinarization`` at 0.5) whose
pixels are mostly 0 or 1, with ``--flippable`` pixels near the threshold, so an l-inf ball of
0.3 reaches 2 ** flippable binary images. Exhaustive search over all of them gives each
example's lowest margin m* (true-class logit minus the best other). To make every instance
hard, each example is then attacked on its own copy of the network whose true-class logit is
shifted so that breaking it needs between 75% and 125% of the largest margin drop any set of
flips achieves (uniformly drawn): about half are breakable, and only by nearly the best flips.
Prints how many exhaustive search breaks, how many the flip attack (``rdc eval --attack flip``)
breaks, and how often it missed a break; then, run on an unbreakable copy (so it goes on to its
local minimum), what fraction of the largest possible margin drop it reached:

    python benchmarks/flip_vs_exhaustive.py --models 20 --examples 16 --flippable 12
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn

from rdc_studio.core.attacks import AttackSettings, attack, flippable_pixels, margin_of, run_to_end
from rdc_studio.core.defense import InputBinarization


def random_problem(seed: int, examples: int, flippable: int, size: int = 16) -> tuple[nn.Module, torch.Tensor]:
    """A random CNN behind binarisation at 0.5, and 8-bit images with exactly ``flippable``
    pixels within 0.3 of crossing it (the rest 0 or 1, out of reach)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * size * size, 10)).eval()
    x = (torch.rand(examples, 1, size, size, generator=gen) > 0.6).float()
    for k in range(examples):
        where = torch.randperm(size * size, generator=gen)[:flippable]
        near = torch.where(torch.rand(flippable, generator=gen) > 0.5, 0.65, 0.35)  # 0.35 -> 0.65 crosses
        x[k].view(-1)[where] = near
    return InputBinarization(net, 0.5), torch.round(x * 255) / 255


class ShiftedTrueClass(nn.Module):
    """``model`` with ``shift`` added to the logit of class ``label`` (the margin moves by it)."""

    def __init__(self, model: nn.Module, label: int, shift: float) -> None:
        super().__init__()
        self.model, self.label, self.shift = model, label, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).clone()
        out[:, self.label] += self.shift
        return out


def exhaustive_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """The lowest margin over every set of flips of every example."""
    reach, value = flippable_pixels(x, eps, 0.5)
    lowest = []
    for k in range(x.shape[0]):
        pixels = reach[k].flatten().nonzero()[:, 0]
        combos = torch.tensor(list(itertools.product([False, True], repeat=len(pixels))))
        images = x[k].flatten().repeat(len(combos), 1)
        flips = torch.zeros_like(images, dtype=torch.bool)
        flips[:, pixels] = combos
        images = torch.where(flips, value[k].flatten().expand_as(images), images).view(-1, *x.shape[1:])
        with torch.no_grad():
            margins = torch.cat([margin_of(model(chunk), y[k].expand(len(chunk)))
                                 for chunk in images.split(4096)])
        lowest.append(margins.min())
    return torch.stack(lowest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--examples", type=int, default=16, help="images per model")
    p.add_argument("--flippable", type=int, default=12, help="pixels within reach of the threshold per image")
    p.add_argument("--steps", type=int, default=50, help="flip attack iterations")
    p.add_argument("--restarts", type=int, default=1,
                   help="flip attack starts: the clean image, then random flips (the best run counts)")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    instances = breakable = broken = missed = false_break = 0
    reached: list[float] = []
    t0 = time.perf_counter()
    for seed in range(args.models):
        model, x = random_problem(seed, args.examples, args.flippable)
        with torch.no_grad():
            y = model(x).argmax(1)
        optimum = exhaustive_margins(model, x, y, args.eps)
        with torch.no_grad():
            clean = margin_of(model(x), y)
        gen = torch.Generator().manual_seed(10_000 + seed)
        settings = AttackSettings(method="flip", norm="linf", eps=args.eps, steps=args.steps,
                                  restarts=args.restarts, threshold=0.5)
        for k in range(args.examples):
            drop = float(clean[k] - optimum[k])  # the largest margin drop any flips achieve
            if drop <= 0:
                continue
            needed = drop * (0.75 + 0.5 * float(torch.rand((), generator=gen)))
            hard = ShiftedTrueClass(model, int(y[k]), needed - float(clean[k]))  # clean margin := needed
            result = run_to_end(attack(hard, x[k:k + 1], y[k:k + 1], settings, example_ids=[k]))
            can, did = needed < drop, bool(result.success[0])
            unbreakable = ShiftedTrueClass(model, int(y[k]), 1e3)
            deepest = run_to_end(attack(unbreakable, x[k:k + 1], y[k:k + 1], settings, example_ids=[k]))
            with torch.no_grad():
                reached.append((float(clean[k]) - float(margin_of(model(deepest.adversarial), y[k:k + 1]))) / drop)
            instances += 1
            breakable += int(can)
            broken += int(did)
            missed += int(can and not did)
            false_break += int(did and not can)
    print(f"{instances} instances ({args.models} random CNNs x {args.examples} images, {args.flippable} flippable "
          f"pixels each, eps {args.eps}, each needing 75-125% of the largest possible margin drop): exhaustive "
          f"search breaks {breakable}, the flip attack ({args.steps} iterations"
          f"{f', {args.restarts} starts' if args.restarts > 1 else ''}) {broken}; it missed {missed} of the "
          f"{breakable} breakable ({100 * missed / max(1, breakable):.1f}%)"
          f"{'' if not false_break else f', and claims {false_break} the search cannot break (a bug)'}. "
          f"Run to its local minimum, it reached {100 * sum(reached) / max(1, len(reached)):.1f}% of the largest "
          f"possible margin drop on average, at least {100 * sorted(reached)[len(reached) // 20]:.1f}% on 95% of them "
          f"(lowest {100 * min(reached):.1f}%, {sum(r >= 1 - 1e-6 for r in reached)} exactly optimal); "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
