"""Browse a dataset split (torchvision MNIST root / CIFAR-10 archive) or an image folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QDialog, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                               QSpinBox, QVBoxLayout, QWidget)

from ...core.data import TensorDataset, default_data_root, load_dataset
from ...core.images import ImageLoadError, load_for_model

from .gallery import Gallery

PAGE = 48


class DatasetBrowser(QDialog):
    """Pages of thumbnails with their labels; clicking one emits ``image_chosen``."""

    image_chosen = Signal(object, str)
    failed = Signal(str)

    def __init__(self, dataset_name: str, image_size: int, channels: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Dataset browser")
        self.resize(720, 560)
        self.image_size, self.channels = image_size, channels
        self.dataset: TensorDataset | None = None
        self.folder_files: list[Path] = []
        self.source = QComboBox()
        self.source.addItems([f"{dataset_name} test", f"{dataset_name} val", "image folder…"])
        self.root = QLineEdit(str(default_data_root()))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._on_browse_clicked)
        load = QPushButton("Load")
        load.clicked.connect(self._on_load_clicked)
        self.page = QSpinBox()
        self.page.setPrefix("page ")
        self.page.setMinimum(0)
        self.page.valueChanged.connect(self._on_page_value_changed)
        self.info = QLabel("")
        self.gallery = Gallery(icon_size=64)
        self.gallery.image_chosen.connect(self.image_chosen)
        top = QHBoxLayout()
        top.addWidget(self.source)
        top.addWidget(self.root, 1)
        top.addWidget(browse)
        top.addWidget(load)
        bottom = QHBoxLayout()
        bottom.addWidget(self.page)
        bottom.addWidget(self.info, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.gallery, 1)
        layout.addLayout(bottom)
        self._dataset_name = dataset_name

    def _on_browse_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Data root or image folder", self.root.text())
        if folder:
            self.root.setText(folder)

    def _on_load_clicked(self) -> None:
        self.load(self.source.currentIndex(), self.root.text())

    def load(self, source_index: int, root: str) -> bool:
        """0: test split, 1: validation split of the model's dataset under ``root``; 2: an image folder."""
        self.dataset, self.folder_files = None, []
        try:
            if source_index in (0, 1):
                self.dataset = load_dataset(self._dataset_name, "test" if source_index == 0 else "val", root)
                count = len(self.dataset)
            else:
                exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
                self.folder_files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in exts)
                count = len(self.folder_files)
                if count == 0:
                    raise FileNotFoundError(f"no images under {root}")
        except (OSError, ValueError) as exc:
            self.failed.emit(str(exc))
            return False
        self.page.setMaximum(max(0, (count - 1) // PAGE))
        self.page.setValue(0)
        self._on_page_value_changed(0)
        return True

    def _on_page_value_changed(self, page: int) -> None:
        start = page * PAGE
        images, labels = [], []
        if self.dataset is not None:
            stop = min(start + PAGE, len(self.dataset))
            for i in range(start, stop):
                images.append(self.dataset.float_images(slice(i, i + 1))[0].numpy())
                labels.append(f"#{i}: {self.dataset.classes[int(self.dataset.labels[i])]}")
            total = len(self.dataset)
        else:
            for path in self.folder_files[start:start + PAGE]:
                try:
                    images.append(load_for_model(path, self.image_size, self.channels))
                    labels.append(path.name)
                except ImageLoadError:
                    continue
            total = len(self.folder_files)
        self.gallery.set_images(images, labels)
        self.info.setText(f"{start + 1}–{start + len(images)} of {total}")
