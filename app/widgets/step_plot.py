"""A small live line plot with persistent named curves (loss, margin, objective)."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QWidget

from .palette import class_colour
from .plotting import add_cursor, cache_axes, place_cursor, set_x_extent, update_x_ticks

COLOURS = [class_colour(0), class_colour(3), class_colour(2), class_colour(8)]


class StepPlot(pg.PlotWidget):
    """Curves keyed by name, each updated with ``append(name, x, y)`` via setData.

    ``faint`` names curves drawn thin and pale behind the others (e.g. a noisy per-step
    value behind its steady estimate); each keeps the colour of its position in ``names``.
    The legend (two or more curves) sits right of the plot, or below it with ``legend_below``
    (narrow plots): in one row when the plot is wide enough for it, else one entry per row.
    """

    def __init__(self, x_label: str, y_label: str, names: list[str], parent: QWidget | None = None,
                 faint: tuple[str, ...] = (), legend_below: bool = False) -> None:
        super().__init__(parent=parent, background="w")
        self.setLabel("bottom", x_label)
        self.setLabel("left", y_label)
        self.showGrid(x=True, y=True, alpha=0.3)
        self.setMinimumSize(240, 150)
        # the legend sits in its own column right of the plot (or row below it), never over the curves
        item = self.getPlotItem()
        self.legend_below = legend_below
        self.legend = pg.LegendItem(offset=None, labelTextSize="8pt", colCount=len(names) if legend_below else 1,
                                    verSpacing=-6)
        if len(names) > 1:  # one curve: the axis label names it
            item.layout.addItem(self.legend, *((4, 1) if legend_below else (2, 3)))
            item.legend = self.legend
        self.faint = tuple(faint)
        self.curves = {n: self.plot([], [], pen=self._pen(i, n in self.faint), name=n) for i, n in enumerate(names)}
        for name in self.faint:
            self.curves[name].setZValue(-1)
        self.data: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
        cache_axes(self)
        self.cursor = add_cursor(self)
        self._message = QLabel(self)  # a note over the plot area, e.g. why it stays empty
        self._message.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._message.setWordWrap(True)
        self._message.setStyleSheet("color: #505050; background: transparent;")
        self._message.hide()

    @staticmethod
    def _pen(index: int, faint: bool):
        colour = COLOURS[index % len(COLOURS)]
        return pg.mkPen(colour + (110,), width=1) if faint else pg.mkPen(colour, width=2)

    def reset(self, x_extent: float | None = None) -> None:
        """Clear the curves; ``x_extent`` (the run's length, when known) fixes the x axis."""
        for name, curve in self.curves.items():
            self.data[name] = ([], [])
            curve.setData([], [])
        self.cursor.hide()
        self.set_message(None)
        set_x_extent(self, x_extent)

    def set_message(self, text: str | None) -> None:
        """Show ``text`` centred over the plot (e.g. why it is empty); None removes it."""
        self._message.setText(text or "")
        self._message.setVisible(bool(text))
        self._place_message()

    def message(self) -> str | None:
        """The note shown over the plot, or None."""
        return self._message.text() if self._message.isVisibleTo(self) else None

    def _place_message(self) -> None:
        message = getattr(self, "_message", None)  # (a resize can come before __init__ made it)
        if message is not None:
            message.setGeometry(self.rect().adjusted(60, 10, -60, -40))

    def append(self, name: str, x: float, y: float) -> None:
        self.extend(name, [x], [y])

    def extend(self, name: str, x: list[float], y: list[float]) -> None:
        """Append several points to one curve and redraw it once."""
        xs, ys = self.data[name]
        xs.extend(float(v) for v in x)
        ys.extend(float(v) for v in y)
        curve = self.curves[name]
        curve.setData(np.asarray(xs), np.asarray(ys))
        # a line needs two points: a lone one (an attack of one iteration) is drawn as a dot
        curve.setSymbol("o" if len(xs) == 1 else None)
        if len(xs) == 1:
            curve.setSymbolSize(7)
            curve.setSymbolPen(curve.opts["pen"])
            curve.setSymbolBrush(curve.opts["pen"].color())

    def set_cursor(self, x: float | None) -> None:
        """A vertical line at ``x`` (the replayed step); None hides it."""
        place_cursor(self.cursor, x)

    def _fit_legend(self) -> None:
        """A legend below the plot takes one row only where the plot is wide enough: a wider
        legend would widen the plot past its widget, and the scene would cut off its right."""
        if not getattr(self, "legend_below", False) or len(self.legend.items) < 2:  # (before __init__ ends)
            return
        row = sum(sample.boundingRect().width() + label.boundingRect().width() + 10
                  for sample, label in self.legend.items)
        available = self.width() - self.getPlotItem().getAxis("left").width() - 10
        columns = len(self.legend.items) if row <= available else 1
        if self.legend.columnCount != columns:
            self.legend.setColumnCount(columns)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self._fit_legend()
        super().resizeEvent(event)
        update_x_ticks(self)
        self._place_message()
