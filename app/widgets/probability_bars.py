"""Per-class probability bars with the predicted class highlighted."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from .plotting import cache_axes

BAR_COLOUR = (120, 144, 176)
TOP_COLOUR = (214, 96, 40)


class ProbabilityBars(QWidget):
    """Bars of p(y | x) for each class; ``heights`` holds what is drawn."""

    def __init__(self, classes: list[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.verdict = QLabel("Drop an image to classify it")
        self.verdict.setStyleSheet("font-size: 16pt; font-weight: bold;")
        self.plot = pg.PlotWidget(background="w")
        self.plot.setYRange(0, 1.0, padding=0.02)
        self.plot.setMouseEnabled(False, False)
        self.plot.setLabel("left", "probability")
        self.plot.showGrid(y=True, alpha=0.3)
        cache_axes(self.plot)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.verdict)
        layout.addWidget(self.plot, 1)
        self.bars: pg.BarGraphItem | None = None
        self.set_classes(classes)

    def set_classes(self, classes: list[str]) -> None:
        self.classes = list(classes)
        self.heights = np.zeros(len(classes))
        if self.bars is not None:
            self.plot.removeItem(self.bars)
        self.bars = pg.BarGraphItem(x=np.arange(len(classes)), height=self.heights, width=0.7, brush=BAR_COLOUR)
        self.plot.addItem(self.bars)
        self.plot.setXRange(-0.6, len(classes) - 0.4, padding=0)
        self.plot.getAxis("bottom").setTicks([list(enumerate(self.classes))])

    def set_probabilities(self, probabilities: np.ndarray | None, final: bool = True) -> None:
        if probabilities is None:
            self.heights = np.zeros(len(self.classes))
            self.bars.setOpts(height=self.heights, brushes=[pg.mkBrush(BAR_COLOUR)] * len(self.classes))
            self.verdict.setText("Drop an image to classify it")
            return
        self.heights = np.asarray(probabilities, dtype=float).copy()
        top = int(np.argmax(self.heights))
        brushes = [pg.mkBrush(TOP_COLOUR if i == top else BAR_COLOUR) for i in range(len(self.classes))]
        self.bars.setOpts(height=self.heights, brushes=brushes)
        prefix = "Predicted" if final else "Leading"
        self.verdict.setText(f"{prefix}: {self.classes[top]}  ({self.heights[top]:.1%})")

    @property
    def predicted(self) -> int | None:
        return int(np.argmax(self.heights)) if self.heights.sum() > 0 else None
