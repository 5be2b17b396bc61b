"""Cross-check our APGD-CE against torchattacks' APGD on the same RDC module.

Both attack one :class:`core.rdc.RobustDiffusionClassifier`, built from the model card's
classifier and purification defaults in deterministic mode (``--grad auto``: smooth
gradients for sign-step purification, exact for Adam; or exact, smooth, bpda), with
l-inf APGD-CE at the same eps and iterations, one restart, on the
first n test images. It prints and writes both robust accuracies with 95% Wilson
intervals and whether the intervals overlap (docs/architecture.md, evaluation rules).

torchattacks' examples are judged as it returns them (float) and, like ours, after
rounding to 8 bits inside the eps ball; the agreement is judged on the 8-bit numbers.
(torchattacks reseeds the global torch RNG with --seed for its random starts.)

    python scripts/crosscheck_torchattacks.py --n 50 --eps 0.3 --steps 100 --out crosscheck.json
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from rdc_studio.core.attacks import AttackSettings, attack, quantize_in_ball, run_to_end
from rdc_studio.core.classifier import build_classifier
from rdc_studio.core.data import load_dataset
from rdc_studio.core.defense import (DeviceUnavailableError, build_defense, parse_fraction, purify_settings,
                                     resolve_device, setup_threads)
from rdc_studio.core.evaluate import hardware_description, wilson_interval
from rdc_studio.core.models import CheckpointError, atomic_write_json, load_checkpoint
from rdc_studio.core.rdc import RobustDiffusionClassifier


def build_rdc(model, grad: str, levels: int | None = None, device: str = "cpu") -> RobustDiffusionClassifier:
    """The RDC of a loaded model with its card's defaults, in deterministic mode."""
    clf = build_classifier(model, device, mode="deterministic", steps=levels or None)
    return build_defense("rdc", model, clf, purify=purify_settings(model, mode="deterministic"), grad_mode=grad)


def _summary(robust: torch.Tensor) -> dict:
    k, n = int(robust.sum()), int(robust.numel())
    return {"robust": k, "robust_acc": k / max(1, n), "robust_ci95": list(wilson_interval(k, n))}


def _overlap(a: list[float], b: list[float]) -> bool:
    return max(a[0], b[0]) <= min(a[1], b[1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="bundled model name or checkpoint path (default: the bundled default)")
    p.add_argument("--n", type=int, default=50, help="first N test images")
    p.add_argument("--eps", default="0.3", help="l-inf radius in [0,1] units, e.g. 0.3 or 8/255")
    p.add_argument("--steps", type=int, default=100, help="APGD iterations (both attacks)")
    p.add_argument("--grad", choices=["auto", "exact", "smooth", "bpda"], default="auto",
                   help="gradient mode of the attacked RDC (auto: smooth for sign-step purification)")
    p.add_argument("--levels", type=int, default=None, help="classifier noise levels T (default: the card's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    try:
        import torchattacks
    except ImportError:
        raise SystemExit("crosscheck_torchattacks: needs torchattacks (pip install -e '.[test]')") from None
    setup_threads(args.threads)
    try:
        device = resolve_device(args.device)
        model = load_checkpoint(args.model, device=device)
    except (CheckpointError, DeviceUnavailableError) as exc:
        raise SystemExit(f"crosscheck_torchattacks: {exc}") from None
    rdc = build_rdc(model, args.grad, args.levels, device).eval()
    eps = parse_fraction(args.eps)
    data = load_dataset(model.card["dataset"], "test", args.data_root)
    n = min(args.n, len(data))
    ours = AttackSettings(method="apgd", loss="ce", norm="linf", eps=eps, steps=args.steps, seed=args.seed)
    clean, robust_ours, robust_float, robust_8bit = [], [], [], []
    seconds = {"ours": 0.0, "torchattacks": 0.0}
    checks = {"finite": True, "in_box": True, "in_ball": True}
    for start in range(0, n, args.batch_size):
        idx = list(range(start, min(start + args.batch_size, n)))
        x = data.float_images(torch.tensor(idx)).to(device)
        y = data.labels[idx].to(device)
        t0 = time.perf_counter()
        res = run_to_end(attack(rdc, x, y, ours, example_ids=idx))
        seconds["ours"] += time.perf_counter() - t0
        clean.append(res.clean_correct.cpu())
        robust_ours.append((~res.success).cpu())
        t0 = time.perf_counter()
        atk = torchattacks.APGD(rdc, norm="Linf", eps=eps, steps=args.steps, n_restarts=1, seed=args.seed,
                                loss="ce")
        adv = atk(x, y).detach()
        seconds["torchattacks"] += time.perf_counter() - t0
        checks["finite"] &= bool(torch.isfinite(adv).all())
        checks["in_box"] &= bool((adv >= 0).all() and (adv <= 1).all())
        checks["in_ball"] &= bool(((adv - x).abs().amax() <= eps + 1e-6))
        adv8 = quantize_in_ball(adv, x, eps, "linf")
        with torch.no_grad():
            ok = res.clean_correct
            robust_float.append((ok & (rdc(adv).argmax(1) == y)).cpu())
            robust_8bit.append((ok & (rdc(adv8).argmax(1) == y)).cpu())
        print(f"{idx[-1] + 1}/{n}: ours {int(torch.cat(robust_ours).sum())} robust, torchattacks "
              f"{int(torch.cat(robust_8bit).sum())} robust", file=sys.stderr)
    clean_t, ours_t = torch.cat(clean), torch.cat(robust_ours)
    float_t, bit8_t = torch.cat(robust_float), torch.cat(robust_8bit)
    report = {
        "model": model.name, "n": n, "eps": eps, "steps": args.steps, "grad": rdc.grad_mode, "seed": args.seed,
        "classifier": rdc.classifier.settings.to_dict(), "purify": rdc.maximizer.settings.to_dict(),
        "clean_acc": float(clean_t.float().mean()), "clean_ci95": list(wilson_interval(int(clean_t.sum()), n)),
        "ours": {"attack": "core.attacks APGD-CE l-inf, 1 restart", "seconds": seconds["ours"], **_summary(ours_t)},
        "torchattacks": {"attack": f"torchattacks {torchattacks.__version__} APGD(loss='ce', norm='Linf', "
                                   f"n_restarts=1)", "seconds": seconds["torchattacks"], "checks": checks,
                         **_summary(bit8_t), "float": _summary(float_t)},
        "per_example_disagreements": [i for i in range(n) if bool(ours_t[i]) != bool(bit8_t[i])],
        "hardware": hardware_description(),
        "command": "python scripts/crosscheck_torchattacks.py " + " ".join(shlex.quote(a) for a in argv),
    }
    report["agree"] = _overlap(report["ours"]["robust_ci95"], report["torchattacks"]["robust_ci95"])
    report["agree_float"] = _overlap(report["ours"]["robust_ci95"], report["torchattacks"]["float"]["robust_ci95"])

    def line(name: str, s: dict) -> str:
        lo, hi = s["robust_ci95"]
        return f"{name}: robust accuracy {s['robust_acc']:.4f} (95% CI {lo:.4f}-{hi:.4f})"

    print(f"RDC ({rdc.grad_mode} gradients) of {model.name}, l-inf eps {eps:g}, {args.steps} APGD-CE iterations, "
          f"n = {n}, clean accuracy {report['clean_acc']:.4f}")
    print(line("ours        ", report["ours"]) + f", {seconds['ours']:.1f} s")
    print(line("torchattacks", report["torchattacks"]) + f" after 8-bit rounding, {seconds['torchattacks']:.1f} s "
          f"({report['torchattacks']['float']['robust_acc']:.4f} as returned)")
    print(("agree" if report["agree"] else "DISAGREE") + " within their 95% intervals; "
          f"{len(report['per_example_disagreements'])} example(s) judged differently")
    if not all(checks.values()):
        print(f"torchattacks' examples failed validation: {checks}")
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
