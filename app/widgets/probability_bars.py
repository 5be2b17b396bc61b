"""Per-class probability bars with value labels, the predicted class highlighted, and a log scale."""
from __future__ import annotations

import html

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from .plotting import cache_axes

BAR_COLOUR = (120, 144, 176)
TOP_COLOUR = (214, 96, 40)
LOG_FLOOR = 1e-8
"""Smallest probability the log scale shows (bars of smaller values end there)."""


def value_label(p: float) -> str:
    """A probability as a short bar label: 99.7%, 0.25%, 3e-05."""
    if p >= 0.001:
        return f"{p:.1%}" if p < 0.9995 else f"{p:.2%}" if p < 1 else "100%"
    return f"{p:.0e}" if p > 0 else "0"


class ProbabilityBars(QWidget):
    """Bars of p(y | x) for each class; ``heights`` holds what is drawn."""

    def __init__(self, classes: list[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.verdict = QLabel("Drop an image to classify it")
        self.verdict.setStyleSheet("font-size: 16pt; font-weight: bold;")
        self.log_scale = QCheckBox("log scale")
        self.log_scale.setToolTip("Show small probabilities on a logarithmic axis (down to 1e-8)")
        self.log_scale.toggled.connect(self._on_log_scale_toggled)
        self.plot = pg.PlotWidget(background="w")
        self.plot.setMinimumSize(240, 140)
        self.plot.setMouseEnabled(False, False)
        self.plot.setLabel("left", "probability")
        self.plot.showGrid(y=True, alpha=0.3)
        cache_axes(self.plot)
        self.header = QHBoxLayout()  # the verdict's row
        self.header.addWidget(self.verdict, 1)
        self.details = QHBoxLayout()  # below it: a tab's own widgets, then the axis switch
        self.details.addStretch(1)
        self.details.addWidget(self.log_scale)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.setSpacing(2)
        layout.addLayout(self.header)
        layout.addLayout(self.details)
        layout.addWidget(self.plot, 1)
        self.bars: pg.BarGraphItem | None = None
        self.labels: list[pg.TextItem] = []
        self.set_classes(classes)

    def set_classes(self, classes: list[str]) -> None:
        self.classes = list(classes)
        self.heights = np.zeros(len(classes))
        if self.bars is not None:
            self.plot.removeItem(self.bars)
        for label in self.labels:
            self.plot.removeItem(label)
        self.bars = pg.BarGraphItem(x=np.arange(len(classes)), height=self.heights, width=0.7, brush=BAR_COLOUR)
        self.plot.addItem(self.bars)
        self.labels = []
        for k in range(len(classes)):
            label = pg.TextItem("", color=(40, 40, 40), anchor=(0.5, 1.0))
            self.plot.addItem(label)
            self.labels.append(label)
        self.plot.setXRange(-0.6, len(classes) - 0.4, padding=0)
        self.plot.getAxis("bottom").setTicks([list(enumerate(self.classes))])
        self._apply_scale()
        self._draw([BAR_COLOUR] * len(classes), show_labels=False)

    @property
    def log(self) -> bool:
        return self.log_scale.isChecked()

    def _on_log_scale_toggled(self, _checked: bool) -> None:
        self._apply_scale()
        top = int(np.argmax(self.heights))
        shown = self.heights.sum() > 0
        self._draw([TOP_COLOUR if shown and i == top else BAR_COLOUR for i in range(len(self.classes))], shown)

    def _apply_scale(self) -> None:
        """Linear: 0..1 (with room for the labels); log: decades from LOG_FLOOR to 1."""
        axis = self.plot.getAxis("left")
        if self.log:
            low = int(np.log10(LOG_FLOOR))
            axis.setTicks([[(float(e), "1" if e == 0 else f"1e{e}") for e in range(low, 1, 2)]])
            self.plot.setYRange(low, 0.9, padding=0)
            axis.setLabel("probability (log)")
        else:
            axis.setTicks(None)
            self.plot.setYRange(0, 1.12, padding=0)
            axis.setLabel("probability")

    def _draw(self, colours: list, show_labels: bool) -> None:
        """Bars (and their value labels) for :attr:`heights` on the current scale."""
        if self.log:
            low = np.log10(LOG_FLOOR)
            tops = np.log10(np.clip(self.heights, LOG_FLOOR, 1.0))
            self.bars.setOpts(y0=np.full(len(tops), low), height=tops - low, brushes=[pg.mkBrush(c) for c in colours])
        else:
            tops = self.heights
            self.bars.setOpts(y0=np.zeros(len(tops)), height=tops, brushes=[pg.mkBrush(c) for c in colours])
        for k, label in enumerate(self.labels):
            label.setText(value_label(float(self.heights[k])) if show_labels else "")
            label.setPos(k, float(tops[k]) + (0.05 if self.log else 0.0))

    def set_probabilities(self, probabilities: np.ndarray | None, final: bool = True,
                          text: str = "Drop an image to classify it", known_class: int | None = None) -> None:
        """Draw ``probabilities`` (a running estimate unless ``final``); None: empty bars
        under ``text``. A final verdict names ``known_class`` (the input's label, when known)
        and whether the prediction matches it."""
        if probabilities is None:
            self.heights = np.zeros(len(self.classes))
            self._draw([BAR_COLOUR] * len(self.classes), show_labels=False)
            self.verdict.setText(text)
            return
        self.heights = np.asarray(probabilities, dtype=float).copy()
        top = int(np.argmax(self.heights))
        self._draw([TOP_COLOUR if i == top else BAR_COLOUR for i in range(len(self.classes))], show_labels=True)
        prefix = "Predicted" if final else "Leading"
        text = f"{prefix}: {self.classes[top]} ({self.heights[top]:.1%})"
        if final and known_class is not None and 0 <= known_class < len(self.classes):
            right = top == known_class
            text = (f"{text}&nbsp;&nbsp;<span style='font-size: 11pt; color: {'#1a7f37' if right else '#c62828'}'>"
                    f"{'✓' if right else '✗'} label {html.escape(self.classes[known_class])}: "
                    f"{'right' if right else 'wrong'}</span>")
        self.verdict.setText(text)

    @property
    def predicted(self) -> int | None:
        return int(np.argmax(self.heights)) if self.heights.sum() > 0 else None
