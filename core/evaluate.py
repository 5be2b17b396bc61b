"""Clean-accuracy evaluation as a generator of step records, and report helpers."""
from __future__ import annotations

import itertools
import json
import math
import numbers
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

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


def evaluate_clean(clf: torch.nn.Module, dataset: TensorDataset, n: int | None = None,
                   batch_size: int = 50, cancelled: Callable[[], bool] = lambda: False) -> Iterator[EvalStep]:
    """Classify the first ``n`` examples of ``dataset`` with ``clf`` (a diffusion classifier
    or any defense returning logits), yielding one record per batch. No gradients are
    computed (the RDC's likelihood maximisation takes its own input gradients)."""
    total = len(dataset) if n is None else min(n, len(dataset))
    correct, start = 0, time.perf_counter()
    device = module_device(clf)
    with torch.no_grad():
        for i in range(0, total, batch_size):
            if cancelled():
                return
            j = min(i + batch_size, total)
            x = dataset.float_images(slice(i, j)).to(device)
            y = dataset.labels[i:j]
            pred = clf(x).argmax(1).cpu()
            correct += int((pred == y).sum())
            yield EvalStep(j, total, correct, time.perf_counter() - start, pred.numpy().copy(), y.numpy().copy())


def hardware_description(device: torch.device | str | None = None) -> str:
    """A short description of the machine the numbers were measured on (and of ``device``, the
    one the work ran on, when given)."""
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
    return desc if device is None else f"{desc}, device {device}"


def clean_report(steps: list[EvalStep], model: dict[str, Any], settings: dict[str, Any]) -> EvalReport:
    """The report of a finished clean evaluation."""
    last = steps[-1]
    lo, hi = wilson_interval(last.correct, last.done)
    return EvalReport(clean_acc=last.accuracy, n=last.done, ci95=[lo, hi], seconds=last.elapsed_seconds,
                      seconds_per_image=last.elapsed_seconds / max(1, last.done), model=model, settings=settings,
                      hardware=hardware_description(), correct=last.correct)


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
    broken_by: str | None = None  # ensemble: "clean", the attack that broke it, or None (robust)
    # its batch's wall time / batch size (None in states written before timings); not part of the result
    seconds: float | None = field(default=None, compare=False)
    # core.attacks.ATTACK_REVISION of the code that attacked it (None: a state line written before
    # lines recorded it, counted as revision 1); not part of the result
    attack_revision: int | None = field(default=None, compare=False)
    # sha256 of the example's stored image (uint8 bytes) as attacked, so a state resumed on other
    # data is refused (None: a line written before lines recorded it); not part of the result
    image_sha256: str | None = field(default=None, compare=False)
    # hardware_description(device) of the run that attacked it, so a report over a state resumed
    # on other hardware says so (None: a line written before lines recorded it); not part of the result
    hardware: str | None = field(default=None, compare=False)


def example_image_sha256(dataset: TensorDataset, index: int) -> str:
    """The sha256 (hex) of example ``index``'s stored image: its uint8 bytes, (C, H, W) order."""
    import hashlib

    return hashlib.sha256(dataset.images[index].contiguous().numpy().tobytes()).hexdigest()


def check_state_examples(path: str | Path, results: dict[int, ExampleResult], dataset: TensorDataset) -> None:
    """Refuse a resumed state whose examples are not this dataset's: every line's label, and
    its image digest where it recorded one, must be those of the example of its index.

    Raises
    ------
    ValueError
        Naming the state file and the first example that differs.
    """
    for index in sorted(results):
        r = results[index]
        if not 0 <= index < len(dataset):
            problem = f"its example {index} is beyond the {len(dataset)} examples of this data"
        elif int(dataset.labels[index]) != r.label:
            problem = f"its example {index} is labelled {r.label}, this data's {int(dataset.labels[index])}"
        elif r.image_sha256 is not None and r.image_sha256 != example_image_sha256(dataset, index):
            problem = f"its example {index} is another image than this data's"
        else:
            continue
        raise ValueError(f"{path}: state of a run on other data ({problem}; another --data-root?); "
                         f"use another state file")


@dataclass(frozen=True)
class RobustEvalStep:
    """Progress of an attack evaluation: the examples finished in this batch."""

    done: int
    total: int
    results: tuple[ExampleResult, ...]
    elapsed_seconds: float
    attack_seconds: dict[str, float] = field(default_factory=dict)  # ensemble: per attack, this batch
    attack_queries: dict[str, int] = field(default_factory=dict)


PER_EXAMPLE_COLUMNS = ("index", "label", "clean_correct", "robust_correct", "broken_by")


@dataclass(frozen=True)
class ExampleRow:
    """One example of a report's ``per_example`` table, read by column name."""

    index: int
    label: int
    clean_correct: bool
    robust_correct: bool
    broken_by: str | None = None


def example_rows(report: dict[str, Any]) -> list[ExampleRow]:
    """The ``per_example`` table of a JSON attack report as :class:`ExampleRow` records
    (columns from ``per_example_columns``; reports of single attacks have the first four)."""
    columns = report.get("per_example_columns", PER_EXAMPLE_COLUMNS[:4])
    rows = []
    for entry in report["per_example"]:
        row = dict(zip(columns, entry))
        rows.append(ExampleRow(int(row["index"]), int(row["label"]), bool(row["clean_correct"]),
                               bool(row["robust_correct"]), row.get("broken_by")))
    return rows


@dataclass(frozen=True)
class AttackRow:
    """One attack of an ensemble report: what it broke and the robust accuracy after it."""

    attack: str
    label: str
    attacked: int  # examples still unbroken before it
    success: int  # of those, the examples it broke
    robust_acc: float  # after it and all attacks before it
    robust_ci95: list[float]


@dataclass
class EvalReport:
    """The report of an evaluation, clean (``robust_acc`` None) or under attack.

    :meth:`to_dict` is the JSON file ``rdc eval --out`` writes; :meth:`from_dict` reads one.
    """

    clean_acc: float
    n: int
    ci95: list[float]
    seconds: float  # wall time of this run
    seconds_per_image: float
    model: dict[str, Any]
    settings: dict[str, Any]
    hardware: str
    correct: int | None = None  # clean evaluations
    robust_acc: float | None = None  # attack evaluations, from here on
    robust_ci95: list[float] | None = None
    timing: dict[str, Any] | None = None
    forward_backward_passes_per_image: float | None = None
    max_linf: float | None = None
    max_l2: float | None = None
    examples: list[ExampleRow] = field(default_factory=list)
    seeds: dict[str, Any] | None = None
    per_attack: list[AttackRow] | None = None  # ensembles
    attack_seconds_this_run: dict[str, float] | None = None
    attack_forward_passes_this_run: dict[str, int] | None = None
    attack_revision: int | None = None  # core.attacks.ATTACK_REVISION of the code that attacked (None: before 2)
    # examples per revision, when a resumed state mixes examples attacked by different revisions
    examples_per_attack_revision: dict[str, int] | None = None
    # examples per machine (hardware_description with the device; "not recorded" for lines written
    # before they recorded it), when any example recorded one: ``hardware`` is then complete
    examples_per_hardware: dict[str, int] | None = None

    @property
    def attacked(self) -> bool:
        """Whether this is the report of an attack evaluation."""
        return self.robust_acc is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the keys and order ``rdc eval`` has always written)."""
        if not self.attacked:
            return {"clean_acc": self.clean_acc, "n": self.n, "correct": self.correct, "ci95": list(self.ci95),
                    "seconds": self.seconds, "seconds_per_image": self.seconds_per_image, "model": self.model,
                    "settings": self.settings, "hardware": self.hardware}
        ensemble = self.per_attack is not None
        columns = PER_EXAMPLE_COLUMNS if ensemble else PER_EXAMPLE_COLUMNS[:4]
        d = {"clean_acc": self.clean_acc, "robust_acc": self.robust_acc, "n": self.n, "ci95": list(self.ci95),
             "robust_ci95": list(self.robust_ci95 or []), "seconds": self.seconds,
             "seconds_per_image": self.seconds_per_image, "timing": self.timing,
             "forward_backward_passes_per_image": self.forward_backward_passes_per_image,
             "max_linf": self.max_linf, "max_l2": self.max_l2,
             "per_example": [[getattr(r, c) if c == "broken_by" else int(getattr(r, c)) for c in columns]
                             for r in self.examples],
             "model": self.model, "settings": self.settings, "hardware": self.hardware}
        if self.seeds is not None:
            d["seeds"] = self.seeds
        if self.attack_revision is not None:
            d["attack_revision"] = self.attack_revision
        if self.examples_per_attack_revision is not None:
            d["examples_per_attack_revision"] = dict(self.examples_per_attack_revision)
        if self.examples_per_hardware is not None:
            d["examples_per_hardware"] = dict(self.examples_per_hardware)
        if ensemble:
            d["per_attack"] = [asdict(row) for row in self.per_attack]
            d["per_example_columns"] = list(PER_EXAMPLE_COLUMNS)
            d["attack_seconds_this_run"] = dict(self.attack_seconds_this_run or {})
            d["attack_forward_passes_this_run"] = dict(self.attack_forward_passes_this_run or {})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalReport":
        """Read the JSON form (clean or attack report)."""
        names = {f for f in cls.__dataclass_fields__} - {"examples", "per_attack"}
        report = cls(**{k: v for k, v in d.items() if k in names})
        if "per_example" in d:
            report.examples = example_rows(d)
        if "per_attack" in d:
            report.per_attack = [AttackRow(**row) for row in d["per_attack"]]
        return report


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s tensors: its first buffer, else its first parameter (CPU when
    it has neither).

    Buffers come first because the diffusion classifier's noise bank (a buffer) sets the
    device its inputs must go to; a plain CNN has parameters but no buffers.
    """
    first = next(itertools.chain(model.buffers(), model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def evaluate_attack(model: torch.nn.Module, dataset: TensorDataset, settings, indices: list[int],
                    batch_size: int = 25, skip: set[int] | frozenset = frozenset(),
                    cancelled: Callable[[], bool] = lambda: False) -> Iterator[RobustEvalStep]:
    """Attack the examples ``indices`` batch by batch (robust = still correct after it).

    ``settings`` is a :class:`core.attacks.AttackSettings`. Examples are taken as stored
    (8-bit); every adversarial example is validated by the attack. Random starts are
    seeded per example, so results do not depend on batching, resuming or sharding.
    Indices in ``skip`` (already done, e.g. from a resumed state) are not attacked.
    """
    from .attacks import attack, run_to_end

    def attack_batch(x: torch.Tensor, y: torch.Tensor, batch: list[int]):
        res = run_to_end(attack(model, x, y, settings, cancelled, example_ids=batch))
        if res is None:
            return None
        per = [res.queries] * len(batch) if res.example_queries is None else res.example_queries.tolist()
        rows = [(int(i), int(y[k]), bool(res.clean_correct[k]), bool(~res.success[k]), float(res.linf[k]),
                 float(res.l2[k]), int(per[k])) for k, i in enumerate(batch)]
        return rows, {}, {}

    return _attack_batches(model, dataset, indices, batch_size, skip, cancelled, attack_batch)


def _attack_batches(model: torch.nn.Module, dataset: TensorDataset, indices: list[int], batch_size: int,
                    skip: set[int] | frozenset, cancelled: Callable[[], bool],
                    attack_batch: Callable) -> Iterator[RobustEvalStep]:
    """The batch loop of :func:`evaluate_attack` and :func:`evaluate_ensemble`: ``attack_batch(x, y,
    batch)`` returns the :class:`ExampleResult` fields of each example (without the seconds and the
    attack revision) and the batch's per-attack seconds and passes, or None when cancelled."""
    from .attacks.base import ATTACK_REVISION

    device = module_device(model)
    machine = hardware_description(device)
    todo = [i for i in indices if i not in skip]
    start = time.perf_counter()
    done = len(indices) - len(todo)
    for b in range(0, len(todo), batch_size):
        if cancelled():
            return
        batch = todo[b:b + batch_size]
        batch_start = time.perf_counter()
        idx = torch.tensor(batch)
        out = attack_batch(dataset.float_images(idx).to(device), dataset.labels[idx].to(device), batch)
        if out is None:  # cancelled
            return
        rows, seconds, queries = out
        each = (time.perf_counter() - batch_start) / len(batch)
        done += len(batch)
        yield RobustEvalStep(done, len(indices),
                             tuple(ExampleResult(*row, seconds=each, attack_revision=ATTACK_REVISION,
                                                 image_sha256=example_image_sha256(dataset, row[0]),
                                                 hardware=machine) for row in rows),
                             time.perf_counter() - start, seconds, queries)


def evaluate_ensemble(model: torch.nn.Module, dataset: TensorDataset, members: list, indices: list[int],
                      batch_size: int = 25, skip: set[int] | frozenset = frozenset(),
                      surrogate: torch.nn.Module | None = None,
                      cancelled: Callable[[], bool] = lambda: False) -> Iterator[RobustEvalStep]:
    """Like :func:`evaluate_attack`, for an ensemble (a list of
    :class:`core.attacks.EnsembleMember`): each attack runs only on the examples still
    unbroken, and every :class:`ExampleResult` records the attack that broke it.
    ``surrogate`` is the model transfer attacks are crafted on.
    """
    from .attacks import ensemble_attack, run_to_end

    def attack_batch(x: torch.Tensor, y: torch.Tensor, batch: list[int]):
        res = run_to_end(ensemble_attack(model, x, y, members, example_ids=batch, surrogate=surrogate,
                                         cancelled=cancelled))
        if res is None:
            return None
        rows = [(int(i), int(y[k]), bool(res.clean_correct[k]), bool(res.robust[k]), float(res.linf[k]),
                 float(res.l2[k]), int(res.queries[k]), res.broken_by[k]) for k, i in enumerate(batch)]
        return rows, dict(res.seconds), dict(res.attack_queries)

    return _attack_batches(model, dataset, indices, batch_size, skip, cancelled, attack_batch)


def attack_table(results: list[ExampleResult], attacks: list[tuple[str, str]]) -> list[AttackRow]:
    """Per-attack rows of an ensemble: examples each attack broke (its own successes) and
    the robust accuracy after it and all attacks before it, with Wilson 95% intervals.

    ``attacks`` is the ensemble's order as (name, label) pairs.
    """
    n = len(results)
    names = {name for name, _ in attacks}
    for r in results:
        if (r.broken_by is None) != r.robust_correct or (r.broken_by == "clean") == r.clean_correct \
                or (r.broken_by not in names | {None, "clean"}):
            raise ValueError(f"example {r.index}: inconsistent result {r}")
    remaining = sum(r.clean_correct for r in results)
    rows = []
    for name, label in attacks:
        broken = sum(r.broken_by == name for r in results)
        rows.append(AttackRow(name, label, remaining, broken, (remaining - broken) / max(1, n),
                              list(wilson_interval(remaining - broken, n))))
        remaining -= broken
    return rows


def threat_model(report: dict[str, Any]) -> tuple[str, float]:
    """(norm, eps) of an attack report, single attack or ensemble."""
    attack = report["settings"].get("attack_settings", {})
    members = [attack] if "norm" in attack else list(attack.values())
    if not members:
        raise ValueError("the report has no attack settings")
    threats = {(m["norm"], float(m["eps"])) for m in members}
    if len(threats) != 1:
        raise ValueError(f"the report's attacks use several threat models: {sorted(threats)}")
    return threats.pop()


def run_label(report: dict[str, Any]) -> str:
    """A short name of an evaluation: defense, gradient mode and attack (``rdc smooth ensemble``)."""
    st = report["settings"]
    return " ".join(str(part) for part in (st.get("defense"), st.get("grad"), st.get("attack")) if part)


# what decides an example's class: two reports must agree on these to be one model's results
DECISION_SETTINGS = ("dataset", "split", "defense", "classifier", "purify", "binarize")


MAX_INDICES = 10_000_000


def parse_indices(text: str) -> tuple[int, ...]:
    """Example indices from ``"1,13,28-30"`` (comma-separated indices and inclusive ranges),
    sorted and without repeats.

    Raises
    ------
    ValueError
        For anything else (negative numbers, a range that runs backwards, an empty list).
    """
    picked: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"indices: {part!r} is not an index or a range like 10-19")
        lo, hi = int(first), int(last) if sep else int(first)
        if hi < lo:
            raise ValueError(f"indices: the range {part} runs backwards")
        if hi - lo + len(picked) >= MAX_INDICES:  # checked before the range is built in memory
            raise ValueError(f"indices: more than {MAX_INDICES:,} examples (no split has that many)")
        picked.update(range(lo, hi + 1))
    return tuple(sorted(picked))


def format_indices(indices) -> str:
    """The shortest :func:`parse_indices` spelling of ``indices`` (``[1, 2, 3, 7]`` -> ``"1-3,7"``)."""
    parts: list[str] = []
    ordered = sorted(set(int(i) for i in indices))
    start = 0
    for k in range(1, len(ordered) + 1):
        if k == len(ordered) or ordered[k] != ordered[k - 1] + 1:
            lo, hi = ordered[start], ordered[k - 1]
            parts.append(str(lo) if lo == hi else f"{lo},{hi}" if hi == lo + 1 else f"{lo}-{hi}")
            start = k
    return ",".join(parts)


def _purifier_label(purifier: dict[str, Any]) -> str:
    """A report's purifier for a message (``the model itself`` when it has none)."""
    if not purifier:
        return "the model itself"
    return str(purifier.get("name")) + (f" (sha256 {purifier['sha256'][:8]})" if purifier.get("sha256") else "")


def _same_measurement(reports: list[dict[str, Any]], labels: list[str]) -> tuple[str, float]:
    """The threat model of ``reports`` after checking that they attack one model with one data
    split, decision settings and threat model (``ValueError`` naming the first that does not)."""
    base, base_threat = reports[0], threat_model(reports[0])
    for label, rep in zip(labels[1:], reports[1:]):
        if rep["model"].get("name") != base["model"].get("name"):
            raise ValueError(f"{label}: model {rep['model'].get('name')}, not {base['model'].get('name')}")
        if rep["model"].get("sha256") and base["model"].get("sha256") and rep["model"]["sha256"] != base["model"]["sha256"]:
            raise ValueError(f"{label}: model {rep['model']['name']} of other weights (sha256 "
                             f"{rep['model']['sha256'][:8]}, not {base['model']['sha256'][:8]})")
        theirs, ours = (r["model"].get("purifier") or {} for r in (rep, base))
        if bool(theirs) != bool(ours) or (theirs.get("sha256") and ours.get("sha256")
                                          and theirs["sha256"] != ours["sha256"]):
            raise ValueError(f"{label}: purified by {_purifier_label(theirs)}, not by {_purifier_label(ours)}")
        for key in DECISION_SETTINGS:
            if rep["settings"].get(key) != base["settings"].get(key):
                raise ValueError(f"{label}: {key} {rep['settings'].get(key)!r} differs from "
                                 f"{labels[0]}'s {base['settings'].get(key)!r}")
        if threat_model(rep) != base_threat:
            raise ValueError(f"{label}: threat model {threat_model(rep)}, not {base_threat}")
    return base_threat


def with_follow_up(report: dict[str, Any], follow_up: dict[str, Any], label: str = "follow-up") -> dict[str, Any]:
    """``report`` with the results of a follow-up evaluation of some of its examples (typically
    its survivors, attacked again with a larger budget: ``rdc eval --indices``).

    An example stays robust only if the follow-up, where it attacked it, left it robust too
    (one the follow-up finds misclassified unperturbed is broken: a distance-0 example);
    ``robust_acc`` and ``robust_ci95`` are recounted over ``report``'s examples and the
    examples the follow-up broke get ``broken_by`` = ``label``. The per-attack table, when
    there is one, is dropped (it describes ``report``'s ensemble alone); ``attack_revision`` is
    the older of the two.

    Raises
    ------
    ValueError
        When the follow-up is not of the same model, data split, decision settings and
        threat model, or attacked examples ``report`` does not have.
    """
    _same_measurement([report, follow_up], ["the report", label])
    base_rows = {r.index: r for r in example_rows(report)}
    extra = sorted({r.index for r in example_rows(follow_up)} - set(base_rows))
    if extra:
        raise ValueError(f"{label} attacked examples the report does not have: {format_indices(extra)}")
    follow_rows = example_rows(follow_up)
    if mislabelled := [r.index for r in follow_rows if r.label != base_rows[r.index].label]:
        raise ValueError(f"{label} has other labels for examples {format_indices(mislabelled)} (another data split?)")
    # the unperturbed image misclassified there (e.g. on another device) is an adversarial example at distance 0
    broken = {r.index for r in follow_rows if not r.robust_correct}
    rows = [ExampleRow(r.index, r.label, r.clean_correct, r.robust_correct and r.index not in broken,
                       label if r.robust_correct and r.index in broken else r.broken_by)
            for r in base_rows.values()]
    n, robust = len(rows), sum(r.robust_correct for r in rows)
    merged = {k: v for k, v in report.items() if k not in ("per_attack", "examples_per_attack_revision")}
    if "attack_revision" in report or "attack_revision" in follow_up:  # the oldest (reports before 2 had none)
        merged["attack_revision"] = min(report.get("attack_revision", 1), follow_up.get("attack_revision", 1))
    merged.update({"robust_acc": robust / max(1, n), "robust_ci95": list(wilson_interval(robust, n)),
                   "per_example": [[r.index, r.label, int(r.clean_correct), int(r.robust_correct), r.broken_by]
                                   for r in rows],
                   "per_example_columns": list(PER_EXAMPLE_COLUMNS)})
    return merged


def worst_case_report(reports: list[dict[str, Any]], labels: list[str] | None = None,
                      follow_ups: list[dict[str, Any]] | None = None,
                      follow_up_labels: list[str] | None = None) -> dict[str, Any]:
    """Per-example worst case over several attack reports on the same model and threat model.

    An example counts as robust only if every run left it robust (docs/architecture.md,
    evaluation rules: exact and BPDA gradients, and here also ``smooth``, are each one
    attack of an adaptive evaluation).
    The runs may have different n: the worst case is taken over the examples all of them
    attacked. ``follow_ups`` are runs on some of those examples (typically the survivors,
    attacked again with a larger budget: ``rdc eval --indices``): they count where they
    attacked and do not narrow the examples; their entries in ``runs`` have
    ``follow_up: true`` and ``attacked`` (how many of the examples they attacked). Raises
    ``ValueError`` when the reports are not of one model, data split and threat model.
    """
    follow_ups = follow_ups or []
    if not reports or len(reports) + len(follow_ups) < 2:
        raise ValueError("the worst case needs at least two reports")
    labels = list(labels or [run_label(r) for r in reports])
    labels += follow_up_labels or [f"{run_label(r)} (follow-up)" for r in follow_ups]
    every = list(reports) + list(follow_ups)
    base, base_threat = reports[0], _same_measurement(every, labels)
    by_index = [{r.index: r for r in example_rows(rep)} for rep in every]
    common = sorted(set.intersection(*(set(d) for d in by_index[:len(reports)])))
    if not common:
        raise ValueError("the reports share no examples")
    per_example, broken_by_run = [], [0] * len(every)
    only_by_run = [0] * len(every)
    for i in common:
        present = [k for k, d in enumerate(by_index) if i in d]
        rows = [by_index[k][i] for k in present]
        if len({r.label for r in rows}) != 1:
            raise ValueError(f"example {i} has different labels in the reports")
        clean = all(r.clean_correct for r in rows)
        breakers = [k for k, r in zip(present, rows) if r.clean_correct and not r.robust_correct]
        for k in breakers:
            broken_by_run[k] += 1
        if len(breakers) == 1:
            only_by_run[breakers[0]] += 1
        robust = clean and not breakers
        per_example.append([i, rows[0].label, int(clean), int(robust), [labels[k] for k in breakers]])
    n = len(common)
    n_clean = sum(e[2] for e in per_example)
    n_robust = sum(e[3] for e in per_example)
    runs = []
    for k, (label, rep) in enumerate(zip(labels, every)):
        attacked = [i for i in common if i in by_index[k]]
        robust_here = sum(int(by_index[k][i].robust_correct) for i in attacked)
        run = {"label": label, "command": rep["settings"].get("command"), "n": rep["n"],
               "robust_acc_on_common": robust_here / max(1, len(attacked)), "broke": broken_by_run[k],
               "broke_alone": only_by_run[k]}
        if k >= len(reports):
            run.update({"follow_up": True, "attacked": len(attacked)})
        runs.append(run)
    norm, eps = base_threat
    return {"model": base["model"].get("name"), "dataset": base["settings"].get("dataset"),
            "split": base["settings"].get("split"), "norm": norm, "eps": eps, "n": n,
            "clean_acc": n_clean / n, "ci95": list(wilson_interval(n_clean, n)), "robust_acc": n_robust / n,
            "robust_ci95": list(wilson_interval(n_robust, n)), "runs": runs, "per_example": per_example}


def worst_case_log(report: dict[str, Any]) -> str:
    """A readable summary of :func:`worst_case_report`."""
    lo, hi = report["robust_ci95"]
    lines = [f"model {report['model']}, {report['dataset']} {report['split']}, {report['norm']} eps {report['eps']:g}, "
             f"common n = {report['n']} examples",
             f"clean accuracy: {100 * report['clean_acc']:.2f}%"]
    for run in report["runs"]:
        where = (f"on the {run['attacked']} of these examples it attacked" if run.get("follow_up")
                 else "on these examples")
        lines.append(f"  {run['label']}: robust {100 * run['robust_acc_on_common']:.2f}% {where} "
                     f"(broke {run['broke']}, {run['broke_alone']} that no other run broke; n = {run['n']} in its "
                     f"report)")
    lines.append(f"worst case per example: robust accuracy {100 * report['robust_acc']:.2f}% "
                 f"(95% CI {100 * lo:.2f}%-{100 * hi:.2f}%)")
    return "\n".join(lines) + "\n"


NOT_RECORDED = "not recorded"


def _report_hardware(results: list[ExampleResult]) -> tuple[str, dict[str, int] | None, dict[str, Any]]:
    """The ``hardware`` of a report over ``results``, its ``examples_per_hardware`` and, when the
    examples were attacked on more than one machine, their seconds per image on each (a timing entry).

    A state resumed on other hardware (another machine, thread count or device) holds examples
    of both, so the report names each with its count instead of claiming the last run's. States
    written before lines recorded it keep the old claim (this run's machine, without the device).
    """
    per_hardware = Counter(r.hardware or NOT_RECORDED for r in results)
    if not results or set(per_hardware) == {NOT_RECORDED}:
        return hardware_description(), None, {}
    counts = {h: per_hardware[h] for h in sorted(per_hardware, key=lambda h: (-per_hardware[h], h == NOT_RECORDED, h))}
    if len(counts) == 1:
        return next(iter(counts)), counts, {}
    seconds: dict[str, list[float]] = {}
    for r in results:
        if r.seconds is not None:
            seconds.setdefault(r.hardware or NOT_RECORDED, []).append(r.seconds)
    description = "mixed: " + "; ".join(f"{h} ({k} example{'s' if k != 1 else ''})" for h, k in counts.items())
    return description, counts, {"seconds_per_image_per_hardware": {h: sum(v) / len(v) for h, v in seconds.items()}}


def robust_report(results: list[ExampleResult], seconds: float, model: dict[str, Any],
                  settings: dict[str, Any], attacks: list[tuple[str, str]] | None = None,
                  attack_seconds: dict[str, float] | None = None, attack_queries: dict[str, int] | None = None,
                  seeds: dict[str, Any] | None = None) -> EvalReport:
    """The report of a finished attack evaluation (examples sorted by index).

    For an ensemble, ``attacks`` (its order, as (name, label) pairs) adds the per-attack
    table of :func:`attack_table`, the breaking attack of every example, and this run's
    seconds and forward passes per attack; ``seeds`` records the seeds used.
    """
    from .attacks.base import ATTACK_REVISION

    results = sorted(results, key=lambda r: r.index)
    n = len(results)
    clean = sum(r.clean_correct for r in results)
    robust = sum(r.robust_correct for r in results)
    queries = sum(r.queries for r in results)
    # per-example timings cover resumed examples too (and every shard: process-seconds);
    # examples from a state written before timings existed are left out of the average
    timed = [r.seconds for r in results if r.seconds is not None]
    per_image = sum(timed) / len(timed) if timed else seconds / max(1, n)
    # a resumed state can hold examples attacked by an older revision of the attacks: the report
    # claims the oldest, and says how many examples each revision attacked
    per_revision = Counter(r.attack_revision or 1 for r in results)
    hardware, per_hardware, timing = _report_hardware(results)
    report = EvalReport(
        clean_acc=clean / max(1, n), robust_acc=robust / max(1, n), n=n, ci95=list(wilson_interval(clean, n)),
        robust_ci95=list(wilson_interval(robust, n)), seconds=seconds, seconds_per_image=per_image,
        timing={"wall_seconds_this_run": seconds, "examples_timed": len(timed),
                "seconds_per_image": "each example's batch wall time / batch size, averaged over the timed "
                                     "examples of every run and shard" if timed else "this run's wall time / n"}
               | timing,
        forward_backward_passes_per_image=queries / max(1, n),
        max_linf=max((r.linf for r in results), default=0.0), max_l2=max((r.l2 for r in results), default=0.0),
        examples=[ExampleRow(r.index, r.label, r.clean_correct, r.robust_correct, r.broken_by) for r in results],
        model=model, settings=settings, hardware=hardware, seeds=seeds, examples_per_hardware=per_hardware,
        attack_revision=min(per_revision, default=ATTACK_REVISION),
        examples_per_attack_revision=({str(k): per_revision[k] for k in sorted(per_revision)}
                                      if len(per_revision) > 1 else None))
    if attacks is not None:
        table = attack_table(results, attacks)
        if table and table[-1].robust_acc != report.robust_acc:
            raise ValueError("per-attack table does not end at the robust accuracy")
        report.per_attack = table
        report.attack_seconds_this_run = dict(attack_seconds or {})
        report.attack_forward_passes_this_run = dict(attack_queries or {})
    return report


def robust_log(report: EvalReport | dict[str, Any]) -> str:
    """A readable, AutoAttack-style log of a :func:`robust_report` (ensemble or single attack)."""
    if isinstance(report, EvalReport):
        report = report.to_dict()
    def pct(v: float) -> str:
        return f"{100 * v:.2f}%"

    def ci(lo_hi: list[float]) -> str:
        return f"(95% CI {pct(lo_hi[0])}-{pct(lo_hi[1])})"

    st = report["settings"]
    n = report["n"]
    lines = [f"command: {st.get('command', '')}",
             f"model: {report['model'].get('name')} ({report['model'].get('architecture')}), "
             f"defense {st.get('defense')}, device {st.get('device')}",
             f"data: {st.get('dataset')} {st.get('split')} split, n = {n}"]
    if "classifier" in st:
        lines.append(f"classifier: {json.dumps(st['classifier'], sort_keys=True)}")
    if "purify" in st:
        lines.append(f"purification: {json.dumps(st['purify'], sort_keys=True)}, gradients {st.get('grad')}")
    att = st.get("attack_settings", {})
    per_attack = report.get("per_attack")
    if per_attack is not None:
        lines.append(f"attack: ensemble of {', '.join(row['attack'] for row in per_attack)}, each run only on "
                     f"the examples still unbroken (worst case per example)")
        for row in per_attack:
            lines.append(f"  {row['attack']}: {json.dumps(att.get(row['attack'], {}), sort_keys=True)}")
        for key, value in st.get("ensemble", {}).items():
            lines.append(f"  {key}: {value}")
    else:
        lines.append(f"attack: {st.get('attack')} {json.dumps(att, sort_keys=True)}")
    if "seeds" in report:
        lines.append(f"seeds: {json.dumps(report['seeds'], sort_keys=True)}")
    if "attack_revision" in report:
        mixed = report.get("examples_per_attack_revision")
        lines.append(f"attack revision: {report['attack_revision']}" + (
            f" (the oldest; examples per revision: "
            f"{', '.join(f'{k}: {v}' for k, v in mixed.items())})" if mixed else ""))
    clean = report["clean_acc"]
    lines.append(f"clean accuracy: {pct(clean)} {ci(report['ci95'])}")
    seconds = report.get("attack_seconds_this_run", {})
    for row in per_attack or []:
        timing = f" (total time {seconds[row['attack']]:.1f} s this run)" if row["attack"] in seconds else ""
        lines.append(f"{row['attack']} - {row['success']} out of {row['attacked']} successfully perturbed")
        lines.append(f"robust accuracy after {row['label']}: {pct(row['robust_acc'])} {ci(row['robust_ci95'])}{timing}")
    lines.append(f"max linf perturbation: {report['max_linf']:.5f}, max l2 perturbation: {report['max_l2']:.5f}; "
                 f"every example checked: inside the eps ball and [0, 1], finite, re-classified after 8-bit rounding")
    lines.append(f"robust accuracy: {pct(report['robust_acc'])} {ci(report['robust_ci95'])}")
    lines.append(f"time: {report['seconds']:.1f} s this run, {report['seconds_per_image']:.3f} s per image "
                 f"(all runs); "
                 f"forward passes per image: {report['forward_backward_passes_per_image']:.1f}")
    if "shards" in st:
        lines.append(f"shards: {st['shards']}")
    lines.append(f"hardware: {report['hardware']}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class StateFile:
    """What a resumable state file holds (:func:`read_state_file`)."""

    header_line: str  # the first line as written ("" for an empty file)
    settings: dict[str, Any] | None  # the header's run settings (None when unreadable)
    results: dict[int, ExampleResult]  # by example index; a later line for an index wins


def read_state_file(path: str | Path) -> StateFile:
    """Read a resumable state file (the one reader of the format; :class:`ResumeState`).

    Lines that are not a complete example record (one cut off by an interruption) are
    skipped. A missing file reads as empty.
    """
    return parse_state_text(_read_state_text(Path(path)))


MAX_STATE_BYTES = 2**30  # a line per example: millions of examples stay far below this


def _read_state_text(path: Path) -> str:
    """The text of a state file ("" when there is none); ``ValueError`` naming the file when
    it is no state file (a folder, a device, binary data, too large)."""
    if not path.exists():
        return ""
    if not path.is_file():
        raise ValueError(f"{path}: the state file is not a regular file; give a file name")
    if path.stat().st_size > MAX_STATE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is too large for a state file of rdc eval")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a state file of rdc eval (not text); give another --state file") from None


def parse_state_text(text: str) -> StateFile:
    """:func:`read_state_file` on the text of a state file already read."""
    import json

    lines = text.splitlines()
    settings = None
    if lines:
        try:
            header = json.loads(lines[0])
            settings = header.get("settings") if isinstance(header, dict) else None
        except json.JSONDecodeError:
            pass
    results: dict[int, ExampleResult] = {}
    for line in lines[1:]:
        try:
            record = ExampleResult(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        results[record.index] = record
    return StateFile(lines[0] if lines else "", settings if isinstance(settings, dict) else None, results)


SCHEDULING_SETTINGS = ("batch_size", "device")
"""Run settings that say how the work is scheduled, not what is computed (every example's
attack is seeded by its index alone): a state resumes under others, as finished reports are
reused (``benchmarks/robustness_table.py``'s ``same_results``)."""


def _resume_identity(settings: Any) -> Any:
    """``settings`` without :data:`SCHEDULING_SETTINGS` (what a resumed state must match)."""
    if not isinstance(settings, dict):
        return settings
    return {k: v for k, v in settings.items() if k not in SCHEDULING_SETTINGS}


class ResumeState:
    """Per-example results appended to a JSON-lines file, so a stopped run resumes.

    The file starts with a header line holding the run's settings; resuming with
    different settings is refused (the batch size and device excepted:
    :data:`SCHEDULING_SETTINGS`), except that an unsharded run may grow: a state
    written for the first ``n`` examples serves a run over more examples with
    otherwise equal settings (each example's attack is seeded by its index alone),
    as does a state of chosen ``indices`` for a run over more of them (a superset), and
    its header is rewritten to the larger run's.

    A state is used by one run at a time: it holds an exclusive lock on ``PATH.lock``
    until :meth:`close` (or the process ends), and a second run on the same file is
    refused instead of appending the same examples again.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any], weights: dict[str, str] | None = None) -> None:

        self.path = Path(path)
        self.weights = weights  # sha256 of the files attacked (model, purifier, CNN); None: not recorded
        self.results: dict[int, ExampleResult] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = Path(f"{self.path}.lock")
        lock_is_new = not lock_file.exists()
        self._lock = self._acquire_lock(self.path)
        try:
            self._load(settings)
        except BaseException:
            self.close()
            if lock_is_new:  # a refused file (another run's state, not a state) keeps no lock file beside it
                lock_file.unlink(missing_ok=True)
            raise

    @staticmethod
    def _acquire_lock(path: Path):
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): one run per state is the user's care
            return None
        lock = open(f"{path}.lock", "a")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ValueError(f"{path}: another running evaluation is using this state file; "
                             "stop it (or wait for it) first") from None
        return lock

    def close(self) -> None:
        """Release the state's lock (the results stay on disk)."""
        if self._lock is not None:
            self._lock.close()  # closing the file releases its flock
            self._lock = None

    def _load(self, settings: dict[str, Any]) -> None:
        import json

        same_settings = json.dumps({"settings": _resume_identity(settings)}, sort_keys=True)
        header = json.dumps({"settings": settings} | ({"weights": self.weights} if self.weights else {}),
                            sort_keys=True)
        text = _read_state_text(self.path)
        if text:  # an empty file (made by hand, or by a run stopped before its header) is a new state
            state = parse_state_text(text)
            try:
                old = json.loads(state.header_line) if state.header_line else {}
            except json.JSONDecodeError:
                old = {}
            if not isinstance(old, dict) or "settings" not in old:
                raise ValueError(f"{self.path}: not a state file of rdc eval (its first line is no run header); "
                                 f"give another --state file")
            if not self.weights and isinstance(old, dict) and isinstance(old.get("weights"), dict):
                # a run that could not digest its files keeps the record of those it was made on
                header = json.dumps({"settings": settings, "weights": old["weights"]}, sort_keys=True)
            old_settings = json.dumps({"settings": _resume_identity(old.get("settings"))}, sort_keys=True)
            if not state.header_line or (old_settings != same_settings and not self._grows(state.header_line, settings)):
                raise ValueError(f"{self.path}: state of a run with other settings; use another state file")
            # a state that recorded its weights (older ones did not) serves only the very same files
            if self.weights and isinstance(old.get("weights"), dict) and old["weights"] != self.weights:
                changed = ", ".join(sorted(k for k in set(old["weights"]) | set(self.weights)
                                           if old["weights"].get(k) != self.weights.get(k)))
                raise ValueError(f"{self.path}: state of a run on other weights ({changed} changed since); "
                                 f"use another state file")
            if state.header_line != header:  # a smaller run's state (the new n), or the weights recorded now
                from .models import atomic_write_bytes

                body = "\n".join(text.splitlines()[1:])
                atomic_write_bytes(self.path, (header + "\n" + body + ("\n" if body else "")).encode())
            elif not text.endswith("\n"):  # cut off mid-line: start the next line cleanly
                with open(self.path, "a") as f:
                    f.write("\n")
            self.results.update(state.results)
        else:
            self.path.write_text(header + "\n")

    def add(self, results) -> None:
        import json
        import os
        from dataclasses import asdict

        with open(self.path, "a") as f:
            for r in results:
                row = asdict(r)
                if row["broken_by"] is None:  # single attacks keep their old line format
                    del row["broken_by"]
                for optional in ("seconds", "attack_revision", "image_sha256", "hardware"):
                    if row[optional] is None:
                        del row[optional]
                f.write(json.dumps(row) + "\n")
                self.results[r.index] = r
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _grows(header_line: str, settings: dict[str, Any]) -> bool:
        """Whether ``header_line`` is the header of an unsharded run over fewer examples with
        otherwise the same settings as ``settings``: the first n of a larger n, or (``--indices``
        runs) a proper subset of its indices, e.g. a row's survivors before the row grew."""
        import json

        try:
            old = json.loads(header_line)["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return False
        if not isinstance(old, dict) or not isinstance(old.get("n"), int):
            return False
        unsharded = old.get("shard") == [0, 1] and list(settings.get("shard", [])) == [0, 1]
        same = ({k: v for k, v in _resume_identity(old).items() if k not in ("n", "indices")}
                == json.loads(json.dumps({k: v for k, v in _resume_identity(settings).items()
                                          if k not in ("n", "indices")})))
        if not (unsharded and same and old["n"] < settings["n"]):
            return False
        if old.get("indices") is None and settings.get("indices") is None:
            return True
        try:
            return set(parse_indices(old["indices"])) < set(parse_indices(settings["indices"]))
        except (AttributeError, KeyError, TypeError, ValueError):  # one over the first n, one over chosen indices
            return False


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation runs: data, defense, attack and how to run it.

    ``attack`` is one of :data:`core.choices.EVAL_ATTACKS`: ``none`` (clean accuracy),
    ``ensemble`` (APGD-CE, APGD-DLR, APGD-T, Square and a transfer attack from the CNN
    ``cnn``), ``transfer`` (that transfer attack alone) or a single attack by name.
    ``indices`` picks the examples by index instead of the first ``n`` (e.g. the survivors
    of an earlier evaluation, attacked again with a larger budget: every example's attack is
    seeded by its index alone, so it is the attack a run over the first n would make).
    ``state`` is a per-example results file an interrupted run resumes from; ``command``
    is recorded in the report (how to reproduce it).
    """

    dataset: str = "mnist"
    split: str = "test"
    n: int | None = None  # first n examples (None: all)
    indices: tuple[int, ...] | None = None  # these examples instead of the first n
    data_root: str | None = None
    defense: str = "dc"
    attack: str = "none"
    norm: str = "linf"
    eps: float = 0.3
    steps: int = 100
    restarts: int = 1
    eot: int = 1
    seed: int = 0
    targets: int = 9
    square_queries: int | None = None
    p_init: float = 0.8
    grad: str = "auto"
    cnn: str = "mnist-cnn"
    binarize: float | None = None  # the defense sees its input binarised at this threshold
    batch_size: int = 50
    state: str | None = None
    command: str = ""

    def __post_init__(self) -> None:
        from .choices import DATASETS, DEFENSES, EVAL_ATTACKS, GRAD_MODES, NORMS, real_number, whole_number

        for name, value, allowed in (("dataset", self.dataset, DATASETS), ("defense", self.defense, DEFENSES),
                                     ("attack", self.attack, EVAL_ATTACKS), ("norm", self.norm, NORMS),
                                     ("grad", self.grad, GRAD_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        # plain numbers from here on (numpy's do not go into the JSON of reports and states)
        for name in ("steps", "restarts", "eot", "targets", "batch_size"):
            object.__setattr__(self, name, whole_number(name, getattr(self, name), 1))
        if self.n is not None:
            object.__setattr__(self, "n", whole_number("n", self.n, 0))
        if self.attack != "none":
            object.__setattr__(self, "eps", real_number("eps", self.eps, 0))
        elif isinstance(self.eps, numbers.Real) and not isinstance(self.eps, bool):
            object.__setattr__(self, "eps", float(self.eps))


@dataclass(frozen=True)
class EvalProgress:
    """Progress of :func:`run_evaluation`: ``done`` of ``total`` examples of this shard."""

    done: int
    total: int
    clean_acc: float
    robust_acc: float | None = None  # None for clean evaluations


def init_distributed(device: str) -> tuple[int, int]:
    """Under ``torchrun`` join the process group (gloo on CPU, NCCL on GPU) and return
    (rank, world size); (0, 1) in a single process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def single_attack_settings(config: EvalConfig):
    """The :class:`core.attacks.AttackSettings` of ``config.attack`` naming one attack."""
    from .attacks import AttackSettings
    from .choices import NAMED_ATTACKS
    from .defense import attack_threshold

    method, loss = NAMED_ATTACKS[config.attack]
    steps = config.square_queries if method == "square" and config.square_queries else config.steps
    return AttackSettings(method=method, loss=loss, norm=config.norm, eps=config.eps, steps=steps,
                          restarts=config.restarts, eot=config.eot, seed=config.seed, p_init=config.p_init,
                          **attack_threshold(method, config.binarize))


def _check_targets(config: EvalConfig, dataset: TensorDataset) -> None:
    """APGD-T's number of target classes must exist (the record must say what ran)."""
    classes = len(dataset.classes)
    if not 1 <= config.targets <= classes - 1:
        raise ValueError(f"APGD-T takes 1 to {classes - 1} target classes on {dataset.name}, not {config.targets}")


def _ensemble(config: EvalConfig, dataset: TensorDataset, device: str):
    """The members of the ensemble and the surrogate CNN of its transfer attack."""
    from .attacks import standard_ensemble
    from .baseline import load_cnn
    from .models import CheckpointError

    _check_targets(config, dataset)
    try:
        surrogate, _ = load_cnn(config.cnn, device=device)
    except CheckpointError as exc:
        raise ValueError(f"transfer attack: {exc}") from None
    shape = (surrogate.in_channels, surrogate.image_size)
    if shape != (dataset.images.shape[1], dataset.images.shape[-1]) or surrogate.num_classes != len(dataset.classes):
        raise ValueError(f"transfer attack: CNN {config.cnn} does not fit the {dataset.name} data")
    members = standard_ensemble(config.norm, config.eps, steps=config.steps, restarts=config.restarts,
                                eot=config.eot, seed=config.seed, targets=config.targets,
                                square_queries=config.square_queries or 5000, p_init=config.p_init)
    return members, surrogate


def evaluated_weights(config: EvalConfig, model=None) -> dict[str, str]:
    """sha256 of every weights file an evaluation uses: the diffusion model and its purifier,
    and the CNN (the defense itself, or the ensemble's transfer source). A state file
    records them, so it never resumes a run on other weights of the same name or path."""
    from .baseline import cnn_weights_path
    from .models import file_sha256

    weights = {}
    if config.defense != "cnn" and model is not None and Path(model.path).is_file():
        weights["model"] = file_sha256(model.path)
        if model.purifier is not None:
            weights["purifier"] = file_sha256(model.purifier.path)
    if config.defense == "cnn" or config.attack in ("ensemble", "transfer"):
        cnn = cnn_weights_path(config.cnn)
        if cnn.is_file():
            weights["cnn"] = file_sha256(cnn)
    return weights


def run_evaluation(config: EvalConfig, model=None, classifier: DiffusionClassifier | None = None, *,
                   device: str = "cpu", purify=None, dataset: TensorDataset | None = None,
                   shard: tuple[int, int] = (0, 1), progress: Callable[[EvalProgress], None] | None = None,
                   warn: Callable[[str], None] | None = None,
                   cancelled: Callable[[], bool] | None = None) -> EvalReport | None:
    """Evaluate a defense on a dataset split: clean accuracy, or robust accuracy under attack.

    Parameters
    ----------
    config
        What to evaluate (:class:`EvalConfig`).
    model, classifier
        The loaded diffusion model and its classifier (None for the ``cnn`` defense).
    device
        Where the ``cnn`` defense runs (the others run on the classifier's device).
    purify
        The RDC's :class:`core.purify.PurifySettings` (default: the model card's).
    dataset
        The split to evaluate (default: loaded from ``config``'s dataset, split and data root).
    shard
        (rank, world size): this process attacks every world-th example from rank; with
        a process group (:func:`init_distributed`) all shards' results are gathered.
    progress
        Called at the start (resumed examples count as done) and after every batch.
    warn
        Receives engine warnings (e.g. masked gradients) before the attacks start.
    cancelled
        Polled between batches and inside the attacks; True stops the run (None is returned).

    Returns
    -------
    EvalReport or None
        The report (every shard gets the gathered report), None when cancelled.

    Raises
    ------
    ValueError
        For a missing model or classifier (``dc``, ``rdc``), a model trained on another
        dataset, an unusable CNN or ensemble setting, or a ``state`` file of a run with
        other settings.
    """
    from .data import load_dataset
    from .defense import build_defense, gradient_warning

    if config.defense != "cnn" and (model is None or classifier is None):
        raise ValueError(f"the {config.defense} defense needs the loaded diffusion model and its classifier "
                         f"(core.models.load_checkpoint, core.classifier.build_classifier)")

    ds = dataset if dataset is not None else load_dataset(config.dataset, config.split, config.data_root)
    cancelled = cancelled or (lambda: False)
    weights = evaluated_weights(config, model)
    if config.defense == "cnn":  # the diffusion model is not needed
        settings: dict[str, Any] = {"device": device}
        model_info = {"name": config.cnn, "architecture": "cnn", "sha256": weights.get("cnn")}
    else:
        if ds.name != model.card.get("dataset"):
            raise ValueError(f"model {model.name} was trained on {model.card.get('dataset')}, not {ds.name}")
        settings = {"classifier": classifier.settings.to_dict(), "device": str(classifier.device)}
        model_info = {"name": model.name, "path": str(model.path), "architecture": model.net.config.architecture,
                      "sha256": weights.get("model")}
        if model.purifier is not None:
            model_info["purifier"] = {"name": model.purifier.name, "path": str(model.purifier.path),
                                      "sha256": weights.get("purifier")}
    if "cnn" in weights and config.defense != "cnn":
        model_info["transfer_source_sha256"] = weights["cnn"]
    if config.indices is not None:
        if config.n is not None:
            raise ValueError("give either n or indices, not both")
        if not config.indices or min(config.indices) < 0 or max(config.indices) >= len(ds):
            raise ValueError(f"indices must be within 0-{len(ds) - 1} (the {config.split} split)")
        selected = sorted(set(config.indices))
    else:
        selected = list(range(min(config.n or len(ds), len(ds))))
    total = len(selected)
    settings.update({"dataset": config.dataset, "split": config.split, "defense": config.defense,
                     "attack": config.attack, "batch_size": config.batch_size, "command": config.command})
    if config.indices is not None:
        settings["indices"] = format_indices(selected)
    if config.binarize is not None:  # recorded only when set: earlier reports and states stay valid
        settings["binarize"] = config.binarize
    defense = build_defense(config.defense, model, classifier, purify=purify, grad_mode=config.grad,
                            cnn=config.cnn, device=device, binarize=config.binarize)
    if config.defense == "rdc":
        settings["purify"] = defense.maximizer.settings.to_dict()
    if config.attack == "none":  # clean accuracy: forward passes only, whatever the defense
        steps = []
        clean_data = ds
        if config.indices is not None:
            picked = torch.tensor(selected)
            clean_data = replace(ds, images=ds.images[picked], labels=ds.labels[picked])
        for rec in evaluate_clean(defense, clean_data, total, config.batch_size, cancelled=cancelled):
            steps.append(rec)
            if progress is not None:
                progress(EvalProgress(rec.done, total, rec.accuracy))
        if cancelled() or not steps:
            return None
        return clean_report(steps, model_info, settings)

    if config.defense == "rdc":
        settings["grad"] = defense.grad_mode  # the mode actually used (auto resolved)
    members, surrogate, seeds = None, None, None
    if config.attack in ("ensemble", "transfer"):
        members, surrogate = _ensemble(config, ds, device)
        if config.attack == "transfer":  # the ensemble's transfer attack alone
            members = [m for m in members if m.transfer]
    elif config.attack == "apgd-t":  # its target classes one after another, on what is left (as in the ensemble)
        from .attacks import EnsembleMember

        _check_targets(config, ds)
        members = [EnsembleMember("apgd-t", single_attack_settings(config), targets=config.targets)]
    else:
        att = single_attack_settings(config)
    if members is not None:
        settings["attack_settings"] = {m.name: m.settings.to_dict() for m in members}
        settings["ensemble"] = {"order": [m.name for m in members]}
        if any(m.transfer for m in members):
            settings["ensemble"]["transfer_source"] = config.cnn
        if config.attack in ("ensemble", "apgd-t"):
            settings["ensemble"]["targets"] = config.targets
        seeds = {"attack_seed": config.seed,
                 "classifier_noise_seed": settings.get("classifier", {}).get("noise_seed"),
                 "per_example": "(attack_seed * 1000003 + index) * 101 + restart"}
    else:
        settings["attack_settings"] = att.to_dict()
    warning = gradient_warning(defense)
    if warning and warn is not None and config.attack not in ("none", "square", "transfer"):
        warn(warning)
    rank, world = shard
    indices = selected[rank::world]
    state = None
    if config.state:
        state_path = config.state if world == 1 else f"{config.state}.rank{rank}-of-{world}"
        identity = {k: v for k, v in settings.items() if k != "command"}
        state = ResumeState(state_path, identity | {"n": total, "shard": [rank, world]}, weights)
        try:
            check_state_examples(state_path, state.results, ds)
        except ValueError:
            state.close()
            raise
    results = list(state.results.values()) if state else []
    t0 = time.perf_counter()
    skip = set(state.results) if state else frozenset()
    if members is not None:
        records = evaluate_ensemble(defense, ds, members, indices, config.batch_size, skip=skip, surrogate=surrogate,
                                    cancelled=cancelled)
    else:
        records = evaluate_attack(defense, ds, att, indices, config.batch_size, skip=skip, cancelled=cancelled)
    attack_seconds: dict[str, float] = {}
    attack_queries: dict[str, int] = {}

    def report_progress() -> None:
        if progress is not None:
            done = max(1, len(results))
            progress(EvalProgress(len(results), len(indices), sum(r.clean_correct for r in results) / done,
                                  sum(r.robust_correct for r in results) / done))

    report_progress()
    try:
        for rec in records:
            results.extend(rec.results)
            for name, sec in rec.attack_seconds.items():
                attack_seconds[name] = attack_seconds.get(name, 0.0) + sec
            for name, q in rec.attack_queries.items():
                attack_queries[name] = attack_queries.get(name, 0) + q
            if state:
                state.add(rec.results)
            report_progress()
    finally:
        if state:
            state.close()
    if cancelled():
        return None
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, (results, attack_seconds, attack_queries))
        results = [r for part, _, _ in gathered for r in part]
        attack_seconds = {m.name: sum(sec.get(m.name, 0.0) for _, sec, _ in gathered) for m in members or []}
        attack_queries = {m.name: sum(q.get(m.name, 0) for _, _, q in gathered) for m in members or []}
        settings["shards"] = world
    if members is not None:
        return robust_report(results, time.perf_counter() - t0, model_info, settings,
                             attacks=[(m.name, m.label) for m in members], attack_seconds=attack_seconds,
                             attack_queries=attack_queries, seeds=seeds)
    return robust_report(results, time.perf_counter() - t0, model_info, settings)
