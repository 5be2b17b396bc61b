"""Live per-class likelihood estimates as the noise levels are processed."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QWidget

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class LikelihoodPlot(pg.PlotWidget):
    """One persistent curve per class: the running logit estimate vs. noise levels done.

    Logits are shown relative to the best class at each step (0 = leading class), so the
    curves stay readable whatever the absolute scale of the ELBO.
    """

    def __init__(self, classes: list[str], x_label: str = "noise levels processed",
                 parent: QWidget | None = None) -> None:
        super().__init__(parent=parent, background="w")
        self.setLabel("bottom", x_label)
        self.setLabel("left", "logit − max logit (nats)")
        self.showGrid(x=True, y=True, alpha=0.3)
        self.legend = self.addLegend(offset=(-5, 5), labelTextSize="8pt", colCount=2)
        self.set_classes(classes)

    def set_classes(self, classes: list[str]) -> None:
        self.clear()
        self.legend.clear()
        self.classes = list(classes)
        self.curves = [self.plot([], [], pen=pg.mkPen(PALETTE[i % len(PALETTE)], width=1.5), name=c)
                       for i, c in enumerate(classes)]
        self.reset()

    def reset(self) -> None:
        self.steps: list[int] = []
        self.history: list[np.ndarray] = []
        for curve in self.curves:
            curve.setData([], [])

    def add_point(self, levels_done: int, logits: np.ndarray) -> None:
        self.steps.append(int(levels_done))
        self.history.append(np.asarray(logits, dtype=float).copy())
        self.show_upto(len(self.steps))

    def show_upto(self, count: int) -> None:
        """Draw the first ``count`` stored points (the step scrubber replays with this)."""
        if count <= 0:
            for curve in self.curves:
                curve.setData([], [])
            return
        hist = np.stack(self.history[:count])
        rel = hist - hist.max(axis=1, keepdims=True)
        top = int(np.argmax(hist[-1]))
        x = np.asarray(self.steps[:count])
        for k, curve in enumerate(self.curves):
            curve.setData(x, rel[:, k])
            curve.setPen(pg.mkPen(PALETTE[k % len(PALETTE)], width=3.5 if k == top else 1.2))
