"""Measure where a diffusion classifier's signal lies: accuracy per noise level and for
each weighting restricted to a range of noise levels, on a validation split.

Errors ||D_y(x~ + s n; s) - x~||^2 are computed once on a dense log-spaced grid of noise
levels; each (weighting, range) is then a re-weighting of that grid (a fine quadrature).

    python scripts/level_sweep.py --model runs/x/model.safetensors --n 500 --split val
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from rdc_studio.core.data import load_dataset
from rdc_studio.core.diffusion import log_weight_density, to_model_space
from rdc_studio.core.models import load_checkpoint


def dense_errors(net, images: torch.Tensor, sigmas: torch.Tensor, seed: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(sigmas),) + images.shape[1:], generator=gen)
    k = net.config.num_classes
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x0 = to_model_space(images[i:i + batch])
            n, L = x0.shape[0], len(sigmas)
            xn = (x0.unsqueeze(1) + sigmas.view(1, L, 1, 1, 1) * noise.unsqueeze(0)).flatten(0, 1)
            d = net.denoise(xn, sigmas.repeat(n), heads=range(k)).view(n, L, k, *x0.shape[1:])
            out.append((d - x0.view(n, 1, 1, *x0.shape[1:])).pow(2).flatten(3).sum(-1))
            print(f"  {i + n}/{images.shape[0]}", file=sys.stderr, end="\r")
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--levels", type=int, default=40)
    p.add_argument("--sigma-lo", type=float, default=0.01)
    p.add_argument("--sigma-hi", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--save-errors", default=None,
                   help="also save the (N, levels, K) errors, sigmas and labels here (torch.save) for offline analysis")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.model)
    ds = load_dataset(args.dataset, args.split, args.data_root)
    images, labels = ds.float_images(slice(0, args.n)), ds.labels[: args.n]
    u = np.linspace(math.log(args.sigma_lo), math.log(args.sigma_hi), args.levels)
    sigmas = torch.tensor(np.exp(u), dtype=torch.float32)
    t0 = time.perf_counter()
    err = dense_errors(model.net, images, sigmas, args.seed, args.batch)
    print(f"errors for {len(labels)} images x {args.levels} levels in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    if args.save_errors:
        torch.save({"errors": err, "sigmas": sigmas, "labels": labels, "split": args.split, "seed": args.seed,
                    "model": str(model.path)}, args.save_errors)
    per_level = (err.argmin(2) == labels.view(-1, 1)).float().mean(0).numpy()
    print("per-level accuracy:")
    for s, a in zip(sigmas.tolist(), per_level):
        print(f"  sigma {s:8.4f}  acc {a:.3f}")
    du = u[1] - u[0]
    results = []
    ranges = [(a, b) for a in (0.01, 0.05, 0.1, 0.2, 0.4) for b in (1.0, 2.0, 5.0, 10.0, 40.0) if a < b]
    for weighting in ("elbo", "edm", "uniform-log"):
        for a, b in ranges:
            mask = (sigmas >= a * 0.999) & (sigmas <= b * 1.001)
            g = np.zeros(len(u)) if weighting == "uniform-log" else log_weight_density(u, weighting)
            w = torch.tensor(np.exp(g - g[mask.numpy()].max()) * du, dtype=torch.float32) * mask
            logits = -(err * w.view(1, -1, 1)).sum(1)
            acc = float((logits.argmax(1) == labels).float().mean())
            results.append({"weighting": weighting, "sigma_min": a, "sigma_max": b, "acc": acc})
    results.sort(key=lambda r: -r["acc"])
    print("best quadratures (weighting, range, accuracy):")
    for r in results[:15]:
        print(f"  {r['weighting']:12s} [{r['sigma_min']:.2f}, {r['sigma_max']:.1f}]  {r['acc']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sigmas": sigmas.tolist(), "per_level_acc": per_level.tolist(), "quadratures": results,
                       "n": len(labels), "split": args.split, "model": str(model.path)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
