"""Classify tab: probability bars, the per-class likelihood curves of the running estimate,
and beside the verdict how typical the input is for the model (its OOD score)."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QSplitter, QVBoxLayout, QWidget

from ...core.classifier import ClassifyStep
from ...core.ood import OodScore
from ..session_state import SessionState
from ..widgets.likelihood_plot import LikelihoodPlot
from ..widgets.ood_label import OodLabel
from ..widgets.probability_bars import ProbabilityBars


CLASSIFYING = "Classifying…"
NO_IMAGE = "Drop an image to classify it"


class ClassifyTab(QSplitter):
    """Shows a classification as it converges; writes its records into the session state."""

    def __init__(self, state: SessionState, parent: QWidget | None = None) -> None:
        super().__init__(Qt.Orientation.Vertical, parent)
        self.state = state
        self.bars = ProbabilityBars(state.classes)
        self.curves = LikelihoodPlot(state.classes)
        self.curves.setToolTip("Each class's running log-likelihood estimate relative to the leader. With "
                               "progressive class elimination, a class that is not among the leaders after the "
                               "screening levels is not evaluated further: its curve ends there.")
        self.ood = OodLabel()
        self.bars.details.insertWidget(0, self.ood, 1)
        curves_box = QWidget()
        cl = QVBoxLayout(curves_box)
        cl.setContentsMargins(2, 2, 2, 2)
        cl.addWidget(QLabel("<b>Per-class likelihood estimate, converging over noise levels</b>"))
        cl.addWidget(self.curves, 1)
        self.addWidget(self.bars)
        self.addWidget(curves_box)
        self.setChildrenCollapsible(False)
        self.setSizes([360, 360])

    def set_classes(self, classes: list[str]) -> None:
        """Another model: its classes, and no result of the old one on show (verdict, OOD score)."""
        self.bars.set_classes(classes)
        self.bars.set_probabilities(None, text=NO_IMAGE)
        self.curves.set_classes(classes)
        self.ood.clear_score()

    def begin(self, levels: int, settings: dict | None = None) -> None:
        """A new classification of ``levels`` noise levels with classifier ``settings``."""
        self.state.begin_classification(settings)
        self.curves.reset(x_extent=levels)
        self.bars.set_probabilities(None, text=CLASSIFYING)  # never the last image's verdict
        self.ood.clear_score()

    def show_records(self, records: list[ClassifyStep | OodScore]) -> int:
        """Draw one flush of records; returns the progress (levels done, -1: no new level)."""
        for score in (r for r in records if isinstance(r, OodScore)):
            self.state.set_ood(score)
            self.ood.show_score(score)
        records = [r for r in records if isinstance(r, ClassifyStep)]
        if not records:
            return -1
        last = records[-1]
        # a class is measured by a record unless elimination left all its errors NaN
        measured = [~np.isnan(r.level_errors[0]).all(axis=0) for r in records]
        self.state.add_classification(records, measured)
        self.curves.add_points([r.levels_done for r in records], [r.logits[0] for r in records], measured)
        final = last.levels_done == last.total_levels
        if final:  # the classification is done here: the OOD score that may follow only adds to it
            self.state.finish_classification(last)
        self.bars.set_probabilities(last.probabilities[0], final=final, known_class=self.state.image_known_class)
        return last.levels_done

    def finish(self, final: ClassifyStep) -> None:
        self.state.finish_classification(final)
        self.bars.set_probabilities(self.state.probabilities, final=True, known_class=self.state.image_known_class)

    def stopped(self) -> None:
        text = self.bars.verdict.text()
        if text.startswith("Leading"):
            self.bars.verdict.setText(f"Stopped. {text}")
        elif text == CLASSIFYING:
            self.bars.verdict.setText("Stopped before the first noise level")
        elif self.state.probabilities is not None and self.state.classification.ood is None and not self.ood.text():
            self.ood.clear_score("OOD score: stopped before it was computed")

    def failed(self) -> None:
        """The classification ended with an error: never leave it looking as if it still ran."""
        text = self.bars.verdict.text()
        if self.state.probabilities is not None:  # only the OOD score failed
            if not self.ood.text():
                self.ood.clear_score("OOD score failed (see the message)")
        elif text.startswith("Leading"):
            self.bars.verdict.setText(f"Failed (see the message). {text}")
        else:
            self.bars.set_probabilities(None, text="Classification failed (see the message)")
