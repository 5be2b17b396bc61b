"""How well does the out-of-distribution score tell validation images from odd inputs?

Scores (bits/dim, :mod:`rdc_studio.core.ood`, with the model card's settings) ``--n``
validation images and ``--n`` images of each odd set, and reports the AUROC of separating
the validation images from each set:

* uniform noise images;
* CIFAR-10 test images converted to grayscale and resized to the model's input (plain
  conversion, no automatic inversion; skipped for a CIFAR-10 model);
* an image zoo made here from MNIST test digits: semi-transparent digits (30% and 60%
  opacity over black), inverted digits, digits with Gaussian noise (std 0.2), and blank
  images of uniform grey levels from black to white.

Every image is rounded to 8 bits, as a saved PNG would be. Two AUROCs per set: by the
score itself (higher bits/dim = out of distribution) and two-sided, by the distance of
the percentile from 50 (the indicator flags both tails: blank images are *more* likely
than digits). The percentiles and the flag rates (beyond the 0.1th / 99.9th percentile)
come from the model card's ``ood_reference`` when it has one (``rdc ood-calibrate``); the
validation images scored here then follow the reference's images, so none is in both.
Without one, a reference is made from the first ``--n`` validation images and the next
``--n`` are scored.

    python benchmarks/ood_auroc.py --model NAME|PATH [--n 500] [--out FILE.json] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdc_studio.core.data import load_dataset
from rdc_studio.core.models import DEFAULT_MODEL, atomic_write_json, load_checkpoint
from rdc_studio.core.ood import CARD_KEY, OodScorer, auroc, judge, make_reference, score_images
from rdc_studio.core.runtime import run_to_end

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ood-auroc.json"


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * 255) / 255


def cifar_as_model_input(n: int, size: int, channels: int, data_root: str | None) -> torch.Tensor:
    """The first ``n`` CIFAR-10 test images, grayscale (for one channel) and resized."""
    ds = load_dataset("cifar10", "test", data_root)
    out = []
    for img in ds.images[:n]:
        pil = Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").convert("L" if channels == 1 else "RGB")
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(pil, dtype=np.float32) / 255
        out.append(torch.from_numpy(arr[None] if channels == 1 else arr.transpose(2, 0, 1)))
    return torch.stack(out)


def image_zoo(digits: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Odd inputs made from digits (N, C, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed + 1)
    n = digits.shape[0]
    grey = torch.linspace(0, 1, n).view(-1, 1, 1, 1).expand_as(digits)
    return {
        "digits at 30% opacity": digits * 0.3,
        "digits at 60% opacity": digits * 0.6,
        "inverted digits": 1 - digits,
        "digits + noise (std 0.2)": digits + 0.2 * torch.randn(digits.shape, generator=g),
        "blank (grey levels 0..1)": grey.clone(),
    }


def ood_auroc(model_name: str, n: int = 500, seed: int = 0, batch_size: int = 50,
              data_root: str | None = None, device: str = "cpu", command: str = "") -> dict:
    """Score the validation images and every odd set; AUROCs and flag rates per set."""
    t0 = time.perf_counter()
    model = load_checkpoint(model_name, device=device)
    cfg = model.net.config
    dataset = model.card.get("dataset", "mnist")
    scorer = OodScorer.for_model(model)

    def score(images: torch.Tensor) -> np.ndarray:
        return run_to_end(score_images(scorer, to_8bit(images), batch_size, device=device))

    val = load_dataset(dataset, "val", data_root)
    reference = scorer.reference
    if reference is None:
        reference = make_reference(score(val.float_images(slice(0, n))), scorer.settings, dataset, "val",
                                   command="made by benchmarks/ood_auroc.py from the first --n validation images")
        source, start = "first --n validation images (the card has none)", n
    else:
        source, start = f"the model card's {CARD_KEY} (n = {reference['n']})", int(reference["n"])
    val_images = val.float_images(slice(start, start + n))
    if val_images.shape[0] < 2:
        raise SystemExit(f"too few validation images after the reference's {start}")
    in_scores = score(val_images)
    sets: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    sets["uniform noise"] = torch.rand((n, cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
    if dataset != "cifar10":
        sets["CIFAR-10 test, grayscale 28x28" if cfg.in_channels == 1 else "CIFAR-10 test"] = \
            cifar_as_model_input(n, cfg.image_size, cfg.in_channels, data_root)
    if dataset == "mnist":
        zoo = image_zoo(load_dataset("mnist", "test", data_root).float_images(slice(0, n)), seed)
        sets.update({f"zoo: {k}": v for k, v in zoo.items()})

    def describe(scores: np.ndarray) -> dict:
        judged = [judge(float(s), reference) for s in scores]
        pct = np.array([j.percentile for j in judged])
        return {"n": int(scores.size), "bits_per_dim_median": float(np.median(scores)),
                "flagged": float(np.mean([j.out_of_distribution for j in judged])), "percentiles": pct}

    inside = describe(in_scores)
    rows = {"validation (in distribution)": {k: v for k, v in inside.items() if k != "percentiles"}}
    zoo_scores, zoo_pct = [], []
    for name, images in sets.items():
        scores = score(images)
        out = describe(scores)
        rows[name] = {k: v for k, v in out.items() if k != "percentiles"} | {
            "auroc": auroc(in_scores, scores),
            "auroc_two_sided": auroc(np.abs(inside["percentiles"] - 50), np.abs(out["percentiles"] - 50))}
        if name.startswith("zoo: "):
            zoo_scores.append(scores)
            zoo_pct.append(out["percentiles"])
    if zoo_scores:
        scores, pct = np.concatenate(zoo_scores), np.concatenate(zoo_pct)
        rows["zoo: all"] = {"n": int(scores.size), "bits_per_dim_median": float(np.median(scores)),
                            "flagged": float(np.mean([judge(float(s), reference).out_of_distribution
                                                      for s in scores])),
                            "auroc": auroc(in_scores, scores),
                            "auroc_two_sided": auroc(np.abs(inside["percentiles"] - 50), np.abs(pct - 50))}
    return {"model": str(model.path), "model_name": model.name, "dataset": dataset, "n": n, "seed": seed,
            "settings": scorer.settings.to_dict(), "reference": source,
            "validation_images": [start, start + int(val_images.shape[0])], "sets": rows,
            "seconds": round(time.perf_counter() - t0, 1),
            "command": command}


def table(result: dict) -> str:
    lines = [f"{result['model_name']}: OOD score (bits/dim, {result['settings']['levels']} levels), "
             f"n = {result['n']} per set, reference: {result['reference']}",
             f"{'set':34s} {'median b/d':>10s} {'flagged':>8s} {'AUROC':>6s} {'2-sided':>8s}"]
    for name, row in result["sets"].items():
        au = f"{row['auroc']:6.3f}" if "auroc" in row else f"{'':6s}"
        two = f"{row['auroc_two_sided']:8.3f}" if "auroc_two_sided" in row else f"{'':8s}"
        lines.append(f"{name:34s} {row['bits_per_dim_median']:10.3f} {row['flagged']:8.1%} {au} {two}")
    lines.append(f"{result['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="bundled name or checkpoint path")
    parser.add_argument("--n", type=int, default=500, help="images per set (and validation images)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise images and the zoo's noise")
    parser.add_argument("--batch-size", type=int, default=50, help="images per network pass (times the levels)")
    parser.add_argument("--data-root", default=None, help="dataset root (default: as rdc finds it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="write the JSON result here")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = ood_auroc(args.model, args.n, args.seed, args.batch_size, args.data_root, args.device,
                       command="python benchmarks/ood_auroc.py " + " ".join(argv))
    print(table(result))
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
