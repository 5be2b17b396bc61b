"""How the float32 cross-entropy saturates on the bundled diffusion classifier, and what that
does to APGD-CE (the 2026-12-06 attack audit's finding, measured).

The DC's logits are large: a clean digit's margin (true logit minus the best other) is often
above 16.5, where ``F.cross_entropy`` in float32 is exactly 0 and its gradient lacks the true
class's term (p_y - 1 rounds to 0). APGD's step-size rule then sees no progress and halves the
step at every checkpoint. This script measures, on the first ``--n`` test digits:

1. the clean margins and how many digits have a cross-entropy of exactly 0;
2. APGD-CE's trajectory on one such digit (``--digit``) with the shipped loss and with the
   same loss computed in float64;
3. how many of the saturated digits APGD-CE breaks with each loss (``--eps``, ``--steps``).

The float64 variant replaces the attacks' loss function for the duration of a run (a
diagnostic; the shipped attacks use float32, as AutoAttack does). Writes a JSON report.

    python benchmarks/ce_saturation.py --out benchmarks/results/ce-saturation.json
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def float64_cross_entropy():
    """The attacks' cross-entropy computed in float64 inside the block (other losses as shipped)."""
    import rdc_studio.core.attacks.apgd as apgd

    shipped = apgd.attack_loss

    def loss(logits, y, kind, target=None):
        if kind == "ce":
            return F.cross_entropy(logits.double(), y, reduction="none")
        return shipped(logits, y, kind, target)

    apgd.attack_loss = loss
    try:
        yield
    finally:
        apgd.attack_loss = shipped


def trajectory(clf, x, y, ids, settings) -> tuple[list[dict], bool]:
    """APGD's per-iteration loss, margin and step size on one digit, and whether it broke it."""
    from rdc_studio.core.attacks import attack

    steps, gen = [], attack(clf, x, y, settings, example_ids=ids)
    while True:
        try:
            record = next(gen)
        except StopIteration as end:
            return steps, bool(end.value.success[0])
        steps.append({"iteration": int(record.iteration), "loss": float(record.loss[0]),
                      "margin": round(float(record.margin[0]), 3), "step_size": float(record.step_size[0])})


LOSSES = {"float32": contextlib.nullcontext, "float64": float64_cross_entropy}


def loss_list(text: str) -> list[str]:
    """``--losses``: a comma-separated subset of the cross-entropy precisions, in the given order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOSSES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(LOSSES)}, got {text!r}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist-embedding")
    p.add_argument("--n", type=int, default=20, help="first n test digits (default 20)")
    p.add_argument("--digit", type=int, default=1, help="the digit whose trajectory is traced (default 1)")
    p.add_argument("--trace-eps", type=float, default=0.1, help="l-inf radius of the trace (default 0.1)")
    p.add_argument("--eps", type=float, default=0.2, help="l-inf radius of the comparison (default 0.2)")
    p.add_argument("--steps", type=int, default=20, help="APGD-CE steps (default 20)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=None)
    p.add_argument("--losses", type=loss_list, default=list(LOSSES),
                   help="which cross-entropies to run, comma-separated (default float32,float64); "
                        "two processes with one each run the halves side by side on two cores")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rdc_studio.core.attacks import AttackSettings, margin_of, run_to_end
    from rdc_studio.core.attacks import attack as run_attack
    from rdc_studio.core.classifier import build_classifier
    from rdc_studio.core.data import load_dataset
    from rdc_studio.core.models import file_sha256, load_checkpoint

    start = time.perf_counter()
    model = load_checkpoint(args.model)
    clf = build_classifier(model)
    ds = load_dataset("mnist", "test", args.data_root)
    x, y = ds.float_images(slice(0, args.n)), ds.labels[:args.n]
    with torch.no_grad():
        logits = clf(x)
    margins = margin_of(logits, y)
    ce = F.cross_entropy(logits, y, reduction="none")
    saturated = [i for i in range(args.n) if float(ce[i]) == 0.0]
    print(f"clean margins of the first {args.n} test digits: {min(margins):.1f} to {max(margins):.1f}; "
          f"cross-entropy exactly 0 (float32) on {len(saturated)}: {saturated}")

    trace_settings = AttackSettings(method="apgd", loss="ce", norm="linf", eps=args.trace_eps, steps=args.steps)
    xi, yi = ds.float_images(torch.tensor([args.digit])), ds.labels[[args.digit]]
    traces = {}
    for name in args.losses:
        with LOSSES[name]():
            steps, broken = trajectory(clf, xi, yi, [args.digit], trace_settings)
        traces[name] = {"broken": broken, "steps": steps}
        print(f"digit {args.digit}, l-inf {args.trace_eps:g}, {name} cross-entropy: margin {steps[0]['margin']:.1f} "
              f"-> {steps[-1]['margin']:.1f} (lowest {min(s['margin'] for s in steps):.1f}), step size "
              f"{steps[0]['step_size']:.4f} -> {steps[-1]['step_size']:.4f}, broken: {broken}")

    compare = AttackSettings(method="apgd", loss="ce", norm="linf", eps=args.eps, steps=args.steps)
    broken_by = {}
    if saturated:
        xs, ys = ds.float_images(torch.tensor(saturated)), ds.labels[saturated]
        for name in args.losses:
            with LOSSES[name]():
                result = run_to_end(run_attack(clf, xs, ys, compare, example_ids=saturated))
            broken_by[name] = [i for i, s in zip(saturated, result.success.tolist()) if s]
            print(f"APGD-CE, l-inf {args.eps:g}, {args.steps} steps, {name} cross-entropy: broke "
                  f"{len(broken_by[name])} of the {len(saturated)} saturated digits {broken_by[name]}")
    report = {
        "model": args.model, "model_sha256": file_sha256(model.path), "n": args.n,
        "clean_margins": [round(float(m), 3) for m in margins], "saturated": saturated,
        "trace": {"digit": args.digit, "eps": args.trace_eps, "steps": args.steps} | traces,
        "comparison": {"eps": args.eps, "steps": args.steps, "digits": saturated, "broken": broken_by},
        "command": "python benchmarks/ce_saturation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                    f"{args.threads} thread(s), cpu",
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.out:
        from rdc_studio.core.models import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
