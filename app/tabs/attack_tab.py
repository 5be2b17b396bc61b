"""Attack tab: settings, the four image panes (original, perturbation, adversarial, purified),
the verdict and the loss / margin curves."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QPushButton, QSplitter, QVBoxLayout, QWidget

from ...core.attacks import AttackStep, DefenseOutcome
from ..session_state import SessionState
from ..widgets.attack_panel import AttackPanel
from ..widgets.image_view import ImageView, PerturbationView
from ..widgets.step_plot import StepPlot

VERDICT_STYLE = "font-size: 12pt; font-weight: bold; color: {};"
NEUTRAL, GOOD, BAD = "#444", "#1a7f37", "#c62828"


class ImageGrid(QWidget):
    """Image panes in one row or in a 2x2 grid, whichever gives each the larger square."""

    def __init__(self, views: list[QWidget], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.views = views
        self.columns = 0
        self.grid = QGridLayout(self)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.setMinimumHeight(170)
        self._arrange(len(views))

    def _arrange(self, columns: int) -> None:
        if columns == self.columns:
            return
        self.columns = columns
        for v in self.views:
            self.grid.removeWidget(v)
        for i, v in enumerate(self.views):
            self.grid.addWidget(v, i // columns, i % columns)
        for c in range(len(self.views)):
            self.grid.setColumnStretch(c, 1 if c < columns else 0)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        super().resizeEvent(event)
        n, w, h = len(self.views), self.width(), self.height()
        row = min(w / n, h)
        square = min(w / 2, h / ((n + 1) // 2))
        self._arrange(n if row >= square else 2)


class AttackTab(QWidget):
    """Shows an attack live and the full defense's verdict; ``purify_requested(image, caption,
    known_class)`` asks the window to purify the adversarial image (``known_class``: the
    attacked image's label when known, else None)."""

    purify_requested = Signal(object, str, object)

    def __init__(self, state: SessionState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.binarize: float | None = None  # the shown attack's defense binarises its input at this threshold
        state.subscribe(self._on_state_changed)
        self.panel = AttackPanel(state.classes)
        self.panel.setMinimumWidth(200)
        self.panel.setMaximumWidth(270)
        self.view_original = ImageView("Original")
        self.view_perturbation = PerturbationView("Perturbation")
        self.view_adversarial = ImageView("Adversarial")
        self.view_purified = ImageView("Adversarial, purified")
        self.views = [self.view_original, self.view_perturbation, self.view_adversarial, self.view_purified]
        images = ImageGrid(self.views)
        self.verdict = QLabel("Run an attack to see the verdict")
        self.verdict.setWordWrap(True)
        self.purify_button = QPushButton("Purify this")
        self.purify_button.setToolTip("Run likelihood maximisation on the adversarial image (Purify tab)")
        self.purify_button.setEnabled(False)
        self.purify_button.clicked.connect(self._on_purify_button_clicked)
        verdict_row = QHBoxLayout()
        verdict_row.addWidget(self.verdict, 1)
        verdict_row.addWidget(self.purify_button, 0, Qt.AlignmentFlag.AlignTop)
        self.plot = StepPlot("iteration", "loss / margin", ["loss", "margin"])
        lower = QWidget()
        ll = QVBoxLayout(lower)
        ll.setContentsMargins(2, 2, 2, 2)
        ll.addLayout(verdict_row)
        ll.addWidget(self.plot, 1)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(images)
        split.addWidget(lower)
        split.setChildrenCollapsible(False)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.panel)
        layout.addWidget(split, 1)
        self.reset()

    def set_classes(self, classes: list[str]) -> None:
        """Another model: its classes as targets, and no result of the old one on show."""
        self.panel.set_classes(classes)
        self.reset()

    def reset(self) -> None:
        """Show no attack (the state holds none)."""
        for v in self.views:
            v.set_image(None)
        self.view_perturbation.set_perturbation(None)
        self.plot.reset()
        self.purify_button.setEnabled(False)
        self._set_verdict("Run an attack to see the verdict", NEUTRAL)

    @property
    def defense_name(self) -> str:
        """The defense that gives the verdict, as the verdict names it."""
        binarize = self.binarize
        return "the full RDC" if binarize is None else f"the full RDC on the input binarised at {binarize:.2f}"

    def _on_state_changed(self, event: str) -> None:
        if event == "restored":
            self.show_trace()

    def show_trace(self) -> None:
        """Draw the state's attack whole, as when its run ended (a reopened session's): its
        curves, images and verdict, or that it stopped without one."""
        trace = self.state.attack
        self.reset()
        settings = trace.settings or {}
        self.binarize = settings.get("attack_binarize")
        attack = settings.get("attack")
        self.plot.reset(x_extent=attack["steps"] * attack["restarts"] if attack else None)
        original = trace.outcome.clean[0] if trace.outcome is not None else trace.image
        if original is None and not trace.iterations:
            return
        self.view_original.set_image(original, trace.source)
        self.plot.extend("loss", trace.iterations, trace.loss)
        self.plot.extend("margin", trace.iterations, trace.margin)
        if trace.outcome is not None:
            self._show_outcome()
            return
        if trace.latest is not None:
            self._show_latest()
        if trace.error:
            self.failed()
        else:
            self.stopped()

    def _set_verdict(self, text: str, colour: str, details: str = "") -> None:
        self.verdict.setText(text)
        self.verdict.setStyleSheet(VERDICT_STYLE.format(colour))
        self.verdict.setToolTip(details)

    def begin(self, x: np.ndarray, source: str, iterations: int, binarize: float | None = None,
              settings: dict | None = None, known_class: int | None = None, of_input: bool = False,
              path: str = "") -> None:
        """A new attack on ``x`` (C, H, W) of ``iterations`` iterations in all, against a
        defense that binarises its input at ``binarize`` (None: it does not); ``settings``:
        the run's, as a session records them; ``known_class``: the label of ``x`` when known
        (else the attacked model's prediction on it is the label); ``of_input``: ``x`` is the
        window's input; ``path``: the file ``x`` came from (export never overwrites it)."""
        self.binarize = binarize
        self.state.begin_attack(source, settings, known_class, of_input, path, image=x)
        self.plot.reset(x_extent=iterations)
        for v in (self.view_adversarial, self.view_purified):
            v.set_image(None)
        self.view_perturbation.set_perturbation(None)
        self.view_original.set_image(x, source)
        self.purify_button.setEnabled(False)
        self._set_verdict("Attacking…", NEUTRAL)

    def show_records(self, records: list[AttackStep]) -> int:
        """Draw one flush of iterations; returns the progress (iterations done)."""
        records = [r for r in records if isinstance(r, AttackStep)]
        if not records:
            return -1
        self.state.add_attack(records)
        trace = self.state.attack
        n = len(records)
        self.plot.extend("loss", trace.iterations[-n:], trace.loss[-n:])
        self.plot.extend("margin", trace.iterations[-n:], trace.margin[-n:])
        self._show_latest()
        return trace.iterations[-1]

    def _show_latest(self) -> None:
        """The state's latest iterate in the adversarial pane, and its perturbation."""
        latest = self.state.attack.latest
        self.view_adversarial.set_image(latest.image, f"iteration {latest.iteration}: predicted "
                                        f"{self.state.classes[latest.prediction]}")
        if self.view_original.image is not None:
            self.view_perturbation.set_perturbation(latest.image - self.view_original.image)

    def finish(self, outcome: DefenseOutcome) -> None:
        self.state.finish_attack(outcome)
        self._show_outcome()

    def _show_outcome(self) -> None:
        """The state's verdict: the adversarial and purified panes, the verdict line, the plot's note."""
        outcome = self.state.attack.outcome
        classes = self.state.classes
        label = int(outcome.labels[0])
        adv_pred = int(outcome.attacked_prediction[0])
        probs = outcome.defense_probabilities[0]
        defended = int(np.argmax(probs))
        self.view_adversarial.set_image(outcome.adversarial[0], f"attacked model says {classes[adv_pred]}")
        self.view_perturbation.set_perturbation(outcome.adversarial[0] - outcome.clean[0])
        if outcome.purified is not None:
            self.view_purified.set_image(outcome.purified[0], f"defense says {classes[defended]} ({probs[defended]:.1%})")
        says = f"{self.defense_name} predicts {classes[defended]} ({probs[defended]:.1%})"
        # the label is the image's known class, else the attacked model's prediction on it
        was = f"{'labelled' if self.state.attack.known_class is not None else 'predicted'} {classes[label]}"
        if outcome.attack_succeeded[0]:
            attack = f"Attack succeeded ({was} → {classes[adv_pred]})"
            defense = "the defense recovered" if outcome.defense_recovered[0] else "the defense failed"
            verdict = f"{attack}; {defense}: {says}."
        elif outcome.defense_recovered[0]:
            verdict = f"Attack failed ({was}, still {classes[adv_pred]}); the defense holds: {says}."
        else:  # the attacked model (e.g. DC only, or another gradient mode) held, the full defense did not
            verdict = (f"Attack failed against the attacked model ({was}, still {classes[adv_pred]}), "
                       f"but {says}: the defense failed.")
        self._set_verdict(verdict, GOOD if outcome.defense_recovered[0] else BAD)
        if not self.state.attack.iterations and outcome.attack_succeeded[0]:
            # Square's initial stripes often fool a model outright, and a labelled image may be misclassified
            # already: say why the plot is empty. Only the clean image's prediction tells the two apart (the
            # adversarial one is wrong in both cases).
            clean_correct = getattr(outcome, "clean_correct", None)
            already = clean_correct is not None and not bool(clean_correct[0])
            self.plot.set_message("No iteration ran: " + ("the attacked model misclassifies this "
                                  f"{'labelled ' if self.state.attack.known_class is not None else ''}image already."
                                  if already else "the attack's starting point already fooled the attacked model."))
        self.purify_button.setEnabled(True)

    def stopped(self) -> None:
        done = len(self.state.attack.iterations)
        self._set_verdict(f"Stopped after {done} iteration{'s' if done != 1 else ''}: no verdict.", NEUTRAL)

    def failed(self) -> None:
        error = self.state.error_summary(self.state.attack.error)
        self._set_verdict("The attack failed with an error" + (f": {error}" if error else "."), BAD,
                          details=self.state.attack.error.strip())

    def _on_purify_button_clicked(self) -> None:
        outcome = self.state.attack.outcome
        if outcome is None:
            return
        # the caption names its origin by id: two images of one caption stay apart in a CSV export
        caption, known = f"adversarial ({self.state.attack.image_id})", self.state.attack.known_class
        if self.binarize is None:
            self.purify_requested.emit(outcome.adversarial[0], caption, known)
        else:  # what the defense purified: the binarised image
            binary = (outcome.adversarial[0] > self.binarize).astype(outcome.adversarial.dtype)
            self.purify_requested.emit(binary, f"{caption}, binarised at {self.binarize:.2f}", known)
