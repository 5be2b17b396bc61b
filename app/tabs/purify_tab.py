"""Purify tab: likelihood maximisation drawn live, then replayed with a scrubber whose
cursor follows on every plot."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QSlider, QSplitter, QVBoxLayout, QWidget

from ...core.purify import PurifySettings, PurifyStep
from ..session_state import SessionState
from ..widgets.image_view import ImageView
from ..widgets.likelihood_plot import LikelihoodPlot
from ..widgets.purify_panel import PurifyPanel
from ..widgets.step_plot import StepPlot


OBJECTIVE_ESTIMATE = "fixed-noise estimate"
"""The objective on the frozen estimate bank: the same noise at every step, comparable."""
OBJECTIVE_DRAW = "one draw"
"""The objective at each step's own noise draw (what the step descends), drawn faint."""


PURIFIED_TITLE = "Purified image (live)"


class PurifyTab(QWidget):
    """Shows a purification; ``attack_requested(image, caption, known_class)`` asks the window
    to attack the result (``known_class``: the purified image's label when known, else None)."""

    attack_requested = Signal(object, str, object)

    def __init__(self, state: SessionState, defaults: PurifySettings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        state.subscribe(self._on_state_changed)
        self.panel = PurifyPanel(defaults)
        self.panel.setMinimumWidth(200)
        self.panel.setMaximumWidth(270)
        self.view = ImageView(PURIFIED_TITLE)
        self.curves = LikelihoodPlot(state.classes, x_label="likelihood-maximisation step", markers=True)
        self.objective_plot = StepPlot("step", "diffusion loss (objective)", [OBJECTIVE_ESTIMATE, OBJECTIVE_DRAW],
                                       faint=(OBJECTIVE_DRAW,), legend_below=True)
        self.objective_plot.setToolTip("Bold: the objective on a fixed noise bank (the same noise levels and "
                                       "noise at every step, so steps compare); faint: its value at the "
                                       "single noise draw each step used")
        self.scrubber = QSlider(Qt.Orientation.Horizontal)
        self.scrubber.setEnabled(False)
        self.scrubber.valueChanged.connect(self._on_scrubber_value_changed)
        self.scrubber_label = QLabel("step –")
        self.attack_button = QPushButton("Attack this")
        self.attack_button.setToolTip("Attack the purified image shown (Attack tab)")
        self.attack_button.setEnabled(False)
        self.attack_button.clicked.connect(self._on_attack_button_clicked)
        scrub = QHBoxLayout()
        scrub.addWidget(QLabel("Replay:"))
        scrub.addWidget(self.scrubber, 1)
        scrub.addWidget(self.scrubber_label)
        scrub.addWidget(self.attack_button)
        top = QSplitter(Qt.Orientation.Horizontal)
        top.addWidget(self.view)
        top.addWidget(self.objective_plot)
        top.setChildrenCollapsible(False)
        curves_box = QWidget()
        cl = QVBoxLayout(curves_box)
        cl.setContentsMargins(2, 2, 2, 2)
        cl.addWidget(QLabel("<b>Per-class likelihood over the purification steps</b>"))
        cl.addWidget(self.curves, 1)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(top)
        split.addWidget(curves_box)
        split.setChildrenCollapsible(False)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(2, 2, 2, 2)
        rl.addWidget(split, 1)
        rl.addLayout(scrub)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.panel)
        layout.addWidget(right, 1)

    @property
    def records(self) -> list[PurifyStep]:
        return self.state.purification.records

    def set_classes(self, classes: list[str]) -> None:
        """Another model: its classes on the curves, and no result of the old one on show."""
        self.curves.set_classes(classes)
        self._clear()

    def _clear(self, x_extent: int | None = None) -> None:
        self.curves.reset(x_extent=x_extent)
        self.objective_plot.reset(x_extent=x_extent)
        self.view.set_image(None)
        self.view.title.setText(f"<b>{PURIFIED_TITLE}</b>")
        self._enable_replay(False)

    def _on_state_changed(self, event: str) -> None:
        if event == "restored":
            self.show_trace()

    def show_trace(self) -> None:
        """Draw the state's purification whole, as when its run ended (a reopened session's):
        its curves and the replay of its steps, from the last."""
        records = self.records
        self._clear(records[-1].total_steps if records else None)
        if not records:
            return
        self._draw(records)
        if self.state.purification.finished:
            self.finish(records)
        elif self.state.purification.error:
            self.failed()
        else:
            self.stopped()

    def begin(self, source: str, steps: int, settings: dict | None = None, known_class: int | None = None,
              of_input: bool = False, path: str = "") -> None:
        """A new purification of ``steps`` steps of the image captioned ``source`` (the input
        when ``of_input``; ``path``: the file it came from)."""
        self.state.begin_purification(source, settings, known_class, of_input, path)
        self.curves.reset(x_extent=steps)
        self.objective_plot.reset(x_extent=steps)
        self._enable_replay(False)
        self.view.title.setText(f"<b>Purifying: {source}</b>")

    def show_records(self, records: list[PurifyStep]) -> int:
        """Draw one flush of steps; returns the progress (steps done)."""
        records = [r for r in records if isinstance(r, PurifyStep)]
        if not records:
            return -1
        self.state.add_purification(records)
        self._draw(records)
        self._show_record(records[-1])
        return records[-1].step

    def _draw(self, records: list[PurifyStep]) -> None:
        """Add ``records`` to the curves and the objective plot."""
        steps = [r.step for r in records]
        self.curves.add_points(steps, [r.logits[0] for r in records])
        self.objective_plot.extend(OBJECTIVE_ESTIMATE, steps, [r.objective_estimate[0] for r in records])
        self.objective_plot.extend(OBJECTIVE_DRAW, steps, [r.objective[0] for r in records])

    def _enable_replay(self, enabled: bool) -> None:
        self.scrubber.setEnabled(enabled)
        self.attack_button.setEnabled(enabled)
        if not enabled:
            self.scrubber_label.setText("step –")

    def finish(self, records: list[PurifyStep]) -> None:
        if self.records and self.records[-1].step == self.records[-1].total_steps:  # not a stopped run's
            self.state.finish_purification()
        self.view.title.setText(f"<b>Purified: {self.state.purification.source}</b>")
        if self.records:
            self.scrubber.blockSignals(True)
            self.scrubber.setRange(0, len(self.records) - 1)
            self.scrubber.setValue(len(self.records) - 1)
            self.scrubber.blockSignals(False)
            self._enable_replay(True)
            self._on_scrubber_value_changed(len(self.records) - 1)

    def stopped(self, how: str = "Stopped") -> None:
        """The run ended early (``how``: ``"Stopped"``, or ``"Failed"`` after an error)."""
        done = self.records[-1].step if self.records else 0
        title = f"<b>{how}: {self.state.purification.source}</b>"
        self.view.title.setText(title)
        if self.records:  # the steps made can be replayed (and attacked)
            self.finish(self.records)
            self.view.title.setText(title)
            error = self.state.error_summary(self.state.purification.error) if how == "Failed" else ""
            reason = f" ({error})" if error else ""
            self.view.caption.setText(f"{how} after step {done}{reason}; replay the steps made below.")
            self.view.caption.setToolTip(self.state.purification.error.strip() if how == "Failed" else "")
        else:  # nothing of this run to show: not the last run's image either
            self.view.set_image(None, f"{how} before the first step.")

    def failed(self) -> None:
        self.stopped("Failed")

    def _show_record(self, record: PurifyStep) -> None:
        probs = np.exp(record.logits[0] - record.logits[0].max())
        probs /= probs.sum()
        top = int(np.argmax(probs))
        self.view.set_image(record.image[0], f"step {record.step}/{record.total_steps}: "
                            f"{self.state.classes[top]} ({probs[top]:.1%}), ‖x*−x‖∞ = "
                            f"{record.linf[0] * 255:.1f}/255, objective {record.objective_estimate[0]:.2f}")

    def _on_scrubber_value_changed(self, index: int) -> None:
        if 0 <= index < len(self.records):
            record = self.records[index]
            self._show_record(record)
            self.curves.set_cursor(record.step)
            self.objective_plot.set_cursor(record.step)
            self.scrubber_label.setText(f"step {record.step}")

    def _on_attack_button_clicked(self) -> None:
        index = self.scrubber.value()
        if 0 <= index < len(self.records):
            record = self.records[index]
            what = "unpurified" if record.step == 0 else f"purified, step {record.step}"
            # the caption names its origin by id: two images of one caption stay apart in a CSV export
            self.attack_requested.emit(record.image[0], f"{what} ({self.state.purification.image_id})",
                                       self.state.purification.known_class)
