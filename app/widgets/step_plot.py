"""A small live line plot with persistent named curves (loss, margin, objective)."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QWidget

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


class StepPlot(pg.PlotWidget):
    """Curves keyed by name, each updated with ``append(name, x, y)`` via setData."""

    def __init__(self, x_label: str, y_label: str, names: list[str], parent: QWidget | None = None) -> None:
        super().__init__(parent=parent, background="w")
        self.setLabel("bottom", x_label)
        self.setLabel("left", y_label)
        self.showGrid(x=True, y=True, alpha=0.3)
        self.addLegend(offset=(-5, 5), labelTextSize="8pt")
        self.curves = {n: self.plot([], [], pen=pg.mkPen(COLOURS[i % len(COLOURS)], width=2), name=n)
                       for i, n in enumerate(names)}
        self.data: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}

    def reset(self) -> None:
        for name, curve in self.curves.items():
            self.data[name] = ([], [])
            curve.setData([], [])

    def append(self, name: str, x: float, y: float) -> None:
        xs, ys = self.data[name]
        xs.append(float(x))
        ys.append(float(y))
        self.curves[name].setData(np.asarray(xs), np.asarray(ys))
