"""A small live line plot with persistent named curves (loss, margin, objective)."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QWidget

from .plotting import cache_axes, set_x_extent

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
        cache_axes(self)

    def reset(self, x_extent: float | None = None) -> None:
        """Clear the curves; ``x_extent`` (the run's length, when known) fixes the x axis."""
        for name, curve in self.curves.items():
            self.data[name] = ([], [])
            curve.setData([], [])
        set_x_extent(self, x_extent)

    def append(self, name: str, x: float, y: float) -> None:
        self.extend(name, [x], [y])

    def extend(self, name: str, x: list[float], y: list[float]) -> None:
        """Append several points to one curve and redraw it once."""
        xs, ys = self.data[name]
        xs.extend(float(v) for v in x)
        ys.extend(float(v) for v in y)
        self.curves[name].setData(np.asarray(xs), np.asarray(ys))
