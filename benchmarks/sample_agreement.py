"""Do a model's class-conditional samples look like their class?

Draws ``--n`` samples per class with the EDM Heun sampler and has an independent
classifier (the bundled CNN baseline by default) judge each one, and scores each with the
model's own out-of-distribution indicator (the app's badge). Prints the share judged their
class, overall and per class, how many samples the app would flag as out of distribution,
and optionally writes every sample as ``LABEL-INDEX.png`` and a JSON summary. The same figure as ``rdc sample --out-dir DIR``
followed by ``rdc classify --model mnist-cnn DIR/*.png --json``, in one process.

    python benchmarks/sample_agreement.py --model NAME|PATH [--n 20] [--sampler-steps 18]
        [--churn S] [--seed 0] [--out-dir DIR] [--json out.json] [--threads N]

The app's gallery (``resources/samples``) is made by this script: the first two samples
of each class that the CNN judges to be of that class and that the OOD indicator does not
flag (when the model has an OOD reference),

    python benchmarks/sample_agreement.py --model mnist-embedding --n 20 --gallery resources/samples
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rdc_studio.core.baseline import load_cnn
from rdc_studio.core import cli
from rdc_studio.core.defense import resolve_device
from rdc_studio.core.images import save_png_atomic
from rdc_studio.core.models import atomic_write_json, load_checkpoint
from rdc_studio.core.ood import OodScorer
from rdc_studio.core.sample import parse_sample_filename, sample, sample_filename


def sample_agreement(model_name: str, judge: str = "mnist-cnn", n: int = 20, sampler_steps: int = 18,
                     seed: int = 0, out_dir: Path | None = None, gallery: Path | None = None,
                     gallery_n: int = 2, device: str = "cpu", churn: float = 0.0) -> dict:
    """Per-class agreement of conditional samples with an independent classifier, and how
    many of them the model's OOD indicator flags.

    Samples are rounded to 8 bits (as saved) before they are judged and scored; the seeds
    per class are ``seed + label``, the convention of ``rdc sample``; ``churn`` is the
    sampler's EDM S_churn (0: deterministic). With ``gallery``, the first ``gallery_n``
    samples of each class that the judge agrees with and the indicator does not flag are
    written there as ``LABEL-INDEX.png`` (INDEX: the sample's index, as in ``out_dir``), and
    sample files of an earlier run that this one did not write are removed at the end (other
    files are left alone), so the gallery shows this model's choice only.
    ``ood_flagged`` and ``ood_median_bits_per_dim`` are None when the model's card has no
    OOD reference (then no sample counts as flagged). The diffusion model samples and
    scores on ``device``; the judge runs on the CPU.
    """
    model = load_checkpoint(model_name, device=resolve_device(device))
    cnn, _ = load_cnn(judge)
    scorer = OodScorer.for_model(model)
    per_class = {}
    judged = []
    scores = []
    written: set[Path] = set()
    t0 = time.perf_counter()
    for y in range(model.net.config.num_classes):
        last = None
        for last in sample(model.net, y, n=n, steps=sampler_steps, seed=seed + y, churn=churn):
            pass
        images = np.round(last.image * 255) / 255
        with torch.no_grad():
            pred = cnn(torch.from_numpy(images).float()).argmax(1).numpy()
        assessed = scorer.assess(torch.from_numpy(images).float().to(next(scorer.net.parameters()).device))
        scores += assessed
        flagged = [bool(a.out_of_distribution) for a in assessed]
        per_class[model.classes[y]] = float((pred == y).mean())
        judged += [int(p) for p in pred]
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                save_png_atomic(image, out_dir / sample_filename(y, i))
        if gallery is not None:
            gallery.mkdir(parents=True, exist_ok=True)
            for i in [i for i in range(n) if pred[i] == y and not flagged[i]][:gallery_n]:
                path = gallery / sample_filename(y, i)
                save_png_atomic(images[i], path)
                written.add(path)
    if gallery is not None:  # removed only now, so an interrupted run never leaves the gallery empty
        for stale in gallery.glob("*.png"):
            if parse_sample_filename(stale.stem) is not None and stale not in written:
                stale.unlink()
    k = model.net.config.num_classes
    labels = np.repeat(np.arange(k), n)
    has_reference = scorer.reference is not None
    return {
        "model": model_name, "judge": judge, "n_per_class": n, "sampler_steps": sampler_steps, "churn": churn,
        "seed": seed,
        "agreement": float((np.array(judged) == labels).mean()), "correct": int((np.array(judged) == labels).sum()),
        "total": int(len(labels)), "per_class": per_class,
        "ood_flagged": sum(bool(a.out_of_distribution) for a in scores) if has_reference else None,
        "ood_median_bits_per_dim": float(np.median([a.bits_per_dim for a in scores])) if has_reference else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/sample_agreement.py " + " ".join(sys.argv[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="bundled name or checkpoint path of the diffusion model")
    parser.add_argument("--judge", default="mnist-cnn", help="CNN checkpoint that judges the samples")
    parser.add_argument("--n", type=cli.whole_number(1), default=20, help="samples per class")
    parser.add_argument("--sampler-steps", type=int, default=18, help="Heun sampler steps")
    parser.add_argument("--churn", type=float, default=0.0,
                        help="EDM's S_churn: stochastic sampling with this much fresh noise (0: deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="seed of class 0 (class y uses seed + y)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write each sample as LABEL-INDEX.png here")
    parser.add_argument("--gallery", type=Path, default=None,
                        help="write the first --gallery-n samples per class that the judge agrees with here")
    parser.add_argument("--gallery-n", type=int, default=2, help="samples per class for --gallery")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto: where the diffusion model samples")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = cli.resolve_device(args.device, parser.prog)
    result = sample_agreement(args.model, args.judge, args.n, args.sampler_steps, args.seed, args.out_dir,
                              args.gallery, args.gallery_n, device, args.churn)
    print(f"{result['model']}: {result['correct']}/{result['total']} samples judged their class by "
          f"{result['judge']} ({result['agreement']:.1%}), {result['seconds']} s")
    print("per class: " + "  ".join(f"{c}:{a:.0%}" for c, a in result["per_class"].items()))
    if result["ood_flagged"] is not None:
        print(f"flagged out of distribution by the model's OOD indicator: {result['ood_flagged']}/{result['total']} "
              f"(median score {result['ood_median_bits_per_dim']:.2f} bits/dim)")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
