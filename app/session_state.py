"""The window's document, without Qt: the input image and each tab's latest results.

The views write the records of their jobs here and observe it; exports (CSV, session
file) read only from here, never from a widget. Observers are plain callables
``observer(event)`` with ``event`` one of :data:`EVENTS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..core.attacks import AttackStep, DefenseOutcome
from ..core.classifier import ClassifyStep
from ..core.ood import OodScore
from ..core.purify import PurifyStep

EVENTS = ("image", "classification", "attack", "purification")
CSV_HEADER = ["image", "kind", "step", "class", "value"]  # image: the id of what the row's result is of
Observer = Callable[[str], None]


@dataclass
class ClassificationResult:
    """The running estimate of the last classification (levels done -> logits)."""

    levels: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    measured: list[np.ndarray] = field(default_factory=list)  # per class: estimated at that level (not eliminated)
    probabilities: np.ndarray | None = None  # set when every level is done
    settings: dict | None = None  # the classifier settings that made it (ClassifierSettings.to_dict())
    ood: OodScore | None = None  # how typical the input is for the model (after the levels)


@dataclass
class AttackTrace:
    """The last attack: loss and margin per iteration, then the defense's verdict."""

    iterations: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    outcome: DefenseOutcome | None = None
    source: str = ""  # what was attacked
    known_class: int | None = None  # the attacked image's known class (else the attacked model's prediction is the label)
    settings: dict | None = None  # the session fields of the run: attack, attack_gradient, attack_binarize, purify
    image_id: str = ""  # unique among the window's images: what the CSV's rows of this attack name
    input_serial: int | None = None  # the serial of the input when the input itself was attacked, else None
    path: str = ""  # the file the attacked image came from (the input's, or the one a derived image came from)


@dataclass
class PurificationTrace:
    """The last likelihood maximisation: one record per step, step 0 first."""

    records: list[PurifyStep] = field(default_factory=list)
    source: str = ""  # what was purified
    known_class: int | None = None  # the purified image's known class, carried to an attack of it
    finished: bool = False
    settings: dict | None = None  # PurifySettings.to_dict() of the run
    image_id: str = ""  # unique among the window's images (see AttackTrace.image_id)
    path: str = ""  # the file the purified image came from, if any


class SessionState:
    """The input image and the latest classification, attack and purification."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = list(classes)
        self.image: np.ndarray | None = None
        self.image_source = ""
        self.image_path = ""
        self.image_known_class: int | None = None  # the input's known class: a dataset label, or the class a sample was drawn from
        self.image_serial = 0  # counts the inputs set: two inputs with one caption still get distinct ids
        self.classification = ClassificationResult()
        self.attack = AttackTrace()
        self.purification = PurificationTrace()
        self._observers: list[Observer] = []

    # -- observers ---------------------------------------------------------------
    def subscribe(self, observer: Observer) -> None:
        self._observers.append(observer)

    def _notify(self, event: str) -> None:
        for observer in list(self._observers):
            observer(event)

    # -- input --------------------------------------------------------------------
    def set_classes(self, classes: list[str]) -> None:
        """A new model: results of the old one no longer apply."""
        self.classes = list(classes)
        self.classification = ClassificationResult()
        self.attack = AttackTrace()
        self.purification = PurificationTrace()

    def set_image(self, image: np.ndarray | None, source: str = "", path: str = "",
                  known_class: int | None = None) -> None:
        """A new input (``known_class``: its label, when known); the classification restarts
        (attack and purification results stay until rerun)."""
        self.image = None if image is None else np.array(image, dtype=np.float32, copy=True)
        self.image_source, self.image_path, self.image_known_class = source, path, known_class
        self.image_serial += 1
        self.classification = ClassificationResult()
        self._notify("image")

    @property
    def image_id(self) -> str:
        """The input's id, unique in this window: its serial and caption (``"#3 pasted image"``)."""
        return f"#{self.image_serial} {self.image_source}" if self.image is not None else ""

    # -- classification ---------------------------------------------------------------
    def begin_classification(self, settings: dict | None = None) -> None:
        self.classification = ClassificationResult(settings=settings)
        self._notify("classification")

    def add_classification(self, records: list[ClassifyStep], measured: list[np.ndarray] | None = None) -> None:
        """Append running estimates; ``measured`` (per record, per class) marks the classes
        that progressive elimination still evaluated (default: all)."""
        for i, r in enumerate(records):
            self.classification.levels.append(int(r.levels_done))
            self.classification.logits.append(np.asarray(r.logits[0], dtype=float).copy())
            k = len(self.classification.logits[-1])
            self.classification.measured.append(np.ones(k, bool) if measured is None else np.asarray(measured[i], bool))
        self._notify("classification")

    def finish_classification(self, final: ClassifyStep) -> None:
        self.classification.probabilities = np.asarray(final.probabilities[0]).copy()
        self._notify("classification")

    def set_ood(self, score: OodScore) -> None:
        self.classification.ood = score
        self._notify("classification")

    @property
    def probabilities(self) -> np.ndarray | None:
        return self.classification.probabilities

    # -- attack --------------------------------------------------------------------
    def begin_attack(self, source: str, settings: dict | None = None, known_class: int | None = None,
                     of_input: bool = False, path: str = "") -> None:
        """A new attack of the image captioned ``source``: the input when ``of_input`` (else an
        image derived from one, e.g. a purified image, whose caption names its origin's id);
        ``path``: the file the attacked image came from."""
        self.attack = AttackTrace(source=source, settings=settings, known_class=known_class,
                                  image_id=self.image_id if of_input else source,
                                  input_serial=self.image_serial if of_input else None,
                                  path=self.image_path if of_input else path)
        self._notify("attack")

    @property
    def attack_is_of_input(self) -> bool:
        """Whether the last attack was of the current input (not of an earlier one, nor of a derived image)."""
        return self.attack.input_serial is not None and self.attack.input_serial == self.image_serial

    def add_attack(self, records: list[AttackStep]) -> None:
        for r in records:
            self.attack.iterations.append(r.restart * r.total_iterations + r.iteration)
            self.attack.loss.append(float(r.loss[0]))
            self.attack.margin.append(float(r.margin[0]))
        self._notify("attack")

    def finish_attack(self, outcome: DefenseOutcome) -> None:
        self.attack.outcome = outcome
        self._notify("attack")

    # -- purification ------------------------------------------------------------------
    def begin_purification(self, source: str, settings: dict | None = None, known_class: int | None = None,
                           of_input: bool = False, path: str = "") -> None:
        """A new purification of the image captioned ``source`` (see :meth:`begin_attack`)."""
        self.purification = PurificationTrace(source=source, settings=settings, known_class=known_class,
                                              image_id=self.image_id if of_input else source,
                                              path=self.image_path if of_input else path)
        self._notify("purification")

    def add_purification(self, records: list[PurifyStep]) -> None:
        self.purification.records.extend(records)
        self._notify("purification")

    def finish_purification(self) -> None:
        self.purification.finished = True
        self._notify("purification")

    # -- exports -----------------------------------------------------------------------
    def csv_rows(self) -> list[list[Any]]:
        """Probabilities, likelihood curves, OOD score, purification and attack curves and the
        attack's verdict as tidy rows; each row starts with the id of the image its result is
        of (the attack and purification may be of an earlier input or of another tab's result;
        ids are unique, captions need not be)."""
        classes, rows = self.classes, []
        result, source = self.classification, self.image_id
        if self.probabilities is not None:
            rows += [[source, "probability", "", c, float(p)] for c, p in zip(classes, self.probabilities)]
        for step, logits, measured in zip(result.levels, result.logits, result.measured):
            # an eliminated class's estimate is not measured at later levels (the plot ends its curve too)
            rows += [[source, "classify_logit", step, c, float(v)] for c, v, m in zip(classes, logits, measured) if m]
        if result.ood is not None:
            rows.append([source, "ood_bits_per_dim", "", "", result.ood.bits_per_dim])
            if result.ood.percentile is not None:
                rows.append([source, "ood_percentile", "", "", result.ood.percentile])
        source = self.purification.image_id
        for rec in self.purification.records:
            rows.append([source, "purify_objective", rec.step, "", float(rec.objective[0])])
            if rec.objective_estimate is not None:
                rows.append([source, "purify_objective_estimate", rec.step, "", float(rec.objective_estimate[0])])
            rows += [[source, "purify_logit", rec.step, c, float(v)] for c, v in zip(classes, rec.logits[0])]
        source = self.attack.image_id
        for name, values in (("loss", self.attack.loss), ("margin", self.attack.margin)):
            rows += [[source, f"attack_{name}", int(x), "", y] for x, y in zip(self.attack.iterations, values)]
        if (outcome := self.attack.outcome) is not None:
            label = classes[int(outcome.labels[0])]
            # the label is the image's known class (1), else the attacked model's clean prediction (0)
            rows += [[source, "attack_label_known", "", label, int(self.attack.known_class is not None)],
                     [source, "attack_succeeded", "", label, int(outcome.attack_succeeded[0])],
                     [source, "defense_recovered", "", label, int(outcome.defense_recovered[0])],
                     [source, "attack_linf", "", "", float(outcome.linf[0])],
                     [source, "attack_l2", "", "", float(outcome.l2[0])]]
            rows += [[source, "defense_probability", "", c, float(p)]
                     for c, p in zip(classes, outcome.defense_probabilities[0])]
        return rows

    def results(self) -> dict[str, Any]:
        """The results part of a session file."""
        results: dict[str, Any] = {}
        if self.probabilities is not None:
            results["probabilities"] = [float(p) for p in self.probabilities]
        if self.classification.ood is not None:
            results["ood"] = self.classification.ood.to_dict()
        outcome = self.attack.outcome
        if outcome is not None:
            # of_input: whether the attacked image is the session's image (else an earlier input or a derived one)
            results["attack"] = {"success": bool(outcome.attack_succeeded[0]),
                                 "defense_recovered": bool(outcome.defense_recovered[0]),
                                 "linf": float(outcome.linf[0]), "l2": float(outcome.l2[0]),
                                 "label": int(outcome.labels[0]), "label_known": self.attack.known_class is not None,
                                 "source": self.attack.source, "of_input": self.attack_is_of_input}
        return results
