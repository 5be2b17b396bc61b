"""The RDC Studio main window: open an image, classify it live with the diffusion model."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PySide6.QtCore import QSettings, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent, QGuiApplication, QImage, QKeySequence
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QMainWindow, QMessageBox, QProgressBar,
                               QPushButton, QSpinBox, QSplitter, QToolBar, QVBoxLayout, QWidget)

from core.classifier import ClassifyStep, build_classifier
from core.images import ImageLoadError, convert_image, load_for_model
from core.models import CheckpointError, LoadedModel, list_bundled_models, load_checkpoint

from .widgets.image_view import ImageView
from .widgets.likelihood_plot import LikelihoodPlot
from .widgets.probability_bars import ProbabilityBars
from .worker import JobRunner

IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.bmp *.webp *.tif *.tiff *.gif);;All files (*)"


class MainWindow(QMainWindow):
    """Drop, open or paste an image; the engine classifies it on a worker thread."""

    classification_finished = Signal(object)
    image_loaded = Signal(str)

    def __init__(self, model: LoadedModel, device: str = "cpu", steps: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.settings_store = QSettings("RDC Studio", "RDC Studio")
        default_steps = int(model.classifier_defaults.get("steps", 16))
        self.image: np.ndarray | None = None
        self.image_source = ""
        self.last_probabilities: np.ndarray | None = None
        self._started_at = 0.0
        self.runner = JobRunner(self)
        self.runner.step_ready.connect(self._on_runner_step_ready)
        self.runner.finished.connect(self._on_runner_finished)
        self.runner.failed.connect(self._on_runner_failed)
        self.setAcceptDrops(True)
        self.resize(1280, 800)
        self._build_ui()
        self._build_menus()
        stored = self.settings_store.value("classify/steps", None)
        self.steps_spin.setValue(int(steps or (stored if stored is not None else default_steps)))
        self._timer = QTimer(self)
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._on_timer_timeout)
        self._apply_model()

    # -- construction ------------------------------------------------------------
    def _build_ui(self) -> None:
        toolbar = QToolBar("Main")
        toolbar.setMovable(False)
        self.addToolBar(toolbar)
        self.open_button = QPushButton("Open image…")
        self.open_button.clicked.connect(self.open_dialog)
        toolbar.addWidget(self.open_button)
        toolbar.addSeparator()
        toolbar.addWidget(QLabel(" Noise levels T: "))
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.steps_spin.setToolTip("Number of noise levels in the likelihood quadrature (more: slower, steadier)")
        toolbar.addWidget(self.steps_spin)
        self.classify_button = QPushButton("Classify")
        self.classify_button.clicked.connect(self.classify)
        toolbar.addWidget(self.classify_button)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        toolbar.addWidget(self.stop_button)

        self.input_view = ImageView("Model input (converted)")
        self.bars = ProbabilityBars(self.model.classes)
        self.curves = LikelihoodPlot(self.model.classes)
        curves_box = QWidget()
        cl = QVBoxLayout(curves_box)
        cl.setContentsMargins(2, 2, 2, 2)
        cl.addWidget(QLabel("<b>Per-class likelihood estimate, converging over noise levels</b>"))
        cl.addWidget(self.curves, 1)
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.bars)
        right.addWidget(curves_box)
        right.setSizes([380, 380])
        main = QSplitter(Qt.Orientation.Horizontal)
        main.addWidget(self.input_view)
        main.addWidget(right)
        main.setSizes([480, 800])
        central = QWidget()
        layout = QHBoxLayout(central)
        layout.addWidget(main)
        self.setCentralWidget(central)

        self.device_label = QLabel()
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setFormat("%v / %m levels")
        self.elapsed_label = QLabel("")
        status = self.statusBar()
        status.addPermanentWidget(self.elapsed_label)
        status.addPermanentWidget(self.progress)
        status.addPermanentWidget(self.device_label)

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self._add_action(file_menu, "&Open image…", QKeySequence.StandardKey.Open, self.open_dialog)
        self._add_action(file_menu, "&Paste image", QKeySequence.StandardKey.Paste, self.paste_from_clipboard)
        file_menu.addSeparator()
        self._add_action(file_menu, "&Quit", QKeySequence.StandardKey.Quit, self.close)
        run_menu = self.menuBar().addMenu("&Run")
        self._add_action(run_menu, "&Classify", QKeySequence("Ctrl+R"), self.classify)
        self._add_action(run_menu, "&Stop", QKeySequence("Esc"), self.stop)
        model_menu = self.menuBar().addMenu("&Model")
        for name in list_bundled_models():
            self._add_action(model_menu, f"Bundled: {name}", None, lambda checked=False, n=name: self.load_model(n))
        model_menu.addSeparator()
        self._add_action(model_menu, "&Load checkpoint…", QKeySequence("Ctrl+L"), self.load_model_dialog)

    def _add_action(self, menu, text, shortcut, slot) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(shortcut)
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _apply_model(self) -> None:
        self.setWindowTitle(f"RDC Studio — {self.model.name}")
        self.bars.set_classes(self.model.classes)
        self.curves.set_classes(self.model.classes)
        cfg = self.model.net.config
        self.device_label.setText(f"{self.model.name} · {cfg.architecture} · {self.device.upper()} "
                                  f"· {torch.get_num_threads()} threads")

    # -- errors -----------------------------------------------------------------
    def show_error(self, title: str, text: str) -> None:
        """Report a problem without changing the current state (tests replace this)."""
        self.statusBar().showMessage(f"{title}: {text}", 10000)
        box = QMessageBox(QMessageBox.Icon.Warning, title, text, QMessageBox.StandardButton.Ok, self)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()

    # -- input ------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 (Qt API)
        if event.mimeData().hasUrls() or event.mimeData().hasImage():
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        mime = event.mimeData()
        files = [u.toLocalFile() for u in mime.urls() if u.isLocalFile()]
        if files:
            event.acceptProposedAction()
            self.open_path(files[0])
        elif mime.hasImage():
            event.acceptProposedAction()
            self.open_qimage(QImage(mime.imageData()), "dropped image")

    def open_dialog(self) -> None:
        start = str(self.settings_store.value("paths/last_dir", str(Path.home())))
        path, _ = QFileDialog.getOpenFileName(self, "Open image", start, IMAGE_FILTER)
        if path:
            self.open_path(path)

    def open_path(self, path: str) -> bool:
        """Load, convert and classify an image file; on error keep everything as it was."""
        cfg = self.model.net.config
        try:
            arr = load_for_model(path, cfg.image_size, cfg.in_channels)
        except ImageLoadError as exc:
            self.show_error("Cannot open image", str(exc))
            return False
        self.settings_store.setValue("paths/last_dir", str(Path(path).parent))
        self.set_image(arr, Path(path).name)
        return True

    def paste_from_clipboard(self) -> None:
        mime = QGuiApplication.clipboard().mimeData()
        if mime is not None and mime.hasUrls():
            files = [u.toLocalFile() for u in mime.urls() if u.isLocalFile()]
            if files:
                self.open_path(files[0])
                return
        img = QGuiApplication.clipboard().image()
        if img.isNull():
            self.show_error("Nothing to paste", "The clipboard holds no image.")
            return
        self.open_qimage(img, "pasted image")

    def open_qimage(self, qimage: QImage, label: str) -> None:
        from PIL import Image

        rgba = qimage.convertToFormat(QImage.Format.Format_RGBA8888)
        w, h = rgba.width(), rgba.height()
        if w == 0 or h == 0:
            self.show_error("Cannot open image", f"{label} is empty")
            return
        buf = np.frombuffer(rgba.constBits(), np.uint8, count=rgba.sizeInBytes())
        arr = buf.reshape(h, rgba.bytesPerLine())[:, : w * 4].reshape(h, w, 4).copy()
        cfg = self.model.net.config
        self.set_image(convert_image(Image.fromarray(arr, "RGBA"), cfg.image_size, cfg.in_channels), label)

    def set_image(self, image: np.ndarray, source: str) -> None:
        self.image = np.array(image, dtype=np.float32, copy=True)
        self.image_source = source
        c, h, w = self.image.shape
        self.input_view.set_image(self.image, f"{source} → {w}×{h}, {'grayscale' if c == 1 else 'RGB'}")
        self.image_loaded.emit(source)
        self.classify()

    # -- model ------------------------------------------------------------------
    def load_model_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load checkpoint", "", "Checkpoints (*.safetensors *.json)")
        if path:
            self.load_model(path)

    def load_model(self, name_or_path: str) -> bool:
        try:
            model = load_checkpoint(name_or_path, device=self.device)
        except CheckpointError as exc:
            self.show_error("Cannot load model", str(exc))
            return False
        self.runner.cancel()
        self.model = model
        self._apply_model()
        if self.image is not None and self.image.shape[0] != model.net.config.in_channels:
            self.image = None
            self.input_view.set_image(None)
        if self.image is not None:
            self.classify()
        return True

    # -- classification -----------------------------------------------------------
    def classify(self) -> None:
        if self.image is None:
            self.statusBar().showMessage("Open, drop or paste an image first", 4000)
            return
        steps = int(self.steps_spin.value())
        self.settings_store.setValue("classify/steps", steps)
        clf = build_classifier(self.model, self.device, steps=steps)
        x = torch.from_numpy(self.image).unsqueeze(0).to(self.device)
        self.curves.reset()
        self.progress.setRange(0, steps)
        self.progress.setValue(0)
        self._started_at = time.perf_counter()
        self._timer.start()
        self.stop_button.setEnabled(True)
        levels_per_step = max(1, steps // 32)
        self.runner.start(lambda cancelled: clf.stream(x, levels_per_step, cancelled))

    def stop(self) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self._timer.stop()
            self.stop_button.setEnabled(False)
            self.statusBar().showMessage("Stopped", 3000)

    @Slot(object)
    def _on_runner_step_ready(self, step: ClassifyStep) -> None:
        self.curves.add_point(step.levels_done, step.logits[0])
        self.bars.set_probabilities(step.probabilities[0], final=step.levels_done == step.total_levels)
        self.progress.setValue(step.levels_done)

    @Slot(object)
    def _on_runner_finished(self, step: ClassifyStep) -> None:
        self._timer.stop()
        self._on_timer_timeout()
        self.stop_button.setEnabled(False)
        self.last_probabilities = step.probabilities[0].copy()
        self.bars.set_probabilities(self.last_probabilities, final=True)
        self.progress.setValue(step.total_levels)
        top = int(np.argmax(self.last_probabilities))
        self.statusBar().showMessage(
            f"{self.image_source}: {self.model.classes[top]} ({self.last_probabilities[top]:.1%}) "
            f"in {time.perf_counter() - self._started_at:.2f} s", 10000)
        self.classification_finished.emit(self.last_probabilities)

    @Slot(str)
    def _on_runner_failed(self, message: str) -> None:
        self._timer.stop()
        self.stop_button.setEnabled(False)
        self.show_error("Classification failed", message)

    def _on_timer_timeout(self) -> None:
        self.elapsed_label.setText(f"{time.perf_counter() - self._started_at:.1f} s")

    def closeEvent(self, event) -> None:  # noqa: N802
        self._timer.stop()
        self.runner.shutdown()
        super().closeEvent(event)
