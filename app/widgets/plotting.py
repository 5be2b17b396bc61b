"""Helpers that keep live pyqtgraph plots cheap to redraw on the GUI thread."""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtWidgets import QGraphicsItem


def cache_axes(plot: pg.PlotWidget) -> None:
    """Draw the axes (with their grid lines) from a cached pixmap until their range changes.

    Re-laying out tick labels is the most expensive part of a live update; with fixed or
    rarely changing ranges the cache turns it into a blit.
    """
    for entry in plot.getPlotItem().axes.values():
        entry["item"].setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)


def set_x_extent(plot: pg.PlotWidget, extent: float | None) -> None:
    """Fix the x range to [0, extent] for a run of known length (None: follow the data)."""
    if extent is None or extent <= 0:
        plot.enableAutoRange(x=True)
    else:
        plot.setXRange(0, float(extent), padding=0.02)
