"""An AutoAttack-style ensemble: attacks run in order, each only on the examples no earlier
attack has broken (worst case per example)."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Generator

import numpy as np
import torch
from torch import nn

from ..runtime import run_to_end
from .base import AttackSettings, Cancelled, check_attack_input, stops_when_cancelled
from .run import attack

ENSEMBLE_LABELS = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "square": "Square",
                   "transfer": "transfer (APGD-CE on the CNN)"}


@dataclass(frozen=True)
class EnsembleMember:
    """One attack of an ensemble.

    ``targets``: for a targeted-DLR member without a fixed target, how many runner-up
    classes are tried, one run each (AutoAttack's APGD-T). ``transfer``: craft the examples
    on the surrogate model, then classify them with the attacked model.
    """

    name: str
    settings: AttackSettings
    targets: int = 1
    transfer: bool = False

    @property
    def label(self) -> str:
        return ENSEMBLE_LABELS.get(self.name, self.name)


def standard_ensemble(norm: str, eps: float, steps: int = 100, restarts: int = 1, eot: int = 1, seed: int = 0,
                      targets: int = 9, square_queries: int = 5000, p_init: float = 0.8,
                      transfer: bool = True) -> list[EnsembleMember]:
    """The ensemble of docs/architecture.md (evaluation), in order: APGD-CE, APGD-DLR, targeted APGD-DLR
    (``targets`` runner-up classes), Square (``square_queries`` iterations, one restart)
    and, with ``transfer``, APGD-CE crafted on a surrogate CNN."""
    base = AttackSettings(method="apgd", loss="ce", norm=norm, eps=eps, steps=steps, restarts=restarts, eot=eot,
                          seed=seed)
    members = [EnsembleMember("apgd-ce", base), EnsembleMember("apgd-dlr", replace(base, loss="dlr")),
               EnsembleMember("apgd-t", replace(base, loss="dlr-targeted"), targets=targets),
               EnsembleMember("square", AttackSettings(method="square", norm=norm, eps=eps, steps=square_queries,
                                                       eot=eot, seed=seed, p_init=p_init))]
    if transfer:
        members.append(EnsembleMember("transfer", replace(base, eot=1), transfer=True))
    return members


@dataclass(frozen=True)
class EnsembleStep:
    """One attack of the ensemble has run on the examples it had left."""

    stage: int
    total_stages: int
    name: str
    attacked: int  # examples still unbroken before it
    broken: int  # of those, the examples it broke
    robust: np.ndarray  # (N,) bool: still classified correctly
    seconds: float
    queries: int  # passes of the attacked model, summed over the examples


@dataclass
class EnsembleResult:
    """Per-example worst case over the ensemble."""

    adversarial: torch.Tensor  # the validated example that broke it, else the clean image
    labels: torch.Tensor
    clean_correct: torch.Tensor
    robust: torch.Tensor
    broken_by: list[str | None]  # "clean", the breaking attack's name, or None (robust)
    linf: torch.Tensor  # largest perturbation of all the examples tried on it
    l2: torch.Tensor
    queries: torch.Tensor  # (N,) passes of the attacked model per example
    seconds: dict[str, float]  # per attack
    attack_queries: dict[str, int]  # per attack, summed over the examples

    @property
    def success(self) -> torch.Tensor:
        """Per example: misclassified clean or broken by an attack (as :class:`AttackResult`'s)."""
        return ~self.robust


@stops_when_cancelled
def ensemble_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, members: list[EnsembleMember],
                    example_ids: list[int] | None = None, surrogate: nn.Module | None = None,
                    cancelled: Cancelled | None = None
                    ) -> Generator[EnsembleStep, None, EnsembleResult | None]:
    """Run ``members`` in order, each only on the examples no earlier attack has broken
    (as AutoAttack does); yields an :class:`EnsembleStep` per attack and returns the
    :class:`EnsembleResult`. Examples the model misclassifies clean are not attacked.
    Each attack validates its examples; ``example_ids`` seed them as in :func:`attack`.
    Returns None when ``cancelled`` (polled by every attack before each pass, and inside
    the diffusion classifier's passes) fires.
    """
    check_attack_input(x)
    x0 = x.detach()
    n = x0.shape[0]
    ids = list(range(n)) if example_ids is None else [int(i) for i in example_ids]
    with torch.no_grad():
        clean_logits = model(x0)
    queries = torch.ones(n, dtype=torch.long)
    clean_correct = clean_logits.argmax(1) == y
    robust = clean_correct.clone()
    broken_by: list[str | None] = [None if c else "clean" for c in clean_correct.tolist()]
    adversarial = x0.clone()
    linf = torch.zeros(n, device=x0.device)
    l2 = torch.zeros(n, device=x0.device)
    seconds: dict[str, float] = {}
    attack_queries: dict[str, int] = {}
    for stage, member in enumerate(members, 1):
        t0 = time.perf_counter()
        s = member.settings
        runs = [s]
        if s.loss == "dlr-targeted" and s.target is None:
            runs = [replace(s, target_rank=k) for k in range(1, min(member.targets, clean_logits.shape[1] - 1) + 1)]
        attacked, broken, spent = int(robust.sum()), 0, 0
        for run in runs:
            rows = robust.nonzero()[:, 0]
            if len(rows) == 0:
                break
            sub_ids = [ids[k] for k in rows.tolist()]
            if member.transfer:
                if surrogate is None:
                    raise ValueError(f"{member.name}: a transfer attack needs a surrogate model")
                res = run_to_end(attack(surrogate, x0[rows], y[rows], run, cancelled, example_ids=sub_ids))
                if res is None:
                    return None
                with torch.no_grad():
                    success = model(res.adversarial).argmax(1) != y[rows]
                used = torch.ones(len(rows), dtype=torch.long)
            else:
                res = run_to_end(attack(model, x0[rows], y[rows], run, cancelled, example_ids=sub_ids))
                if res is None:
                    return None
                success = res.success
                used = (res.example_queries.cpu() if res.example_queries is not None
                        else torch.full((len(rows),), res.queries, dtype=torch.long))
            queries[rows.cpu()] += used
            spent += int(used.sum())
            linf[rows] = torch.maximum(linf[rows], res.linf)
            l2[rows] = torch.maximum(l2[rows], res.l2)
            hit = rows[success]
            adversarial[hit] = res.adversarial[success]
            robust[hit] = False
            for k in hit.tolist():
                broken_by[k] = member.name
            broken += len(hit)
        seconds[member.name] = time.perf_counter() - t0
        attack_queries[member.name] = spent
        yield EnsembleStep(stage, len(members), member.name, attacked, broken, robust.cpu().numpy().copy(),
                           seconds[member.name], spent)
    return EnsembleResult(adversarial, y, clean_correct, robust, broken_by, linf, l2, queries, seconds,
                          attack_queries)
