"""Classification speed of the diffusion classifier on this machine.

Prints, measured in one run: ms per image for the default model and settings (single
image and batched), for a multi-head network its time against per-class evaluation and
their ratio (timed in interleaved pairs; a class-embedding network has no shared pass to
compare, so this is skipped), and the achieved GFLOP/s against the measured fp32 matmul
throughput.

    python benchmarks/bench_classify.py [--model NAME|PATH] [--steps T] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from rdc_studio.core.classifier import build_classifier
from rdc_studio.core.evaluate import hardware_description
from rdc_studio.core.models import load_checkpoint


def time_call(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_times(fast, slow, rounds: int) -> tuple[float, float, float]:
    """Interleaved timing of two calls: median times of each and the median per-round ratio.

    Alternating the calls makes their ratio robust to the machine's speed drifting during
    the run (a shared virtual machine varies by 10-20% over seconds).
    """
    fast(), slow()
    pairs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fast()
        t1 = time.perf_counter()
        slow()
        t2 = time.perf_counter()
        pairs.append((t1 - t0, t2 - t1))
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[1] / p[0] for p in pairs))


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    t = time_call(lambda: a @ b, repeats)
    return 2 * size**3 / t / 1e9


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=None, help="noise levels (default: the model card's)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.model)
    clf = build_classifier(model, "cpu", steps=args.steps)
    cfg = model.net.config
    g = torch.Generator().manual_seed(0)
    one = torch.rand(1, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    batch = torch.rand(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    with torch.no_grad():
        t_single = time_call(lambda: clf(one), args.repeats)
        t_batch = time_call(lambda: clf(batch), max(3, args.repeats // 3)) / args.batch
        multihead = cfg.architecture == "multihead"
        if multihead:
            _, t_perclass, speedup = paired_times(lambda: clf(one), lambda: clf(one, per_class=True), args.repeats)
            flops_perclass = count_flops(lambda: clf(one, per_class=True))
        flops_single = count_flops(lambda: clf(one))
    peak = matmul_gflops()
    s = clf.settings
    result = {
        "model": model.name, "architecture": cfg.architecture, "steps": s.steps, "weighting": s.weighting,
        "threads": args.threads, "hardware": hardware_description(),
        "ms_single_image": t_single * 1e3, "ms_per_image_batched": t_batch * 1e3, "batch": args.batch,
        "ms_per_class_mode": t_perclass * 1e3 if multihead else None,
        "multihead_speedup": speedup if multihead else None,
        "gflop_per_image": flops_single / 1e9,
        "gflop_per_image_per_class_mode": flops_perclass / 1e9 if multihead else None,
        "gflops_single": flops_single / t_single / 1e9, "gflops_batched": flops_single / t_batch / 1e9,
        "matmul_fp32_gflops": peak,
    }
    print(f"model {model.name} ({cfg.architecture}), T={s.steps} {s.weighting} [{s.sigma_min}, {s.sigma_max}], "
          f"{args.threads} threads")
    print(f"hardware: {result['hardware']}")
    print(f"single image      : {result['ms_single_image']:8.1f} ms")
    print(f"batched ({args.batch:3d})     : {result['ms_per_image_batched']:8.1f} ms/image")
    if multihead:
        print(f"per-class mode    : {result['ms_per_class_mode']:8.1f} ms/image  (K={cfg.num_classes} separate passes)")
        print(f"multi-head speedup: {result['multihead_speedup']:8.2f} x   "
              f"(median of {args.repeats} interleaved pairs; FLOP ratio {flops_perclass / flops_single:.2f} x)")
    else:
        print(f"per-class mode    :      n/a  ({cfg.architecture} network: one pass per class, batched)")
    print(f"work              : {result['gflop_per_image']:8.3f} GFLOP/image")
    print(f"achieved          : {result['gflops_single']:8.1f} GFLOP/s single, {result['gflops_batched']:.1f} GFLOP/s "
          f"batched; fp32 matmul peak {peak:.1f} GFLOP/s "
          f"({result['gflops_batched'] / peak:.0%} of it batched)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
