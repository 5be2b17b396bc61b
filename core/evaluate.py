"""Clean-accuracy evaluation as a generator of step records, and report helpers."""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .classifier import DiffusionClassifier
from .data import TensorDataset


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class EvalStep:
    """Progress of a clean evaluation after ``done`` examples."""

    done: int
    total: int
    correct: int
    elapsed_seconds: float
    predictions: np.ndarray  # predictions of the examples of this batch
    labels: np.ndarray

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.done)


def evaluate_clean(clf: DiffusionClassifier, dataset: TensorDataset, n: int | None = None,
                   batch_size: int = 50, cancelled=lambda: False) -> Iterator[EvalStep]:
    """Classify the first ``n`` examples of ``dataset``, yielding one record per batch."""
    total = len(dataset) if n is None else min(n, len(dataset))
    correct, start = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, total, batch_size):
            if cancelled():
                return
            j = min(i + batch_size, total)
            x = dataset.float_images(slice(i, j)).to(clf.device)
            y = dataset.labels[i:j]
            pred = clf(x).argmax(1).cpu()
            correct += int((pred == y).sum())
            yield EvalStep(j, total, correct, time.perf_counter() - start, pred.numpy().copy(), y.numpy().copy())


def hardware_description() -> str:
    """A short description of the machine the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    desc = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def clean_report(steps: list[EvalStep], model: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Assemble the JSON report of a finished clean evaluation."""
    last = steps[-1]
    lo, hi = wilson_interval(last.correct, last.done)
    return {
        "clean_acc": last.accuracy,
        "n": last.done,
        "correct": last.correct,
        "ci95": [lo, hi],
        "seconds": last.elapsed_seconds,
        "seconds_per_image": last.elapsed_seconds / max(1, last.done),
        "model": model,
        "settings": settings,
        "hardware": hardware_description(),
    }


@dataclass(frozen=True)
class RobustEvalStep:
    """Progress of an attack evaluation after ``done`` examples."""

    done: int
    total: int
    clean_correct: int
    robust_correct: int
    elapsed_seconds: float
    queries: int
    max_linf: float
    max_l2: float


def evaluate_attack(model: torch.nn.Module, dataset: TensorDataset, settings, n: int | None = None,
                    batch_size: int = 25, cancelled=lambda: False) -> Iterator[RobustEvalStep]:
    """Attack the first ``n`` examples batch by batch; robust = correct after the attack.

    ``settings`` is a :class:`core.attacks.AttackSettings`; examples are taken as stored
    (8-bit) and every adversarial example is validated by the attack itself.
    """
    from .attacks import run_attack

    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    total = len(dataset) if n is None else min(n, len(dataset))
    clean = robust = queries = 0
    max_linf = max_l2 = 0.0
    start = time.perf_counter()
    for i in range(0, total, batch_size):
        if cancelled():
            return
        j = min(i + batch_size, total)
        x = dataset.float_images(slice(i, j)).to(device)
        y = dataset.labels[i:j].to(device)
        res = run_attack(model, x, y, settings)
        clean += int(res.clean_correct.sum())
        robust += int((~res.success).sum())
        queries += res.queries * (j - i)
        max_linf = max(max_linf, float(res.linf.max()))
        max_l2 = max(max_l2, float(res.l2.max()))
        yield RobustEvalStep(j, total, clean, robust, time.perf_counter() - start, queries, max_linf, max_l2)


def robust_report(steps: list[RobustEvalStep], model: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """JSON report of a finished attack evaluation."""
    last = steps[-1]
    return {
        "clean_acc": last.clean_correct / last.done,
        "robust_acc": last.robust_correct / last.done,
        "n": last.done,
        "ci95": list(wilson_interval(last.clean_correct, last.done)),
        "robust_ci95": list(wilson_interval(last.robust_correct, last.done)),
        "seconds": last.elapsed_seconds,
        "seconds_per_image": last.elapsed_seconds / max(1, last.done),
        "forward_backward_passes_per_image": last.queries / max(1, last.done),
        "max_linf": last.max_linf,
        "max_l2": last.max_l2,
        "model": model,
        "settings": settings,
        "hardware": hardware_description(),
    }
