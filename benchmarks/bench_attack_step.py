"""Cost of one attack iteration against the full RDC (likelihood maximisation, then classifier).

An attack iteration is one forward pass of the RDC on a batch plus, for gradient attacks,
one backward pass to the input. Both dominate every robustness evaluation: APGD runs one
per iteration, Square one forward pass per query. For each gradient mode (``smooth``,
``exact``, ``bpda``) and batch size this prints the median milliseconds per iteration and per
image-iteration, with and without the input gradient, and (``--count-ops``) how many ATen
operator calls the profiler records for one iteration (nested calls included, e.g. conv2d
-> convolution -> the backend's kernel). On a GPU the innermost calls are kernel launches,
so a high count makes small batches launch-bound rather than compute-bound.

    python benchmarks/bench_attack_step.py                        # CPU, batch 10
    python benchmarks/bench_attack_step.py --device cuda --batch-sizes 50,100,200
    python benchmarks/bench_attack_step.py --count-ops --batch-sizes 1 --json ops.json
    python benchmarks/bench_attack_step.py --modes smooth --batch-sizes 1,10 --call-inputs 512,128,64,32

``--call-inputs`` compares sizes of the classifier's gradient network calls
(``core.classifier.MAX_GRADIENT_CALL_INPUTS``; the default is the shipped size), ``--steps``
the classifier's noise levels (e.g. 256, the app's slowest setting).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from rdc_studio.core import classifier as classifier_module
from rdc_studio.core.classifier import build_classifier
from rdc_studio.core.data import load_dataset
from rdc_studio.core.defense import build_defense, purify_settings, resolve_device, setup_threads
from rdc_studio.core.evaluate import hardware_description
from rdc_studio.core.models import load_checkpoint
from rdc_studio.core.rdc import RobustDiffusionClassifier


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attack_iteration(rdc: RobustDiffusionClassifier, x: torch.Tensor, y: torch.Tensor, with_grad: bool) -> None:
    """One RDC forward pass on ``x`` and, when ``with_grad``, the cross-entropy gradient in ``x``."""
    xr = x.clone().requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        logits = rdc(xr)
        if with_grad:
            torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), xr)


def time_iteration(rdc, x, y, with_grad: bool, repeats: int) -> float:
    """Median seconds of one attack iteration (after one warm-up)."""
    attack_iteration(rdc, x, y, with_grad)
    times = []
    for _ in range(repeats):
        _sync(x.device)
        t0 = time.perf_counter()
        attack_iteration(rdc, x, y, with_grad)
        _sync(x.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_aten_ops(rdc, x, y, with_grad: bool) -> int:
    """ATen operator calls of one attack iteration, nested ones included (the profiler's count)."""
    from torch.profiler import ProfilerActivity, profile

    attack_iteration(rdc, x, y, with_grad)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attack_iteration(rdc, x, y, with_grad)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="bundled model name or checkpoint path (default: the default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--modes", default="smooth,exact,bpda", help="gradient modes, comma-separated")
    p.add_argument("--batch-sizes", default="10", help="comma-separated")
    p.add_argument("--steps", type=int, default=None, help="classifier noise levels (default: the model card's)")
    p.add_argument("--call-inputs", default="",
                   help="comma-separated sizes of the gradient network calls to compare (default: the shipped one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    p.add_argument("--count-ops", action="store_true", help="also count the ATen operators of one iteration")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    model = load_checkpoint(args.model, device=device)
    clf = build_classifier(model, device, **({"steps": args.steps} if args.steps else {}))
    purify = purify_settings(model)
    data = load_dataset(model.card.get("dataset", "mnist"), "test", args.data_root)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    print(f"model {model.name}, device {device}, LM {purify.steps} steps, classifier T = {clf.settings.steps}; "
          f"{hardware_description()}")
    limits = classifier_module.MAX_GRADIENT_CALL_INPUTS
    shipped = limits.get(device.type, limits["cuda"])
    call_sizes = [int(c) for c in args.call_inputs.split(",") if c.strip()] or [shipped]
    print(f"{'mode':7s} {'batch':>5s} {'calls':>5s} {'grad':>5s} {'ms / iteration':>15s} {'ms / image':>11s}"
          + (f" {'ATen ops':>9s}" if args.count_ops else ""))
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        rdc = build_defense("rdc", model, clf, purify=purify, grad_mode=mode, device=str(device)).eval()
        for batch in batch_sizes:
            x = data.float_images(slice(0, batch)).to(device)
            y = data.labels[:batch].to(device)
            for call_inputs in call_sizes:
                limits[device.type] = call_inputs  # read at every pass
                try:
                    # the forward-only iteration makes no gradient calls: timed once per batch
                    for with_grad in ((True, False) if call_inputs == call_sizes[-1] else (True,)):
                        seconds = time_iteration(rdc, x, y, with_grad, args.repeats)
                        row = {"mode": mode, "batch": batch, "grad": with_grad, "ms_per_iteration": 1000 * seconds,
                               "ms_per_image": 1000 * seconds / batch}
                        if with_grad:
                            row["gradient_call_inputs"] = call_inputs
                        if args.count_ops:
                            row["aten_ops"] = count_aten_ops(rdc, x, y, with_grad)
                        rows.append(row)
                        print(f"{mode:7s} {batch:5d} {call_inputs if with_grad else '-':>5} {str(with_grad):>5s} "
                              f"{row['ms_per_iteration']:15.1f} {row['ms_per_image']:11.2f}"
                              + (f" {row['aten_ops']:9d}" if args.count_ops else ""), flush=True)
                finally:
                    limits[device.type] = shipped
    result = {"model": model.name, "device": str(device), "hardware": hardware_description(),
              "command": "python benchmarks/bench_attack_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows}
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        print(f"peak GPU memory {result['max_memory_gb']:.1f} GB")
    if args.json:
        from rdc_studio.core.models import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
