"""Measure where a diffusion classifier's signal lies: accuracy per noise level and for
each weighting restricted to a range of noise levels, on a validation split.

Errors ||D_y(x~ + s n; s) - x~||^2 are computed once on a dense log-spaced grid of noise
levels; each (weighting, range) is then a re-weighting of that grid (a fine quadrature).

Per-level weights (``--weights-cv``): with the errors in hand, 2-fold cross-validation on
the split compares, for each level range, the weighting's own weights with equal weights,
weights 1/sd (the standard deviation of each level's class-centred errors) and non-negative
weights fitted by cross-entropy on the other half: whether re-weighting the levels of a
frozen noise bank could buy accuracy that the weighting leaves (held-out figures only).

    python scripts/level_sweep.py --model runs/x/model.safetensors --n 500 --split val
    python scripts/level_sweep.py --model mnist-embedding --n 1500 --levels 36 --sigma-lo 0.5 \
        --sigma-hi 16 --batch 2 --errors runs/levels/errors.pt --weights-cv
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

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


def cached_errors(path: str | None, model, images: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor,
                  args: argparse.Namespace) -> torch.Tensor:
    """The (N, levels, K) errors: loaded from ``path`` when it holds those of the same model,
    split, images, grid and seed, else computed (and saved there when ``path`` is given)."""
    meta = {"model": str(model.path), "split": args.split, "n": len(labels), "seed": args.seed,
            "sigmas": [round(v, 6) for v in sigmas.tolist()]}
    if path and Path(path).exists():
        saved = torch.load(path, weights_only=True)
        if saved.get("meta") != meta:
            raise SystemExit(f"level_sweep: {path} holds the errors of other settings ({saved.get('meta')}); "
                             "remove it or name another --errors file")
        print(f"errors loaded from {path}", file=sys.stderr)
        return saved["errors"]
    t0 = time.perf_counter()
    err = dense_errors(model.net, images, sigmas, args.seed, args.batch)
    print(f"errors for {len(labels)} images x {len(sigmas)} levels in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        torch.save({"meta": meta, "errors": err, "labels": labels}, tmp)
        tmp.replace(path)
    return err


def _accuracy(err: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> float:
    return float((-(err * w.view(1, -1, 1)).sum(1)).argmax(1).eq(labels).double().mean())


def fit_level_weights(err: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor,
                      l2: float = 1e-2, steps: int = 400) -> torch.Tensor:
    """Non-negative per-level weights (zero outside ``mask``) that minimise the cross-entropy
    of the logits -sum_i w_i err_i on these examples, plus ``l2`` times ||w * scale||^2."""
    gen = torch.Generator().manual_seed(0)
    v = (0.01 * torch.randn(err.shape[1], generator=gen, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.Adam([v], lr=0.05)
    scaled = err.double() / scale.view(1, -1, 1)
    for _ in range(steps):
        w = torch.nn.functional.softplus(v) * mask
        loss = torch.nn.functional.cross_entropy(-(scaled * w.view(1, -1, 1)).sum(1), labels) + l2 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (torch.nn.functional.softplus(v) * mask / scale).detach()


def weights_cross_validation(err: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor,
                             ranges: list[tuple[float, float]], weighting: str = "edm") -> list[dict]:
    """Held-out accuracy (2 folds, a fixed random split) of four per-level weightings of each
    range: ``weighting``'s density, equal, 1/sd and fitted (:func:`fit_level_weights`; the 1/sd
    scales and the fit use the other fold only)."""
    err = err.double()
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    folds = [(perm[: n // 2], perm[n // 2:]), (perm[n // 2:], perm[: n // 2])]
    u = sigmas.double().log().numpy()
    rows = []
    for lo, hi in ranges:
        mask = ((sigmas >= lo * 0.999) & (sigmas <= hi * 1.001)).double()
        if mask.sum() < 2:
            continue
        g = log_weight_density(u, weighting)
        density = torch.tensor(np.exp(g - g[mask.bool().numpy()].max())) * mask
        held = {"density": [], "equal": [], "1/sd": [], "fitted": []}
        for fit_idx, test_idx in folds:
            sd = (err[fit_idx] - err[fit_idx].mean(2, keepdim=True)).std(dim=(0, 2))
            candidates = {"density": density, "equal": mask, "1/sd": mask / sd,
                          "fitted": fit_level_weights(err[fit_idx], labels[fit_idx], mask, sd)}
            for name, w in candidates.items():
                held[name].append(_accuracy(err[test_idx], w, labels[test_idx]))
        rows.append({"sigma_min": lo, "sigma_max": hi, "levels": int(mask.sum()), "weighting": weighting,
                     **{name: sum(v) / len(v) for name, v in held.items()}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val", choices=["train", "val"], help="split to measure on (never the test split)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--levels", type=int, default=40)
    p.add_argument("--sigma-lo", type=float, default=0.01)
    p.add_argument("--sigma-hi", type=float, default=40.0)
    p.add_argument("--range-lo", default="0.01,0.05,0.1,0.2,0.4,0.7,1,1.5",
                   help="comma-separated lower ends of the level ranges compared")
    p.add_argument("--range-hi", default="1,2,5,10,16,40", help="comma-separated upper ends of the level ranges")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25, help="images per network batch (2 is fastest on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--errors", default=None,
                   help="cache of the (N, levels, K) errors: loaded when it holds these settings' errors, else "
                        "computed and saved there")
    p.add_argument("--weights-cv", action="store_true",
                   help="also compare per-level weightings by 2-fold cross-validation (see the module docstring)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.model)
    ds = load_dataset(args.dataset, args.split, args.data_root)
    images, labels = ds.float_images(slice(0, args.n)), ds.labels[: args.n]
    u = np.linspace(math.log(args.sigma_lo), math.log(args.sigma_hi), args.levels)
    sigmas = torch.tensor(np.exp(u), dtype=torch.float32)
    err = cached_errors(args.errors, model, images, labels, sigmas, args)
    per_level = (err.argmin(2) == labels.view(-1, 1)).float().mean(0).numpy()
    print("per-level accuracy:")
    for s, a in zip(sigmas.tolist(), per_level):
        print(f"  sigma {s:8.4f}  acc {a:.3f}")
    du = u[1] - u[0]
    results = []
    ranges = [(a, b) for a in (float(v) for v in args.range_lo.split(","))
              for b in (float(v) for v in args.range_hi.split(",")) if a < b]
    seen: set[tuple[int, ...]] = set()
    distinct = []
    for a, b in ranges:  # ranges that select the same grid levels are one range
        levels = tuple(np.nonzero((u >= math.log(a) - 1e-3) & (u <= math.log(b) + 1e-3))[0].tolist())
        if len(levels) >= 2 and levels not in seen:
            seen.add(levels)
            distinct.append((a, b))
    for weighting in ("elbo", "edm", "uniform-log"):
        for a, b in distinct:
            mask = (sigmas >= a * 0.999) & (sigmas <= b * 1.001)
            g = np.zeros(len(u)) if weighting == "uniform-log" else log_weight_density(u, weighting)
            w = torch.tensor(np.exp(g - g[mask.numpy()].max()) * du, dtype=torch.float32) * mask
            results.append({"weighting": weighting, "sigma_min": a, "sigma_max": b,
                            "acc": _accuracy(err, w, labels)})
    results.sort(key=lambda r: -r["acc"])
    print("best quadratures (weighting, range, accuracy):")
    for r in results[:15]:
        print(f"  {r['weighting']:12s} [{r['sigma_min']:.2f}, {r['sigma_max']:.1f}]  {r['acc']:.3f}")
    cv = weights_cross_validation(err, labels, sigmas, distinct) if args.weights_cv else []
    if cv:
        print("per-level weights, held-out accuracy (2-fold): range, levels, edm density, equal, 1/sd, fitted")
        for r in cv:
            print(f"  [{r['sigma_min']:g}, {r['sigma_max']:g}] {r['levels']:3d}  {r['density']:.4f} "
                  f"{r['equal']:.4f} {r['1/sd']:.4f} {r['fitted']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sigmas": sigmas.tolist(), "per_level_acc": per_level.tolist(), "quadratures": results,
                       "weights_cv": cv, "n": len(labels), "split": args.split, "model": str(model.path),
                       "command": "python scripts/level_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
