"""Speed of the paper's CIFAR-10 network (EDM's conditional VP DDPM++ model) on this machine.

Builds the full-size network of EDM's published ``cifar10-32x32-cond-vp`` configuration
(55,735,299 parameters) with random weights (speed does not depend on the weights), and
prints, measured in one run:

* ms per forward pass of the preconditioned network at batch 1 and batch 10 (median of
  ``--repeats`` after one warm-up), and per image at batch 10;
* GFLOP per image per forward pass, counted with ``torch.utils.flop_counter``;
* ms per classification of one 32x32 image at the ``fast`` preset (16 noise levels x 10
  classes = 160 image passes, in calls of the classifier's call limit: one pass each on a
  CPU), and the time the ``paper`` preset (125 levels, 1,250 image passes) would take at
  the same rate (projected from the measured ms per image pass, not measured);
* with ``--stop-after S``: how long a classification runs on after a stop request made S
  seconds into it (a SIGALRM timer sets the request of its cancellation scope), and the
  network calls it made, of how many inputs.

    python benchmarks/bench_edm.py [--threads N] [--repeats R] [--classify-repeats R] [--device cpu|cuda]
                                   [--stop-after S] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier
from rdc_studio.core.edm_import import random_published_network
from rdc_studio.core.evaluate import hardware_description
from rdc_studio.core.presets import get_preset
from rdc_studio.core.runtime import OperationCancelled, cancellation_scope

CONFIG = "cifar10-32x32-cond-vp"


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_pass(net, batch: int, device: str):
    """One preconditioned forward pass D_y(x; sigma) of ``batch`` images (one class each)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    sigma = torch.full((batch,), 0.5, device=device)
    labels = torch.arange(batch, device=device) % net.config.num_classes

    def run() -> None:
        with torch.no_grad():
            net.denoise_labels(x, sigma, labels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return run


def gflop_per_image(net, device: str, batch: int = 1) -> float:
    """GFLOP per image of one forward pass, counted by ``torch.utils.flop_counter``."""
    run = forward_pass(net, batch, device)
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / batch / 1e9


def stop_latency(clf: DiffusionClassifier, x: torch.Tensor, after: float) -> dict:
    """Classify ``x`` and request a stop ``after`` seconds in: the seconds the pass ran on
    after the request, and the sizes of the network calls it made."""
    calls: list[int] = []
    original = clf.net.denoise_labels
    clf.net.denoise_labels = lambda xn, *rest: calls.append(xn.shape[0]) or original(xn, *rest)
    stop = {"at": None}

    def request(_signum, _frame) -> None:
        stop["at"] = time.perf_counter()

    previous = signal.signal(signal.SIGALRM, request)
    signal.setitimer(signal.ITIMER_REAL, after)
    try:
        with cancellation_scope(lambda: stop["at"] is not None), torch.no_grad():
            clf(x)
        ended = "finished before the request"
    except OperationCancelled:
        ended = "stopped"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        del clf.net.denoise_labels
    late = None if stop["at"] is None else time.perf_counter() - stop["at"]
    return {"stop_after_s": after, "ended": ended, "s_after_stop_request": None if late is None else round(late, 3),
            "network_calls": len(calls), "inputs_per_call_max": max(calls, default=0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per batch size")
    p.add_argument("--classify-repeats", type=int, default=1, help="timed classifications (after no warm-up)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--stop-after", type=float, default=None, metavar="S",
                   help="also measure how fast a classification stops when asked to S seconds in")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = random_published_network(CONFIG).to(args.device)
    params = sum(t.numel() for t in net.parameters())
    given = argv if argv is not None else sys.argv[1:]
    result: dict = {"command": "python benchmarks/bench_edm.py " + " ".join(shlex.quote(a) for a in given),
                    "hardware": hardware_description(), "device": args.device, "threads": args.threads,
                    "network": f"EDM {CONFIG} (VPPrecond + SongUNet DDPM++), random weights",
                    "parameters": params, "precision": "float32"}
    print(f"{result['network']}: {params:,} parameters; {result['hardware']}")

    gflop = gflop_per_image(net, args.device)
    result["gflop_per_image_forward"] = round(gflop, 2)
    print(f"forward pass: {gflop:.1f} GFLOP per image (torch.utils.flop_counter)")
    for batch in (1, 10):
        sec = median_seconds(forward_pass(net, batch, args.device), args.repeats)
        result[f"ms_forward_batch{batch}"] = round(sec * 1000, 1)
        result[f"ms_per_image_forward_batch{batch}"] = round(sec * 1000 / batch, 1)
        print(f"forward pass, batch {batch:2d}: {sec * 1000:9.1f} ms ({sec * 1000 / batch:.1f} ms per image, "
              f"{gflop * batch / sec:.1f} GFLOP/s)")

    fast = get_preset("fast").classifier
    clf = DiffusionClassifier(net, ClassifierSettings(**fast)).to(args.device)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(args.device)

    def classify() -> None:
        with torch.no_grad():
            clf(x)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    sec = median_seconds(classify, args.classify_repeats, warmup=0)
    passes = fast["steps"] * net.config.num_classes
    per_pass = sec / passes
    paper_passes = get_preset("paper").classifier["steps"] * net.config.num_classes
    result.update({
        "classify_preset": "fast", "classify_levels": fast["steps"], "classify_image_passes": passes,
        "ms_per_classification_fast": round(sec * 1000, 1),
        "ms_per_image_pass_in_classification": round(per_pass * 1000, 1),
        "paper_preset_image_passes": paper_passes,
        "projected_s_per_classification_paper": round(per_pass * paper_passes, 1),
    })
    print(f"classification, fast preset (T = {fast['steps']}, {passes} image passes, 1 image): {sec * 1000:.0f} ms "
          f"({per_pass * 1000:.1f} ms per image pass)")
    print(f"paper preset (T = 125, {paper_passes} image passes): ~{per_pass * paper_passes:.0f} s per image at "
          "that rate (projected, not measured)")
    if args.stop_after is not None:
        stop = stop_latency(clf, x, args.stop_after)
        result["stop"] = stop
        print(f"stop requested {args.stop_after:g} s into a classification: {stop['ended']}, "
              f"{stop['s_after_stop_request']} s after the request ({stop['network_calls']} network calls of at "
              f"most {stop['inputs_per_call_max']} inputs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
