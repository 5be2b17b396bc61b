"""A pixel-exact image view (pyqtgraph ImageItem, row-major, aspect locked)."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget


class ImageView(QWidget):
    """Shows a (C, H, W) float image in [0, 1] with a title."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = QLabel(f"<b>{title}</b>")
        self.caption = QLabel("")
        self.caption.setWordWrap(True)
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("w")
        self.view = self.graphics.addViewBox(lockAspect=True, invertY=True, enableMouse=True)
        self.item = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.item)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.title)
        layout.addWidget(self.graphics, 1)
        layout.addWidget(self.caption)
        self.image: np.ndarray | None = None

    def set_image(self, image: np.ndarray | None, caption: str = "") -> None:
        self.image = None if image is None else np.array(image, copy=True)
        if image is None:
            self.item.clear()
        else:
            hwc = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            self.item.setImage(hwc, levels=(0.0, 1.0), autoLevels=False)
            self.view.autoRange(padding=0.02)
        self.caption.setText(caption)
