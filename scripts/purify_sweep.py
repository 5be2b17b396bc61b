"""Choose the likelihood-maximisation defaults of a model on the validation split.

For every candidate (eta, steps, step size) it measures, on the first images of the
validation split (never the test images used for reporting):

* the clean accuracy of the full RDC (purification then the classifier), and
* the robust accuracy of the full RDC under APGD-CE with exact end-to-end gradients at
  the given l-inf eps, on a smaller subset (a short attack: a screening figure only; the
  reported robustness comes from ``rdc eval``).

    python scripts/purify_sweep.py --model runs/x/model.safetensors --eta 0.1,0.2,0.3 \
        --lm-steps 5 --step-size-ratio 0.4 --n 200 --attack-n 16 --attack-steps 10 --out sweep.json

The step size of each candidate is ``ratio * eta`` (the paper's CIFAR-10 setting,
eta = 8/255 with 5 steps, is a ratio of about 0.25-0.5).
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
    p.add_argument("--eps", type=float, default=0.3)
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
    candidates = [(eta, steps, ratio) for eta in _floats(args.eta) for steps in _floats(args.lm_steps)
                  for ratio in _floats(args.step_size_ratio)]
    for eta, steps, ratio in candidates:
        settings = PurifySettings(eta=eta, steps=int(steps), step_size=ratio * eta, optimizer=args.optimizer)
        rdc = build_defense("rdc", model, clf, purify=settings, grad_mode="exact")
        t0 = time.perf_counter()
        correct = 0
        for i in range(0, args.n, args.batch_size):
            x = data.float_images(slice(i, min(i + args.batch_size, args.n)))
            with torch.no_grad():
                correct += int((rdc(x).argmax(1) == data.labels[i:i + x.shape[0]]).sum())
        clean_seconds = time.perf_counter() - t0
        row = {"purify": settings.to_dict(), "clean_n": args.n, "clean_acc": correct / args.n,
               "clean_ci95": list(wilson_interval(correct, args.n)),
               "clean_seconds_per_image": clean_seconds / args.n}
        if args.attack_n:
            t0 = time.perf_counter()
            idx = list(range(args.attack_n))
            atk = AttackSettings(method="apgd", loss="ce", norm="linf", eps=args.eps, steps=args.attack_steps)
            x = data.float_images(torch.tensor(idx))
            res = run_to_end(attack(rdc, x, data.labels[idx], atk, example_ids=idx))
            robust = int((~res.success).sum())
            row.update({"attack": f"APGD-CE linf eps={args.eps:g} {args.attack_steps} steps, exact gradients",
                        "attack_n": args.attack_n, "robust_acc": robust / args.attack_n,
                        "robust_ci95": list(wilson_interval(robust, args.attack_n)),
                        "attack_seconds": time.perf_counter() - t0})
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "purify"} | {"eta": eta, "steps": int(steps),
                                                                           "step_size": ratio * eta}),
              file=sys.stderr)
    report = {"model": model.name, "split": "val", "classifier": clf_settings.to_dict(), "rows": rows,
              "hardware": hardware_description(),
              "command": "python scripts/purify_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
