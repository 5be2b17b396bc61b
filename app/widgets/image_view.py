"""A pixel-exact image view (pyqtgraph ImageItem, row-major, aspect locked).

The view fills its pane at any size; pixels are drawn as blocks (nearest neighbour, no
smoothing), so a 28x28 digit stays a 28x28 grid of squares when enlarged.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget


class ImageView(QWidget):
    """Shows a (C, H, W) float image in [0, 1] with a title."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = QLabel(f"<b>{title}</b>")
        self.title.setWordWrap(True)
        self.caption = QLabel("")
        self.caption.setWordWrap(True)
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("w")
        self.graphics.setAntialiasing(False)  # nearest-neighbour pixels
        self.graphics.setMinimumSize(96, 96)
        self.graphics.ci.setContentsMargins(0, 0, 0, 0)
        self.view = self.graphics.addViewBox(lockAspect=True, invertY=True, enableMouse=True)
        self.item = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.item)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.title)
        layout.addWidget(self.graphics, 1)
        layout.addWidget(self.caption)
        self.image: np.ndarray | None = None
        self._fitted = True
        self.view.sigRangeChangedManually.connect(self._on_view_range_changed_manually)

    def set_image(self, image: np.ndarray | None, caption: str = "") -> None:
        self.image = None if image is None else np.array(image, copy=True)
        if image is None:
            self.item.clear()
        else:
            hwc = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            self.item.setImage(hwc, levels=(0.0, 1.0), autoLevels=False)
            self.fit()
        self.caption.setText(caption)
        self.caption.setToolTip("")  # a tooltip explains the caption it came with

    def fit(self) -> None:
        """Show the whole image, as large as the pane allows (again after a resize until the
        user zooms or pans; the view's context menu 'View All' fits it again)."""
        self._fitted = True
        self.view.autoRange(padding=0.02)

    def _on_view_range_changed_manually(self, *_args) -> None:
        self._fitted = False

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        super().resizeEvent(event)
        if self.image is not None and self._fitted:
            QTimer.singleShot(0, self.fit)  # after the graphics view has its new size


PERTURBATION_MODES = ("magnitude", "red", "green", "blue", "channel mean")
"""How a colour perturbation is drawn: the per-pixel magnitude over the channels
(sqrt of the sum of squares, a sequential map), one channel's signed change, or the
signed mean of the channels (diverging maps)."""


def perturbation_map(delta: np.ndarray, mode: str) -> np.ndarray:
    """The (H, W) map of a (C, H, W) perturbation that :class:`PerturbationView` draws, in
    /255 pixel units: signed for a channel or the channel mean, >= 0 for ``magnitude``.
    A one-channel perturbation is drawn signed whatever the mode."""
    delta = np.asarray(delta, dtype=np.float64) * 255
    if delta.shape[0] == 1:
        return delta[0]
    if mode == "magnitude":
        return np.sqrt((delta ** 2).sum(axis=0))
    if mode == "channel mean":
        return delta.mean(axis=0)
    if mode in ("red", "green", "blue"):
        return delta[("red", "green", "blue").index(mode)]
    raise ValueError(f"unknown perturbation view {mode!r}; expected one of {PERTURBATION_MODES}")


class PerturbationView(ImageView):
    """A perturbation, amplified to the full colour range: signed with a diverging colour
    map (grayscale models; one channel or the channel mean of colour models) or, for
    colour models, as its per-pixel magnitude with a sequential map (the default)."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(title, parent)
        self._diverging = pg.colormap.get("CET-D1")
        self._sequential = pg.colormap.get("viridis")
        self.item.setLookupTable(self._diverging.getLookupTable(nPts=256))
        # the colour bar: which colour is which change, in /255 pixel units
        self.colour_bar = pg.ColorBarItem(values=(-1, 1), colorMap=self._diverging, interactive=False, width=12,
                                          label="δ (/255)")
        self.graphics.addItem(self.colour_bar, 0, 1)
        self.mode = QComboBox()
        self.mode.addItems(list(PERTURBATION_MODES))
        self.mode.setToolTip("Colour perturbations: the per-pixel magnitude over R, G and B, one channel's "
                             "signed change, or the signed mean of the channels")
        self.mode.currentTextChanged.connect(self._on_mode_current_text_changed)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Show:"))
        row.addWidget(self.mode, 1)
        self.mode_row = QWidget()
        self.mode_row.setLayout(row)
        self.mode_row.setVisible(False)  # shown for colour perturbations only
        self.layout().insertWidget(2, self.mode_row)

    def _on_mode_current_text_changed(self, _text: str) -> None:
        if self.image is not None:
            self.set_perturbation(self.image)

    def set_perturbation(self, delta: np.ndarray | None) -> None:
        """``delta``: (C, H, W) adversarial minus original, in [0, 1] units."""
        if delta is None:
            self.image = None
            self.item.clear()
            self.caption.setText("")
            self.caption.setToolTip("")
            return
        self.image = np.array(delta, copy=True)
        colour = delta.shape[0] == 3
        self.mode_row.setVisible(colour)
        mode = self.mode.currentText() if colour else "channel mean"
        shown = perturbation_map(delta, mode)  # /255 pixel units, as the colour bar reads
        peak = float(np.abs(shown).max()) or 1.0
        levels = (0.0, peak) if mode == "magnitude" else (-peak, peak)
        cmap = self._sequential if mode == "magnitude" else self._diverging
        self.item.setLookupTable(cmap.getLookupTable(nPts=256))
        self.item.setImage(shown, levels=levels, autoLevels=False)
        self.colour_bar.setColorMap(cmap)
        self.colour_bar.setLevels(levels)
        self.colour_bar.getAxis("left").setLabel("|δ| (/255)" if mode == "magnitude" else
                                 ("δ (/255)" if not colour else f"δ {mode} (/255)"))
        self.fit()
        linf = float(np.abs(delta).max())
        l2 = float(np.sqrt((delta.astype(np.float64) ** 2).sum()))
        self.caption.setText(f"‖δ‖∞ = {linf * 255:.1f}/255, ‖δ‖₂ = {l2:.3f}")
        self.caption.setToolTip(f"‖δ‖∞ = {linf:.4f} in [0, 1] units; colours span ±{peak:.1f}/255")
