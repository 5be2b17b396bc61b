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


class PerturbationView(ImageView):
    """A signed perturbation with a diverging colour map, amplified to the full range."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(title, parent)
        cmap = pg.colormap.get("CET-D1")
        self.item.setLookupTable(cmap.getLookupTable(nPts=256))

    def set_perturbation(self, delta: np.ndarray | None) -> None:
        """``delta``: (C, H, W) adversarial minus original, in [0, 1] units."""
        if delta is None:
            self.image = None
            self.item.clear()
            self.caption.setText("")
            return
        self.image = np.array(delta, copy=True)
        signed = delta.mean(axis=0)
        peak = float(np.abs(signed).max()) or 1.0
        self.item.setImage(signed, levels=(-peak, peak), autoLevels=False)
        self.view.autoRange(padding=0.02)
        linf = float(np.abs(delta).max())
        l2 = float(np.sqrt((delta.astype(np.float64) ** 2).sum()))
        self.caption.setText(f"‖δ‖∞ = {linf:.4f} ({linf * 255:.1f}/255)   ‖δ‖₂ = {l2:.3f}   "
                             f"(colours scaled to ±{peak:.3f})")
