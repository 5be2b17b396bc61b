"""Helpers that keep live pyqtgraph plots cheap to redraw on the GUI thread."""
from __future__ import annotations

import math

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QGraphicsItem

CURSOR_PEN = pg.mkPen((90, 90, 90), width=1, style=Qt.PenStyle.DashLine)
EDGE_LABEL_PX = 16
"""Room (pixels) left of the first and right of the last step for their tick labels: with
a grid, pyqtgraph hides labels that reach past the view."""


def cache_axes(plot: pg.PlotWidget) -> None:
    """Draw the axes (with their grid lines) from a cached pixmap until their range changes.

    Re-laying out tick labels is the most expensive part of a live update; with fixed or
    rarely changing ranges the cache turns it into a blit.
    """
    for entry in plot.getPlotItem().axes.values():
        entry["item"].setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)


def set_x_extent(plot: pg.PlotWidget, extent: float | None) -> None:
    """Fix the x range to [0, extent] for a run of known length (None: follow the data)."""
    plot.x_extent = extent if extent is not None and extent > 0 else None
    if plot.x_extent is None:
        plot.enableAutoRange(x=True)
    update_x_ticks(plot)


def update_x_ticks(plot: pg.PlotWidget) -> None:
    """Integer ticks from 0 to the run's length, as many as the plot's width has room for,
    and an x range with room for the first and last labels (call again after a resize)."""
    if not hasattr(plot, "x_extent") or getattr(plot, "plotItem", None) is None:
        return  # not set up yet (a resize during construction), or closed
    axis = plot.getAxis("bottom")
    extent = plot.x_extent
    if extent is None:
        axis.setTickSpacing()  # automatic
        return
    axis.setStyle(hideOverlappingLabels=False)  # keep the first and last step's labels at the edges
    width = int(axis.width() or plot.width())
    pad = float(extent) * max(0.02, EDGE_LABEL_PX / max(1, width - 2 * EDGE_LABEL_PX))  # pad = EDGE px
    plot.setXRange(-pad, float(extent) + pad, padding=0)
    major = integer_tick_spacing(extent, most=max(2, width // 45))
    axis.setTickSpacing(major, max(1, major // 5) if major >= 5 else major)


def integer_tick_spacing(extent: float, most: int = 10) -> int:
    """A 1-2-5 spacing for integer steps 0..extent with at most ``most`` intervals, so
    the ticks cover every point from the first to the last."""
    raw = max(1.0, float(extent) / most)
    decade = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * decade >= raw:
            return int(factor * decade)
    return int(10 * decade)


def add_cursor(plot: pg.PlotWidget) -> pg.InfiniteLine:
    """A hidden vertical line that marks the replayed step on a plot."""
    line = pg.InfiniteLine(angle=90, movable=False, pen=CURSOR_PEN)
    line.setZValue(10)
    line.hide()
    plot.addItem(line, ignoreBounds=True)
    return line


def place_cursor(cursor: pg.InfiniteLine, x: float | None) -> None:
    """Move a cursor of :func:`add_cursor` to step ``x``; None hides it."""
    if x is None:
        cursor.hide()
    else:
        cursor.setValue(float(x))
        cursor.show()
