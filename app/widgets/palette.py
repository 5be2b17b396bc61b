"""Class colours that colour-blind viewers can tell apart, and pens for class curves.

Paul Tol's "muted" qualitative scheme (nine colours chosen to stay distinct under the
common colour-vision deficiencies) plus black; classes 5-9 are also drawn dashed, so
neighbouring curves differ in two ways and stay apart in grayscale prints.
"""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt

CLASS_COLOURS = [(51, 34, 136), (221, 204, 119), (17, 119, 51), (204, 102, 119), (136, 204, 238),
                 (136, 34, 85), (68, 170, 153), (153, 153, 51), (170, 68, 153), (0, 0, 0)]


def class_colour(k: int) -> tuple[int, int, int]:
    return CLASS_COLOURS[k % len(CLASS_COLOURS)]


def class_pen(k: int, width: float = 1.5, highlighted: bool = False):
    """The pen of class ``k``: its colour, dashed for the second half of the palette."""
    style = Qt.PenStyle.DashLine if (k % len(CLASS_COLOURS)) >= 5 else Qt.PenStyle.SolidLine
    return pg.mkPen(class_colour(k), width=width * 2.4 if highlighted else width, style=style)
