"""Thumbnail gallery of images (bundled samples or a dataset page); a click opens one."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import QListWidget, QListWidgetItem, QWidget


def array_to_pixmap(image: np.ndarray, size: int = 56) -> QPixmap:
    """(C, H, W) float in [0, 1] to a scaled pixmap (nearest neighbour)."""
    u8 = np.ascontiguousarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    if u8.shape[0] == 1:
        h, w = u8.shape[1:]
        qimg = QImage(u8[0].tobytes(), w, h, w, QImage.Format.Format_Grayscale8)
    else:
        rgb = np.ascontiguousarray(u8.transpose(1, 2, 0))
        h, w = rgb.shape[:2]
        qimg = QImage(rgb.tobytes(), w, h, 3 * w, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(qimg.copy()).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                                 Qt.TransformationMode.FastTransformation)


class Gallery(QListWidget):
    """Icon grid; ``image_chosen(array, caption, class_name)`` when an item is clicked
    (``class_name``: the image's true class when known, else None)."""

    image_chosen = Signal(object, str, object)

    def __init__(self, parent: QWidget | None = None, icon_size: int = 56) -> None:
        super().__init__(parent)
        self.setViewMode(QListWidget.ViewMode.IconMode)
        self.setIconSize(QSize(icon_size, icon_size))
        self.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.setMovement(QListWidget.Movement.Static)
        self.setSpacing(4)
        self._icon_size = icon_size
        self.images: list[np.ndarray] = []
        self.class_names: list[str | None] = []
        self.itemClicked.connect(self._on_item_clicked)

    def set_images(self, images: list[np.ndarray], captions: list[str],
                   class_names: list[str | None] | None = None) -> None:
        """Show ``images`` with their captions and, where known, their true classes."""
        self.clear()
        self.images, self.class_names = [], []
        for i, (image, caption) in enumerate(zip(images, captions)):
            self.add_image(image, caption, scroll=False, class_name=None if class_names is None else class_names[i])

    def add_image(self, image: np.ndarray, caption: str, scroll: bool = True, class_name: str | None = None) -> None:
        """Append one image (a copy) with its caption and true class (None: unknown);
        ``scroll`` brings it into view."""
        self.images.append(np.array(image, dtype=np.float32, copy=True))
        self.class_names.append(class_name)
        item = QListWidgetItem(QIcon(array_to_pixmap(self.images[-1], self._icon_size)), caption)
        item.setToolTip(caption)
        self.addItem(item)
        if scroll:
            self.scrollToItem(item)

    def _on_item_clicked(self, item: QListWidgetItem) -> None:
        row = self.row(item)
        self.image_chosen.emit(self.images[row], item.text(), self.class_names[row])
