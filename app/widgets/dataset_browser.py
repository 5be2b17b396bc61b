"""Browse a dataset split (torchvision MNIST root / CIFAR-10 archive) or an image folder.

Loading (which may extract an archive or walk a large folder) and decoding a page of an
image folder (camera photos take a while each) run on a worker thread and stop when
cancelled (the dialog closing, another load or page); the dialog stays responsive.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QDialog, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                               QSpinBox, QVBoxLayout, QWidget)

from ...core.data import DatasetNotFoundError, TensorDataset, default_data_root, load_dataset
from ...core.images import ImageLoadError, convert_image, image_from_array, load_for_model
from ...core.runtime import raise_if_cancelled

from ..worker import JobRunner
from .gallery import Gallery

PAGE = 48
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def load_source(dataset_name: str, source_index: int, root: str) -> TensorDataset | list[Path]:
    """0: test split, 1: validation split of ``dataset_name`` under ``root``; 2: the image
    files under the folder ``root``. Raises OSError or ValueError with a readable message;
    stops (:class:`core.runtime.OperationCancelled`) when the active cancellation scope says so."""
    if source_index in (0, 1):
        return load_dataset(dataset_name, "test" if source_index == 0 else "val", root)
    files = []
    for path in Path(root).rglob("*"):  # a large tree (or a slow share) takes long: stoppable per entry
        raise_if_cancelled()
        if path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no images under {root}")
    return sorted(files)


@dataclass
class FolderPage:
    """One page of an image folder, decoded and converted to the model's input."""

    number: int
    images: list[np.ndarray]
    captions: list[str]


def decode_page(files: list[Path], number: int, image_size: int, channels: int) -> FolderPage:
    """Page ``number`` of ``files`` as ``channels`` x ``image_size`` x ``image_size`` inputs
    (files that cannot be used are left out); stoppable between files."""
    images, captions = [], []
    for path in files:
        raise_if_cancelled()
        try:
            images.append(load_for_model(path, image_size, channels))
        except ImageLoadError:
            continue
        captions.append(path.name)
    return FolderPage(number, images, captions)


class DatasetBrowser(QDialog):
    """Pages of thumbnails with their labels; clicking one emits ``image_chosen``."""

    image_chosen = Signal(object, str, object)  # image, caption, true class name (None: a folder image)
    loaded = Signal(int)
    failed = Signal(str)
    page_shown = Signal(int)  # the page number, once its thumbnails are on show

    def __init__(self, dataset_name: str | None, image_size: int, channels: int,
                 parent: QWidget | None = None) -> None:
        """``dataset_name``: ``mnist`` or ``cifar10`` (the model's card); None offers only
        an image folder. Images are shown and chosen converted to ``channels`` x
        ``image_size`` x ``image_size``, the model's input."""
        super().__init__(parent)
        self.setWindowTitle("Dataset browser")
        self.resize(720, 560)
        self.image_size, self.channels = image_size, channels
        self.dataset: TensorDataset | None = None
        self.folder_files: list[Path] = []
        self.source = QComboBox()
        # the load_source index of each entry: 0 test split, 1 validation split, 2 image folder
        self.source_indices = [0, 1, 2] if dataset_name else [2]
        self.source.addItems(([f"{dataset_name} test", f"{dataset_name} val"] if dataset_name else [])
                             + ["image folder…"])
        self.root = QLineEdit(str(default_data_root()))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._on_browse_clicked)
        load = QPushButton("Load")
        load.clicked.connect(self._on_load_clicked)
        self.page = QSpinBox()
        self.page.setPrefix("page ")
        self.page.setRange(0, 0)  # until a source is loaded
        self.page.valueChanged.connect(self._on_page_value_changed)
        self.info = QLabel("")
        self.gallery = Gallery(icon_size=64)
        self.gallery.image_chosen.connect(self.image_chosen)
        self.load_button = load
        self.runner = JobRunner(self)
        self.runner.finished.connect(self._on_runner_finished)
        self.runner.failed.connect(self._on_runner_failed)
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
        self.info.setText("Choose a source and press Load")

    @property
    def dataset_name(self) -> str | None:
        """The dataset whose splits the browser offers (None: only an image folder)."""
        return self._dataset_name

    def set_input(self, image_size: int, channels: int) -> None:
        """Show and choose images as ``channels`` x ``image_size`` x ``image_size`` from now
        on (the window's model changed); the page on show is converted again."""
        if (image_size, channels) == (self.image_size, self.channels):
            return
        self.image_size, self.channels = image_size, channels
        if self.dataset is not None or self.folder_files:
            self._on_page_value_changed(self.page.value())
        else:
            self.gallery.set_images([], [])

    def _on_browse_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Data root or image folder", self.root.text())
        if folder:
            self.root.setText(folder)

    def _on_load_clicked(self) -> None:
        self.load(self.source_indices[self.source.currentIndex()], self.root.text())

    def load(self, source_index: int, root: str) -> None:
        """Start loading (see :func:`load_source`) on a worker thread; ``loaded(count)`` or
        ``failed(message)`` follows."""
        self.info.setText(f"loading {root}…")
        self.load_button.setEnabled(False)
        name = self._dataset_name

        def job(_cancelled):
            try:
                return load_source(name, source_index, root)
            except DatasetNotFoundError as exc:  # its message advises the command line
                searched = ", ".join(str(p) for p in exc.searched) or root
                return (f"{exc.dataset or name} is not under {searched}. Choose the folder that holds it "
                        f"(Browse…) and press Load, or pick \u201cimage folder…\u201d.")
            except (OSError, ValueError) as exc:
                return str(exc)

        self.runner.start(job)

    def _on_runner_failed(self, message: str) -> None:
        self._on_runner_finished(message)

    def _on_runner_finished(self, result) -> None:
        if isinstance(result, FolderPage):
            self._show_folder_page(result)
            return
        self.load_button.setEnabled(True)
        if isinstance(result, str):
            self.info.setText("")
            self.failed.emit(result)
            return
        self.dataset, self.folder_files = (None, result) if isinstance(result, list) else (result, [])
        count = len(result)
        self.page.blockSignals(True)  # the first page is shown once, below
        self.page.setMaximum(max(0, (count - 1) // PAGE))
        self.page.setValue(0)
        self.page.blockSignals(False)
        self._on_page_value_changed(0)
        self.loaded.emit(count)

    def done(self, code: int) -> None:
        """Closing the dialog cancels a load in progress (its thread ends at its next check)."""
        self.runner.cancel()
        super().done(code)

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """A dataset image (C, H, W) in [0, 1] as the model's input (channels and size)."""
        if image.shape == (self.channels, self.image_size, self.image_size):
            return image
        return convert_image(image_from_array(image), self.image_size, self.channels, invert=False)

    def _on_page_value_changed(self, page: int) -> None:
        start = page * PAGE
        if self.dataset is None and not self.folder_files:  # nothing loaded yet
            return
        if self.dataset is None:  # image files: decoded on the worker thread
            files, size, channels = self.folder_files[start:start + PAGE], self.image_size, self.channels
            self.info.setText(f"decoding {start + 1}–{start + len(files)} of {len(self.folder_files)}…")
            self.runner.start(lambda _cancelled: decode_page(files, page, size, channels))
            return
        images, captions, class_names = [], [], []
        stop = min(start + PAGE, len(self.dataset))
        for i in range(start, stop):
            images.append(self._fit(self.dataset.float_images(slice(i, i + 1))[0].numpy()))
            class_names.append(self.dataset.classes[int(self.dataset.labels[i])])
            captions.append(f"#{i}: {class_names[-1]}")
        self.gallery.set_images(images, captions, class_names)
        self.info.setText(f"{start + 1}–{start + len(images)} of {len(self.dataset)}")
        self.page_shown.emit(page)

    def _show_folder_page(self, page: FolderPage) -> None:
        start = page.number * PAGE
        self.gallery.set_images(page.images, page.captions, [None] * len(page.images))
        shown = min(PAGE, len(self.folder_files) - start)
        left_out = f" ({shown - len(page.images)} could not be read)" if len(page.images) < shown else ""
        self.info.setText(f"{start + 1}–{start + shown} of {len(self.folder_files)}{left_out}")
        self.page_shown.emit(page.number)
