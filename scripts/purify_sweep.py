"""Choose the likelihood-maximisation defaults of a model on the validation split.

For every candidate (eta, steps, step size, noise-level range of the LM) it measures, on
the first images of the validation split (never the test images used for reporting):

* the clean accuracy of the full RDC (purification then the classifier), and
* the robust accuracy of the full RDC under APGD-CE for every threat model given, as the
  worst case per example over the gradient modes given (default ``smooth`` and ``bpda``:
  an example counts as robust only if no gradient mode's attack broke it). The LM is
  deterministic (a frozen noise bank), so no EOT is needed. This is a screening figure on
  a small subset; the reported robustness comes from ``rdc eval``.

    python scripts/purify_sweep.py --model runs/x/model.safetensors --eta 0.1,0.2,0.3 \
        --lm-steps 5 --step-size-ratio 0.4 --sigma 0.4-0.6,0.1-0.3 \
        --threats linf:0.1,l2:1.5 --grad-modes smooth,bpda --n 200 --attack-n 16 \
        --attack-steps 10 --out sweep.json

The step size of each candidate is ``ratio * eta`` (the paper's CIFAR-10 setting,
eta = 8/255 with 5 steps, is a ratio of about 0.25-0.5). The LM's noise levels should
match the attack's scale: a perturbation of l-inf size eps is hidden by noise of about
that standard deviation, so ranges below the old 0.4-0.6 are worth screening.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from rdc_studio.core.attacks import AttackSettings, attack, run_to_end
from rdc_studio.core.classifier import build_classifier
from rdc_studio.core.data import load_dataset
from rdc_studio.core.defense import build_defense, parse_fraction, setup_threads
from rdc_studio.core.evaluate import hardware_description, wilson_interval
from rdc_studio.core.models import atomic_write_json, load_checkpoint
from rdc_studio.core.purify import PurifySettings


def _floats(text: str) -> list[float]:
    return [parse_fraction(part) for part in text.split(",")]


def _sigma_ranges(text: str) -> list[tuple[float, float]]:
    """``"0.4-0.6,0.1-0.3"`` as [(0.4, 0.6), (0.1, 0.3)]."""
    ranges = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        ranges.append((float(lo), float(hi or lo)))
    return ranges


def _threats(text: str) -> list[tuple[str, float]]:
    """``"linf:0.1,l2:1.5"`` as [("linf", 0.1), ("l2", 1.5)]."""
    threats = []
    for part in text.split(","):
        norm, _, eps = part.partition(":")
        if norm not in ("linf", "l2") or not eps:
            raise SystemExit(f"purify_sweep: --threats expects NORM:EPS items (linf or l2), got {part!r}")
        threats.append((norm, parse_fraction(eps)))
    return threats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--eta", default="0.1,0.2,0.3", help="comma-separated radii in [0,1] units")
    p.add_argument("--lm-steps", default="5", help="comma-separated step counts N")
    p.add_argument("--step-size-ratio", default="0.4", help="comma-separated step size / eta ratios")
    p.add_argument("--optimizer", default="sign", choices=["sign", "adam"])
    p.add_argument("--n", type=int, default=200, help="validation images for clean accuracy")
    p.add_argument("--attack-n", type=int, default=16, help="validation images attacked per candidate (0: none)")
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--sigma", default="0.4-0.6", help="comma-separated LO-HI noise-level ranges of the LM")
    p.add_argument("--threats", default="linf:0.1,l2:1.5", help="comma-separated NORM:EPS threat models")
    p.add_argument("--grad-modes", default="smooth,bpda",
                   help="comma-separated gradient modes; robust = robust under every one")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    model = load_checkpoint(args.model)
    clf = build_classifier(model)
    clf_settings = clf.settings
    data = load_dataset(model.card["dataset"], "val", args.data_root)
    rows = []
    threats = _threats(args.threats)
    grad_modes = [m for m in args.grad_modes.split(",") if m]
    candidates = [(eta, steps, ratio, sigma) for eta in _floats(args.eta) for steps in _floats(args.lm_steps)
                  for ratio in _floats(args.step_size_ratio) for sigma in _sigma_ranges(args.sigma)]
    for eta, steps, ratio, (sigma_lo, sigma_hi) in candidates:
        settings = PurifySettings(eta=eta, steps=int(steps), step_size=ratio * eta, optimizer=args.optimizer,
                                  sigma_lo=sigma_lo, sigma_hi=sigma_hi)
        rdc = build_defense("rdc", model, clf, purify=settings, grad_mode=grad_modes[0])
        t0 = time.perf_counter()
        correct = 0
        for i in range(0, args.n, args.batch_size):
            x = data.float_images(slice(i, min(i + args.batch_size, args.n)))
            with torch.no_grad():
                correct += int((rdc(x).argmax(1) == data.labels[i:i + x.shape[0]]).sum())
        clean_seconds = time.perf_counter() - t0
        row = {"purify": settings.to_dict(), "clean_n": args.n, "clean_acc": correct / args.n,
               "clean_ci95": list(wilson_interval(correct, args.n)),
               "clean_seconds_per_image": clean_seconds / args.n, "attacks": []}
        if args.attack_n:
            idx = list(range(args.attack_n))
            x = data.float_images(torch.tensor(idx))
            for norm, eps in threats:
                t0 = time.perf_counter()
                robust_all = torch.ones(args.attack_n, dtype=torch.bool)
                per_mode = {}
                for mode in grad_modes:
                    defense = build_defense("rdc", model, clf, purify=settings, grad_mode=mode)
                    atk = AttackSettings(method="apgd", loss="ce", norm=norm, eps=eps, steps=args.attack_steps)
                    res = run_to_end(attack(defense, x, data.labels[idx], atk, example_ids=idx))
                    per_mode[mode] = int((~res.success).sum())
                    robust_all &= ~res.success.cpu()
                robust = int(robust_all.sum())
                row["attacks"].append({
                    "attack": f"APGD-CE {norm} eps={eps:g} {args.attack_steps} steps", "norm": norm, "eps": eps,
                    "grad_modes": grad_modes, "n": args.attack_n, "robust_per_mode": per_mode,
                    "robust_acc": robust / args.attack_n, "robust_ci95": list(wilson_interval(robust, args.attack_n)),
                    "seconds": time.perf_counter() - t0})
        rows.append(row)
        summary = {"eta": eta, "steps": int(steps), "step_size": ratio * eta, "sigma": [sigma_lo, sigma_hi],
                   "clean_acc": row["clean_acc"]}
        summary |= {f"{a['norm']}:{a['eps']:g}": a["robust_acc"] for a in row["attacks"]}
        print(json.dumps(summary), file=sys.stderr)
    report = {"model": model.name, "split": "val", "classifier": clf_settings.to_dict(), "rows": rows,
              "hardware": hardware_description(),
              "command": "python scripts/purify_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
