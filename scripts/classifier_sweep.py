"""Choose a diffusion classifier's grid and progressive class elimination on the
validation split.

For every candidate grid (T levels, weighting, sigma range) the per-class errors of all
T levels are computed once with the deployed classifier's own noise bank; every
elimination setting (screen E levels on all K classes, keep the leading k) is then an
exact replay of what :class:`DiffusionClassifier` computes with those settings, so the
accuracy it prints is the deployed classifier's. Cost is counted in network evaluations
(E*K + (T-E)*k per image, against T*K without elimination).

    python scripts/classifier_sweep.py --model runs/x/model.safetensors --n 1000 \
        --levels 8,12,16 --sigma-max 2,5 --screen 2,4,6 --keep 2,3 --json sweep.json
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier, interleaved_order
from rdc_studio.core.cli import resolve_device, whole_number
from rdc_studio.core.data import load_dataset
from rdc_studio.core.evaluate import hardware_description, wilson_interval
from rdc_studio.core.models import atomic_write_json, load_checkpoint


def replay_elimination(err: torch.Tensor, weights: torch.Tensor, screen: int, keep: int) -> torch.Tensor:
    """Logits of the classifier with progressive elimination, from all-class errors.

    ``err`` is (N, T, K) in grid order; the screening levels are the first ``screen`` of
    :func:`interleaved_order`, exactly as the classifier visits them.
    """
    t, k = err.shape[1], err.shape[2]
    full = -(err * weights.view(1, -1, 1)).sum(1)
    if not 0 < screen < t or not 0 < keep < k:
        return full
    first = interleaved_order(t)[:screen]
    w_first = weights[first]
    screened = -(err[:, first] * w_first.view(1, -1, 1)).sum(1) * (weights.sum() / w_first.sum())
    kept = screened.topk(keep, dim=1).indices
    kept_full = full.gather(1, kept)
    offset = (kept_full - screened.gather(1, kept)).min(dim=1, keepdim=True).values
    return (screened + offset).scatter(1, kept, kept_full)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", required=True, help="bundled name or checkpoint path")
    p.add_argument("--data-root", default=None, help="dataset root (default: RDC_DATA_ROOT, ...)")
    p.add_argument("--split", default="val", choices=["train", "val"], help="split to choose on (never the test split)")
    p.add_argument("--n", type=whole_number(1), default=1000, help="images (the first n of the split)")
    p.add_argument("--levels", default="8,12,16", help="comma-separated numbers of noise levels T")
    p.add_argument("--weighting", default="edm", help="comma-separated weightings (edm, elbo)")
    p.add_argument("--sigma-min", default="0.1", help="comma-separated lower ends of the grid")
    p.add_argument("--sigma-max", default="2", help="comma-separated upper ends of the grid")
    p.add_argument("--screen", default="2,3,4,6", help="comma-separated screening levels E")
    p.add_argument("--keep", default="2,3,4", help="comma-separated numbers of kept classes k")
    p.add_argument("--grid", default="quantile", help="comma-separated level placements (quantile, log, uniform)")
    p.add_argument("--noise-seed", type=int, default=0, help="the classifier's noise-bank seed")
    p.add_argument("--batch", type=int, default=50, help="images per network batch")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (CUDA when available)")
    p.add_argument("--json", default=None, help="write every result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, p.prog)
    model = load_checkpoint(args.model, device=device)
    ds = load_dataset(model.card.get("dataset", "mnist"), args.split, args.data_root)
    images, labels = ds.float_images(slice(0, args.n)), ds.labels[: args.n]
    k = model.net.config.num_classes
    results = []
    t_start = time.perf_counter()
    grids = [(t, grid, weighting, lo, hi) for t in (int(v) for v in args.levels.split(","))
             for grid in args.grid.split(",") for weighting in args.weighting.split(",")
             for lo in (float(v) for v in args.sigma_min.split(",")) for hi in (float(v) for v in args.sigma_max.split(","))]
    for t, grid, weighting, lo, hi in grids:
        settings = ClassifierSettings(steps=t, weighting=weighting, sigma_min=lo, sigma_max=hi,
                                      noise_seed=args.noise_seed, grid=grid)
        clf = DiffusionClassifier(model.net, settings).to(device)
        with torch.no_grad():
            err = torch.cat([clf.level_errors(images[i:i + args.batch].to(device), range(t), clf.noise_bank).cpu()
                             for i in range(0, len(labels), args.batch)])
        weights = clf.weights.cpu()
        # each level alone (its own argmin of the class errors): where the classes separate
        per_level = [{"sigma": float(sig), "accuracy": float((err[:, j].argmin(1) == labels).float().mean())}
                     for j, sig in enumerate(clf.sigmas.tolist())]
        print(f"T={t:3d} {grid} {weighting} [{lo:g},{hi:g}] each level alone: " + ", ".join(
            f"{lv['sigma']:.3g}: {lv['accuracy']:.3f}" for lv in per_level), flush=True)
        for screen in [0] + [int(v) for v in args.screen.split(",") if int(v) < t]:
            for keep in ([0] if screen == 0 else [int(v) for v in args.keep.split(",")]):
                logits = replay_elimination(err, weights, screen, keep)
                correct = int((logits.argmax(1) == labels).sum())
                evals = t * k if screen == 0 else screen * k + (t - screen) * keep
                lo_ci, hi_ci = wilson_interval(correct, len(labels))
                row = {"levels": t, "grid": grid, "weighting": weighting, "sigma_min": lo, "sigma_max": hi,
                       "screen_levels": screen, "keep_classes": keep, "accuracy": correct / len(labels),
                       "ci95": [lo_ci, hi_ci], "network_evals": evals, "per_level": per_level}
                results.append(row)
                print(f"T={t:3d} {grid} {weighting} [{lo:g},{hi:g}] screen {screen:2d} keep {keep}: "
                      f"acc {row['accuracy']:.4f}  evals/image {evals}", flush=True)
    if args.json:
        atomic_write_json(args.json, {"model": str(model.path), "split": args.split, "n": len(labels),
                                      "hardware": hardware_description(), "results": results,
                                      "seconds": round(time.perf_counter() - t_start, 1),
                                      "command": "python scripts/classifier_sweep.py " + " ".join(sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
