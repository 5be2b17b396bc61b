"""The window's document, without Qt: the input image and each tab's latest results.

The views write the records of their jobs here and observe it; exports (CSV, session
file) read only from here, never from a widget. Observers are plain callables
``observer(event)`` with ``event`` one of :data:`EVENTS`: ``"restored"`` says that the
attack and purification were replaced whole (by a reopened session's), so the views draw
them from here.

A session file's ``results`` (:meth:`SessionState.results`) carry the attack and the
purification whole (``attack_trace``, ``purification_trace``); :func:`saved_results`
reads them back, checked, and :meth:`SessionState.restore` puts them in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..core.attacks import AttackSettings, AttackStep, DefenseOutcome
from ..core.choices import GRAD_MODES, real_number
from ..core.classifier import ClassifyStep
from ..core.ood import OodScore
from ..core.purify import PurifySettings, PurifyStep
from ..core.session import (SessionError, checked_array, checked_object, checked_whole_numbers, decode_outcome,
                            decode_purify_steps, encode_array, encode_outcome, encode_purify_steps)
from .jobs import AttackOutcome

EVENTS = ("image", "classification", "attack", "purification", "restored")
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
class AttackIterate:
    """An attack's latest iterate, which the Attack tab shows until the verdict comes."""

    iteration: int  # within its restart, as the tab captions it
    image: np.ndarray  # (C, H, W)
    prediction: int  # the attacked model's


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
    image: np.ndarray | None = None  # the attacked image (C, H, W), as attacked (8-bit rounded)
    latest: AttackIterate | None = None  # the latest iterate, until the verdict replaces it
    error: str = ""  # the error that ended the run, if one did (then there is no verdict)


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
    input_serial: int | None = None  # the serial of the input when the input itself was purified, else None
    error: str = ""  # the error that ended the run, if one did (then it is not finished)


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
                     of_input: bool = False, path: str = "", image: np.ndarray | None = None) -> None:
        """A new attack of the image captioned ``source``: the input when ``of_input`` (else an
        image derived from one, e.g. a purified image, whose caption names its origin's id);
        ``path``: the file the attacked image came from; ``image``: the attacked image (C, H, W)."""
        self.attack = AttackTrace(source=source, settings=settings, known_class=known_class,
                                  image_id=self.image_id if of_input else source,
                                  input_serial=self.image_serial if of_input else None,
                                  path=self.image_path if of_input else path,
                                  image=None if image is None else np.array(image, dtype=np.float32, copy=True))
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
        if records:
            last = records[-1]
            self.attack.latest = AttackIterate(int(last.iteration), last.image[0], int(last.prediction[0]))
        self._notify("attack")

    def finish_attack(self, outcome: DefenseOutcome) -> None:
        self.attack.outcome = outcome
        self.attack.latest = None  # the verdict's adversarial image replaces it
        self._notify("attack")

    # -- purification ------------------------------------------------------------------
    def begin_purification(self, source: str, settings: dict | None = None, known_class: int | None = None,
                           of_input: bool = False, path: str = "") -> None:
        """A new purification of the image captioned ``source`` (see :meth:`begin_attack`)."""
        self.purification = PurificationTrace(source=source, settings=settings, known_class=known_class,
                                              image_id=self.image_id if of_input else source,
                                              path=self.image_path if of_input else path,
                                              input_serial=self.image_serial if of_input else None)
        self._notify("purification")

    @property
    def purification_is_of_input(self) -> bool:
        """Whether the last purification was of the current input (see :attr:`attack_is_of_input`)."""
        return self.purification.input_serial is not None and self.purification.input_serial == self.image_serial

    def add_purification(self, records: list[PurifyStep]) -> None:
        self.purification.records.extend(records)
        self._notify("purification")

    def finish_purification(self) -> None:
        self.purification.finished = True
        self._notify("purification")

    @staticmethod
    def error_summary(error: str, limit: int = 120) -> str:
        """The first line of a run's error, shortened to ``limit`` characters ("" for none): about
        two lines of a verdict; the whole error goes in its tooltip and the error dialog."""
        lines = error.strip().splitlines()
        line = lines[0] if lines else ""
        return line if len(line) <= limit else line[:limit - 1] + "\u2026"

    def fail(self, kind: str, message: str) -> None:
        """The running ``"attack"`` or ``"purify"`` job ended with an error: its trace keeps
        the message (a reopened session says that it failed and why, not that it was stopped)."""
        trace = {"attack": self.attack, "purify": self.purification}.get(kind)
        if trace is not None:
            trace.error = message[:MAX_TEXT]

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
        """The results part of a session file: the probabilities, the OOD score, a summary of
        the attack's verdict (``attack``, read by older versions) and the attack and the
        purification whole (``attack_trace``, ``purification_trace``; see :func:`saved_results`)."""
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
        if self.attack.iterations or outcome is not None:
            results["attack_trace"] = attack_trace_to_dict(self.attack, self.attack_is_of_input)
        records = self.purification.records
        if records and all(r.logits is not None and r.objective_estimate is not None for r in records):
            results["purification_trace"] = purification_trace_to_dict(self.purification,
                                                                       self.purification_is_of_input)
        return results

    def restore(self, saved: SavedResults) -> None:
        """Put a reopened session's attack and purification in (those it has; the others
        stay), then notify ``"restored"``. Call it after the session's image is set: a trace
        the session recorded as of its image counts as of this input (its id, its serial)."""
        if saved.attack is None and saved.purification is None:
            return
        for trace, of_input in ((saved.attack, saved.attack_of_input),
                                (saved.purification, saved.purification_of_input)):
            if trace is None:
                continue
            if of_input:
                trace.image_id, trace.input_serial, trace.path = self.image_id, self.image_serial, self.image_path
            else:
                trace.input_serial = None
                if trace.image_id == self.image_id:  # an earlier window's id that this window gave its input
                    trace.image_id += " (from the session)"
        if saved.attack is not None:
            self.attack = saved.attack
        if saved.purification is not None:
            self.purification = saved.purification
        self._notify("restored")


# -- the attack and the purification in a session file ------------------------------------------------------
MAX_TEXT = 4096
"""The longest caption or id a saved trace may hold."""
ATTACK_GRADIENTS = GRAD_MODES + ("dc-only",)
"""The Attack panel's gradient choices (``dc-only``: the classifier alone is attacked)."""


@dataclass
class SavedResults:
    """The attack and the purification of a session file, checked (:func:`saved_results`);
    ``*_of_input``: whether each was of the session's own image."""

    attack: AttackTrace | None = None
    attack_of_input: bool = False
    purification: PurificationTrace | None = None
    purification_of_input: bool = False


def attack_trace_to_dict(trace: AttackTrace, of_input: bool) -> dict[str, Any]:
    """An attack as a session file stores it (``of_input``: it was of the session's image).

    The curves, the verdict (:func:`~rdc_studio.core.session.encode_outcome`) and, for an
    attack without a verdict (stopped), the attacked image and the latest iterate; arrays
    exact (:func:`~rdc_studio.core.session.encode_array`). Not the attacked image's file
    path: a session names no file of the user's but its model's (as for its own image).
    """
    latest = trace.latest if trace.outcome is None else None
    return {"iterations": [int(i) for i in trace.iterations],
            "loss": encode_array(np.array(trace.loss, np.float32)),
            "margin": encode_array(np.array(trace.margin, np.float32)),
            "outcome": None if trace.outcome is None else encode_outcome(trace.outcome),
            "image": None if trace.outcome is not None or trace.image is None else encode_array(trace.image),
            "latest": None if latest is None else {"iteration": latest.iteration, "image": encode_array(latest.image),
                                                   "prediction": latest.prediction},
            "source": trace.source, "known_class": trace.known_class, "settings": trace.settings,
            "image_id": trace.image_id, "of_input": bool(of_input), "error": trace.error}


def purification_trace_to_dict(trace: PurificationTrace, of_input: bool) -> dict[str, Any]:
    """A purification as a session file stores it: every step's record (the Purify tab's
    replay shows each step's image; :func:`~rdc_studio.core.session.encode_purify_steps`)."""
    return {"steps": encode_purify_steps(trace.records), "finished": bool(trace.finished),
            "source": trace.source, "known_class": trace.known_class, "settings": trace.settings,
            "image_id": trace.image_id, "of_input": bool(of_input), "error": trace.error}


def _text(obj: dict[str, Any], key: str, what: str) -> str:
    """``obj[key]`` as a caption or id ("" when absent), checked."""
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise SessionError(f"{what}'s {key} must be text of at most {MAX_TEXT} characters, not {value!r:.60}")
    return value


def _flag(obj: dict[str, Any], key: str, what: str) -> bool:
    """``obj[key]`` as true or false (false when absent), checked."""
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise SessionError(f"{what}'s {key} must be true or false, not {value!r:.60}")
    return value


def _known_class(obj: dict[str, Any], num_classes: int, what: str) -> int | None:
    """``obj["known_class"]``: a class index of the model, or None."""
    value = obj.get("known_class")
    if value is not None and (type(value) is not int or not 0 <= value < num_classes):
        raise SessionError(f"{what}'s known_class must be a class index in 0-{num_classes - 1} or null, "
                           f"not {value!r:.60}")
    return value


def _purify_settings(value: Any, what: str) -> dict[str, Any]:
    """Purification settings as ``PurifySettings.to_dict()`` gives them (keys of other versions left out)."""
    checked_object(value, f"{what}'s purification settings")
    try:
        return PurifySettings(**{k: v for k, v in value.items() if k in PurifySettings.__dataclass_fields__}).to_dict()
    except (TypeError, ValueError) as exc:
        raise SessionError(f"{what}'s purification settings are unusable ({exc})") from None


def _attack_run_settings(value: Any, what: str) -> dict[str, Any] | None:
    """The settings of an attack's run (attack, attack_gradient, attack_binarize, purify), checked."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("attack"), dict):
        raise SessionError(f"{what}'s settings must be an object with the attack's, not {value!r:.60}")
    try:
        attack = AttackSettings(**{k: v for k, v in value["attack"].items()
                                   if k in AttackSettings.__dataclass_fields__}).to_dict()
        binarize = value.get("attack_binarize")
        binarize = None if binarize is None else real_number("attack_binarize", binarize, 0, 1)
    except (TypeError, ValueError) as exc:
        raise SessionError(f"{what}'s settings are unusable ({exc})") from None
    gradient = value.get("attack_gradient")
    if gradient not in ATTACK_GRADIENTS:
        raise SessionError(f"{what}'s attack_gradient must be one of {ATTACK_GRADIENTS}, not {gradient!r:.60}")
    return {"attack": attack, "attack_gradient": gradient, "attack_binarize": binarize,
            "purify": _purify_settings(value.get("purify"), what)}


def attack_trace_from_dict(obj: Any, classes: list[str], image_shape: tuple[int, int, int]) -> tuple[AttackTrace, bool]:
    """The attack :func:`attack_trace_to_dict` wrote, checked against the model (its
    ``classes`` and input ``image_shape``), and whether it was of the session's image.

    Raises
    ------
    SessionError
        Naming the field and the problem.
    """
    what = "the saved attack"
    checked_object(obj, what)
    k = len(classes)
    iterations = checked_whole_numbers(obj.get("iterations"), f"{what}'s iterations")
    n = len(iterations)
    if any(b <= a for a, b in zip(iterations, iterations[1:])):
        raise SessionError(f"{what}'s iterations must increase")
    loss = checked_array(obj.get("loss"), f"{what}'s loss", (n,), finite=False)
    margin = checked_array(obj.get("margin"), f"{what}'s margin", (n,), finite=False)
    outcome = None
    if obj.get("outcome") is not None:
        try:
            outcome = decode_outcome(obj["outcome"], k, image_shape, AttackOutcome)
        except SessionError as exc:
            raise SessionError(f"{what}: {exc}") from None
    elif n == 0:
        raise SessionError(f"{what} has neither iterations nor a verdict")
    error = _text(obj, "error", what)
    if outcome is not None and error:
        raise SessionError(f"{what} has both a verdict and an error")
    known = _known_class(obj, k, what)
    if outcome is not None and known is not None and int(outcome.labels[0]) != known:
        raise SessionError(f"{what}'s label {int(outcome.labels[0])} is not its known class {known}")
    if outcome is not None:
        image, latest = outcome.clean[0], None
    else:
        image = None if obj.get("image") is None else checked_array(obj["image"], f"{what}'s image", image_shape,
                                                                     0.0, 1.0)
        latest = obj.get("latest")
        if latest is not None:
            checked_object(latest, f"{what}'s latest iterate")
            latest = AttackIterate(
                checked_whole_numbers([latest.get("iteration")], f"{what}'s latest iteration")[0],
                checked_array(latest.get("image"), f"{what}'s latest iterate", image_shape, 0.0, 1.0),
                checked_whole_numbers([latest.get("prediction")], f"{what}'s latest prediction", 1, 0, k - 1)[0])
    trace = AttackTrace(iterations=iterations, loss=[float(v) for v in loss], margin=[float(v) for v in margin],
                        outcome=outcome, source=_text(obj, "source", what), known_class=known,
                        settings=_attack_run_settings(obj.get("settings"), what),
                        image_id=_text(obj, "image_id", what), image=image,
                        latest=latest, error=error)
    return trace, _flag(obj, "of_input", what)


def purification_trace_from_dict(obj: Any, classes: list[str],
                                 image_shape: tuple[int, int, int]) -> tuple[PurificationTrace, bool]:
    """The purification :func:`purification_trace_to_dict` wrote, checked against the model,
    and whether it was of the session's image.

    Raises
    ------
    SessionError
        Naming the field and the problem.
    """
    what = "the saved purification"
    checked_object(obj, what)
    try:
        records = decode_purify_steps(obj.get("steps"), len(classes), image_shape)
    except SessionError as exc:
        raise SessionError(f"{what}: {exc}") from None
    finished = _flag(obj, "finished", what)
    error = _text(obj, "error", what)
    if finished and error:
        raise SessionError(f"{what} is marked both finished and failed")
    if finished and records[-1].step != records[-1].total_steps:
        raise SessionError(f"{what} is marked finished but ends at step {records[-1].step} "
                           f"of {records[-1].total_steps}")
    settings = obj.get("settings")
    settings = None if settings is None else _purify_settings(settings, what)
    if settings is not None and settings["steps"] != records[-1].total_steps:
        raise SessionError(f"{what}'s settings say {settings['steps']} steps, its records {records[-1].total_steps}")
    trace = PurificationTrace(records=records, source=_text(obj, "source", what),
                              known_class=_known_class(obj, len(classes), what), finished=finished,
                              settings=settings, image_id=_text(obj, "image_id", what), error=error)
    return trace, _flag(obj, "of_input", what)


def saved_results(results: Any, classes: list[str], image_shape: tuple[int, int, int]) -> SavedResults:
    """The attack and the purification a session's ``results`` hold, checked against the
    model (its ``classes``, its input ``image_shape`` (C, H, W)); none where the session has
    none (older sessions stored only a summary of the attack).

    Raises
    ------
    SessionError
        When a saved trace is malformed: the message names the trace, the field and the problem.
    """
    checked_object(results, "the session's results")
    saved = SavedResults()
    if results.get("attack_trace") is not None:
        saved.attack, saved.attack_of_input = attack_trace_from_dict(results["attack_trace"], classes, image_shape)
    if results.get("purification_trace") is not None:
        saved.purification, saved.purification_of_input = purification_trace_from_dict(
            results["purification_trace"], classes, image_shape)
    return saved
