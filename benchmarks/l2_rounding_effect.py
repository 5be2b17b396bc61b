"""What the 8-bit rounding of l2 adversarial examples costs: the rounding used until
2026-12-06 (shrink the whole perturbation by 2% until it fits, then truncate every pixel
toward the clean image) against the current one (round each pixel to its nearest level, then
round toward the clean image only the pixels that gain the most, until the point fits).

1. The share of eps each rounding keeps, for points on the eps sphere around test images
   (MNIST 28x28 at eps 1.5, CIFAR-10-sized 3x32x32 at eps 0.5), in Gaussian and sign-like
   directions.
2. Robust accuracy of the bundled CNN under APGD-CE at l2 eps on the first ``--n`` MNIST test
   digits, the attack identical but for the rounding of its result:

    python benchmarks/l2_rounding_effect.py --n 200 --out benchmarks/results/l2-rounding-effect.json

Random images stand in for CIFAR-10 in part 1 (the rounding does not look at content).
"""
from __future__ import annotations

import argparse
import sys
import time
from unittest import mock

import torch

from rdc_studio.core.attacks import AttackSettings, attack, project, quantize_in_ball, run_to_end
from rdc_studio.core.attacks import base as attack_base
from rdc_studio.core.baseline import load_cnn
from rdc_studio.core.data import load_dataset
from rdc_studio.core.evaluate import hardware_description


def previous_quantize(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The l2 rounding used until 2026-12-06 (l-inf is unchanged)."""
    if norm == "linf":
        return quantize_in_ball(x, x0, eps, norm)
    q = torch.round(x * 255) / 255
    x0q = torch.round(x0 * 255) / 255
    for _ in range(8):
        over = (q - x0q).flatten(1).norm(dim=1) > eps + 1e-6
        if not over.any():
            break
        q[over] = torch.round((x0q[over] + 0.98 * (q[over] - x0q[over])) * 255) / 255
    over = (q - x0q).flatten(1).norm(dim=1) > eps + 1e-6
    if over.any():
        q[over] = x0q[over] + torch.trunc((x[over] - x0q[over]) * 255) / 255
    return q.clamp(0.0, 1.0)


def kept_share(x0: torch.Tensor, eps: float, direction: str, gen: torch.Generator) -> dict[str, float]:
    """Median share of eps kept by each rounding, for one random point on the sphere per image."""
    d = torch.randn(x0.shape, generator=gen)
    if direction == "sign":
        d = d.sign()
    x = project(x0 + d / d.flatten(1).norm(dim=1).view(-1, *([1] * (x0.dim() - 1))) * eps, x0, eps, "l2")
    before = (x - x0).flatten(1).norm(dim=1)
    out = {}
    for name, rounding in (("previous", previous_quantize), ("current", quantize_in_ball)):
        after = (rounding(x, x0, eps, "l2") - x0).flatten(1).norm(dim=1)
        out[name] = float((after / before).median())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="MNIST test digits (parts 1 and 2)")
    p.add_argument("--eps", type=float, default=1.5, help="l2 radius of part 2 (and of part 1 on MNIST)")
    p.add_argument("--steps", type=int, default=100, help="APGD-CE steps of part 2")
    p.add_argument("--cnn", default="mnist-cnn")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    test = load_dataset("mnist", "test")
    x = test.float_images(slice(0, args.n))
    y = test.labels[: args.n]
    gen = torch.Generator().manual_seed(0)
    cifar_like = torch.round(torch.rand(args.n, 3, 32, 32, generator=gen) * 255) / 255
    shares = {f"{name} {direction}": kept_share(images, eps, direction, gen)
              for name, images, eps in (("mnist 28x28 eps 1.5", x, 1.5), ("3x32x32 eps 0.5", cifar_like, 0.5))
              for direction in ("gaussian", "sign")}
    cnn, _ = load_cnn(args.cnn)
    settings = AttackSettings(method="apgd", loss="ce", norm="l2", eps=args.eps, steps=args.steps)
    robust = {}
    for name, rounding in (("previous", previous_quantize), ("current", quantize_in_ball)):
        with mock.patch.object(attack_base, "quantize_in_ball", rounding):
            result = run_to_end(attack(cnn, x, y, settings))
        robust[name] = int((~result.success).sum())
    report = {"eps_kept_median": shares, "cnn_apgd_ce_robust": robust, "n": args.n, "eps": args.eps,
              "steps": args.steps, "cnn": args.cnn, "hardware": hardware_description(),
              "seconds": round(time.perf_counter() - t0, 1),
              "command": "python benchmarks/l2_rounding_effect.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    for key, value in shares.items():
        print(f"{key}: eps kept (median) previous {value['previous']:.3f}, current {value['current']:.3f}")
    print(f"CNN, APGD-CE l2 {args.eps:g} ({args.steps} steps), first {args.n} test digits: robust "
          f"{robust['previous']} with the previous rounding, {robust['current']} with the current one")
    if args.out:
        from rdc_studio.core.models import atomic_write_json

        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
