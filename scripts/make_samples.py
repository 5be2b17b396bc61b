"""Generate the app's sample gallery with the bundled model's own EDM sampler.

    python scripts/make_samples.py --model mnist-multihead --unconditional 20 --out resources/samples
    python scripts/make_samples.py --model mnist-multihead --per-class 2 --out resources/samples

Every file is a sample of the model (never a dataset image); the name says the head it
was drawn from (a class, or ``uncond``) and its seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rdc_studio.core.images import save_png_atomic
from rdc_studio.core.models import load_checkpoint
from rdc_studio.core.sample import sample


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="resources/samples")
    p.add_argument("--unconditional", type=int, default=0,
                   help="draw this many samples from the unconditional head instead of per class")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model = load_checkpoint(args.model)
    out = Path(args.out)
    if args.unconditional:
        last = None
        for last in sample(model.net, len(model.classes), n=args.unconditional, steps=args.steps, seed=args.seed):
            pass
        for k, image in enumerate(last.image):
            save_png_atomic(image, out / f"uncond-seed{args.seed}-{k:02d}.png")
        print(f"wrote {args.unconditional} unconditional samples to {out}")
        return 0
    for y, name in enumerate(model.classes):
        seed = args.seed + 1000 * y
        last = None
        for last in sample(model.net, y, n=args.per_class, steps=args.steps, seed=seed):
            pass
        for k, image in enumerate(last.image):
            save_png_atomic(image, out / f"{name}-seed{seed}-{k}.png")
    print(f"wrote {len(model.classes) * args.per_class} samples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
