"""Clean-accuracy evaluation as a generator of step records, and report helpers."""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
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
class ExampleResult:
    """The outcome for one test example (what resumable state and shards store)."""

    index: int
    label: int
    clean_correct: bool
    robust_correct: bool
    linf: float
    l2: float
    queries: int


@dataclass(frozen=True)
class RobustEvalStep:
    """Progress of an attack evaluation: the examples finished in this batch."""

    done: int
    total: int
    results: tuple[ExampleResult, ...]
    elapsed_seconds: float


def evaluate_attack(model: torch.nn.Module, dataset: TensorDataset, settings, indices: list[int],
                    batch_size: int = 25, skip: set[int] | frozenset = frozenset(),
                    cancelled=lambda: False) -> Iterator[RobustEvalStep]:
    """Attack the examples ``indices`` batch by batch (robust = still correct after it).

    ``settings`` is a :class:`core.attacks.AttackSettings`. Examples are taken as stored
    (8-bit); every adversarial example is validated by the attack. Random starts are
    seeded per example, so results do not depend on batching, resuming or sharding.
    Indices in ``skip`` (already done, e.g. from a resumed state) are not attacked.
    """
    from .attacks import run_attack

    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    todo = [i for i in indices if i not in skip]
    start = time.perf_counter()
    done = len(indices) - len(todo)
    for b in range(0, len(todo), batch_size):
        if cancelled():
            return
        batch = todo[b:b + batch_size]
        idx = torch.tensor(batch)
        x = dataset.float_images(idx).to(device)
        y = dataset.labels[idx].to(device)
        res = run_attack(model, x, y, settings, example_ids=batch)
        per = res.queries
        results = tuple(
            ExampleResult(int(i), int(y[k]), bool(res.clean_correct[k]), bool(~res.success[k]),
                          float(res.linf[k]), float(res.l2[k]), per)
            for k, i in enumerate(batch))
        done += len(batch)
        yield RobustEvalStep(done, len(indices), results, time.perf_counter() - start)


def robust_report(results: list[ExampleResult], seconds: float, model: dict[str, Any],
                  settings: dict[str, Any]) -> dict[str, Any]:
    """JSON report of a finished attack evaluation (examples sorted by index)."""
    results = sorted(results, key=lambda r: r.index)
    n = len(results)
    clean = sum(r.clean_correct for r in results)
    robust = sum(r.robust_correct for r in results)
    queries = sum(r.queries for r in results)
    return {
        "clean_acc": clean / max(1, n),
        "robust_acc": robust / max(1, n),
        "n": n,
        "ci95": list(wilson_interval(clean, n)),
        "robust_ci95": list(wilson_interval(robust, n)),
        "seconds": seconds,
        "seconds_per_image": seconds / max(1, n),
        "forward_backward_passes_per_image": queries / max(1, n),
        "max_linf": max((r.linf for r in results), default=0.0),
        "max_l2": max((r.l2 for r in results), default=0.0),
        "per_example": [[r.index, r.label, int(r.clean_correct), int(r.robust_correct)] for r in results],
        "model": model,
        "settings": settings,
        "hardware": hardware_description(),
    }


class ResumeState:
    """Per-example results appended to a JSON-lines file, so a stopped run resumes.

    The file starts with a header line holding the run's settings; resuming with
    different settings is refused.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        import json

        self.path = Path(path)
        self.results: dict[int, ExampleResult] = {}
        header = json.dumps({"settings": settings}, sort_keys=True)
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # cut off mid-line: start the next line cleanly
                with open(self.path, "a") as f:
                    f.write("\n")
            lines = text.splitlines()
            if not lines or lines[0] != header:
                raise ValueError(f"{self.path}: state of a run with other settings; use another --state file")
            for line in lines[1:]:
                try:
                    r = ExampleResult(**json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue  # a line cut off by an interruption
                self.results[r.index] = r
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(header + "\n")

    def add(self, results) -> None:
        import json
        import os
        from dataclasses import asdict

        with open(self.path, "a") as f:
            for r in results:
                f.write(json.dumps(asdict(r)) + "\n")
                self.results[r.index] = r
            f.flush()
            os.fsync(f.fileno())
