"""Live per-class likelihood estimates as the noise levels are processed."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QWidget

from .palette import class_pen
from .plotting import add_cursor, cache_axes, place_cursor, set_x_extent, update_x_ticks


class LikelihoodPlot(pg.PlotWidget):
    """One persistent curve per class: the running logit estimate vs. noise levels done.

    Logits are shown relative to the best class at each step (0 = leading class), so the
    curves stay readable whatever the absolute scale of the ELBO. With progressive class
    elimination a class is measured only until it is eliminated: its curve ends there (the
    classifier's later estimates for it are extrapolations, not measurements).
    """

    def __init__(self, classes: list[str], x_label: str = "noise levels processed",
                 parent: QWidget | None = None, markers: bool = False) -> None:
        super().__init__(parent=parent, background="w")
        self._markers = markers  # dots on the points (short runs: a single point is visible)
        self.setLabel("bottom", x_label)
        self.setLabel("left", "logit − max (nats)")
        self.setMinimumSize(240, 170)
        self.showGrid(x=True, y=True, alpha=0.3)
        # The legend sits in its own column right of the plot: the curves end at the top
        # right (the leader is at 0), where an anchored legend would hide them.
        item = self.getPlotItem()
        self.legend = pg.LegendItem(offset=None, labelTextSize="8pt", colCount=1, verSpacing=-6)
        item.layout.addItem(self.legend, 2, 3)
        item.legend = self.legend  # curves created with a name register themselves
        cache_axes(self)
        self.cursor = add_cursor(self)
        self.set_classes(classes)

    def set_classes(self, classes: list[str]) -> None:
        for curve in getattr(self, "curves", []):
            self.removeItem(curve)
        self.legend.clear()
        self.classes = list(classes)
        # connect="finite": a class's curve ends at its last measured point (NaN afterwards)
        self.curves = [self.plot([], [], pen=self._pen(i, False), name=c, connect="finite",
                                 **self._marker_options(i)) for i, c in enumerate(classes)]
        self._highlighted: int | None = None
        self.reset()

    @staticmethod
    def _pen(k: int, highlighted: bool):
        return class_pen(k, 1.5, highlighted)

    def _marker_options(self, k: int) -> dict:
        if not self._markers:
            return {}
        colour = class_pen(k).color()
        return {"symbol": "o", "symbolSize": 5, "symbolPen": None, "symbolBrush": colour}

    def reset(self, x_extent: float | None = None) -> None:
        """Clear the curves; ``x_extent`` (the run's length, when known) fixes the x axis."""
        self.steps: list[int] = []
        self.history: list[np.ndarray] = []
        self.measured: list[np.ndarray] = []  # per point: which classes it measured
        self._y_low: float | None = None
        for curve in self.curves:
            curve.setData([], [])
        self.cursor.hide()
        set_x_extent(self, x_extent)
        if x_extent is None:
            self.enableAutoRange(y=True)

    def add_point(self, levels_done: int, logits: np.ndarray) -> None:
        self.add_points([levels_done], [logits])

    def add_points(self, levels_done: list[int], logits: list[np.ndarray],
                   measured: list[np.ndarray] | None = None) -> None:
        """Append several points and redraw once (a flush of live records is drawn in one go).

        ``measured`` (optional, one boolean array per point) says which classes a point
        measured; the others (eliminated classes) are not drawn from that point on.
        """
        for i, (step, row) in enumerate(zip(levels_done, logits)):
            row = np.asarray(row, dtype=float).copy()
            self.steps.append(int(step))
            self.history.append(row)
            self.measured.append(np.ones(row.shape, dtype=bool) if measured is None
                                 else np.asarray(measured[i], dtype=bool).copy())
        self.show_upto(len(self.steps))

    def show_upto(self, count: int) -> None:
        """Draw the first ``count`` stored points (the step scrubber replays with this)."""
        if count <= 0:
            for curve in self.curves:
                curve.setData([], [])
            return
        hist = np.stack(self.history[:count])
        rel = hist - hist.max(axis=1, keepdims=True)
        rel[~np.stack(self.measured[:count])] = np.nan
        top = int(np.argmax(hist[-1]))
        x = np.asarray(self.steps[:count])
        for k, curve in enumerate(self.curves):
            curve.setData(x, rel[:, k])
        self._fit_y(float(np.nanmin(rel)))
        if top != self._highlighted:  # new pens re-render the legend: only when the leader changes
            for k in {top, self._highlighted} - {None}:
                self.curves[k].setPen(self._pen(k, k == top))
            self._highlighted = top
            for sample, _label in self.legend.items:  # redraw the samples with the new pens
                sample.update()

    def set_cursor(self, x: float | None) -> None:
        """A vertical line at ``x`` (the replayed step); None hides it."""
        place_cursor(self.cursor, x)

    def _fit_y(self, low: float) -> None:
        """Keep the y range steady: change it only when the curves leave it or fill < half of it.

        The curves are <= 0 (relative to the leader); a steady range keeps the cached axes valid.
        """
        low = min(low, -1.0)
        if self._y_low is not None and self._y_low <= low <= 0.5 * self._y_low:
            return
        self._y_low = 1.25 * low
        self.setYRange(self._y_low, -0.05 * self._y_low, padding=0)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        super().resizeEvent(event)
        update_x_ticks(self)
