"""The window's jobs as generators: each yields its step records and returns its result.

The worker (:mod:`.worker`) relays the yielded records to the views and the return value
to the job's owner, so a result is never mixed into the stream of records. A job returns
None when it was cancelled or ended early.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Generator

import numpy as np
import torch
from torch import nn

from ..core.attacks import AttackResult, AttackSettings, AttackStep, DefenseOutcome, attack_session
from ..core.classifier import ClassifyStep, DiffusionClassifier
from ..core.ood import OodScore, OodScorer
from ..core.purify import LikelihoodMaximizer, PurifyStep
from ..core.sample import SampleStep, sample

Cancelled = Callable[[], bool]


class Flush:
    """Yielded by a job before a long stretch without records: the worker relays the
    records so far at once (not with the next record). Never relayed itself."""


FLUSH = Flush()


@dataclass(frozen=True)
class AttackOutcome(DefenseOutcome):
    """The full defense's verdict, and whether the attacked model classified the clean image
    right (``clean_correct``, per image): an attack that ran no iteration either found its
    starting point adversarial or had nothing to do."""

    clean_correct: np.ndarray | None = None


def classify_job(clf: DiffusionClassifier, x: torch.Tensor, levels_per_step: int, cancelled: Cancelled,
                 ood: OodScorer | None = None) -> Generator[ClassifyStep | OodScore | Flush, None, ClassifyStep | None]:
    """Stream the running estimate, then (with ``ood``) the input's out-of-distribution
    score; returns the final record (all levels), else None. The last level reaches the
    view before the score is computed: stopping during the score loses only the score."""
    last = None
    for record in clf.stream(x, levels_per_step, cancelled):
        last = record
        yield record
    if last is None or last.levels_done < last.total_levels:
        return None
    if ood is not None and not cancelled():
        yield FLUSH
        yield ood.assess(x)[0]
    return last


def attack_job(attacked: nn.Module, x: torch.Tensor, settings: AttackSettings, defense: nn.Module,
               purify: Callable[[torch.Tensor], torch.Tensor] | None, cancelled: Cancelled,
               y: torch.Tensor | None = None) -> Generator[AttackStep, None, AttackOutcome | None]:
    """Yield the attack's iterations; returns the full defense's verdict on its result
    (``y``: the labels, default: the attacked model's predictions on ``x``) with whether the
    attacked model classified ``x`` right."""
    outcome, clean_correct = None, None
    for record in attack_session(attacked, x, settings, defense=defense, purify=purify, y=y, cancelled=cancelled):
        if isinstance(record, AttackStep):
            yield record
        elif isinstance(record, AttackResult):
            clean_correct = record.clean_correct.cpu().numpy().copy()
        elif isinstance(record, DefenseOutcome):
            outcome = AttackOutcome(**{f.name: getattr(record, f.name) for f in fields(record)},
                                    clean_correct=clean_correct)
    return None if cancelled() else outcome


def purify_job(lm: LikelihoodMaximizer, x: torch.Tensor, classifier: Callable[[torch.Tensor], torch.Tensor] | None,
               cancelled: Cancelled) -> Generator[PurifyStep, None, list[PurifyStep] | None]:
    """Yield every likelihood-maximisation step; returns the whole trajectory (step 0 first)."""
    records: list[PurifyStep] = []
    for record in lm.run(x, classifier=classifier, cancelled=cancelled):
        records.append(record)
        yield record
    if cancelled() or (lm.settings.steps > 0 and len(records) < lm.settings.steps + 1):
        return None
    return records


def sample_job(net: nn.Module, label: int, steps: int, seed: int,
               cancelled: Cancelled) -> Generator[SampleStep, None, SampleStep | None]:
    """Yield the sampler's states; returns the last one (the sample), else None."""
    last = None
    for record in sample(net, label, 1, steps, seed, cancelled):
        last = record
        yield record
    if last is None or last.step < last.total_steps:
        return None
    return last
