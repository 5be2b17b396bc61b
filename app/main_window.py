"""The RDC Studio main window: open an image, classify it live with the diffusion model."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PySide6.QtCore import QSettings, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent, QGuiApplication, QImage, QKeySequence
from PySide6.QtWidgets import (QFileDialog, QGridLayout, QHBoxLayout, QInputDialog, QLabel, QMainWindow, QMessageBox,
                               QProgressBar, QPushButton, QSlider, QSpinBox, QSplitter, QTabWidget, QToolBar,
                               QVBoxLayout, QWidget)

from ..core.attacks import AttackResult, AttackStep, DefenseOutcome, attack_session
from ..core.classifier import ClassifyStep, build_classifier
from ..core.purify import LikelihoodMaximizer, PurifySettings, PurifyStep
from ..core.sample import SampleStep, sample
from ..core.images import save_png_atomic
from ..core.rdc import RobustDiffusionClassifier, masked_gradient_warning
from ..core.session import SessionError, load_session, make_session, save_session, write_csv
from ..core.images import ImageLoadError, convert_image, load_for_model
from ..core.models import CheckpointError, LoadedModel, list_bundled_models, load_checkpoint, resource_dir

from .widgets.attack_panel import AttackPanel
from .widgets.dataset_browser import DatasetBrowser
from .widgets.gallery import Gallery
from .widgets.image_view import ImageView, PerturbationView
from .widgets.likelihood_plot import LikelihoodPlot
from .widgets.probability_bars import ProbabilityBars
from .widgets.purify_panel import PurifyPanel
from .widgets.step_plot import StepPlot
from .worker import JobRunner

SAMPLES_DIR = resource_dir("samples")
IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.bmp *.webp *.tif *.tiff *.gif);;All files (*)"


class MainWindow(QMainWindow):
    """Drop, open or paste an image; the engine classifies it on a worker thread."""

    classification_finished = Signal(object)
    attack_finished = Signal(object)
    purification_finished = Signal(object)
    image_loaded = Signal(str)

    def __init__(self, model: LoadedModel, device: str = "cpu", steps: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.settings_store = QSettings("RDC Studio", "RDC Studio")
        default_steps = int(model.classifier_defaults.get("steps", 16))
        self.image: np.ndarray | None = None
        self.image_source = ""
        self.image_path = ""
        self.session_classifier: dict | None = None
        self.last_probabilities: np.ndarray | None = None
        self.last_outcome: DefenseOutcome | None = None
        self.purify_records: list[PurifyStep] = []
        self._job_kind = ""
        self._started_at = 0.0
        self.runner = JobRunner(self)
        self.runner.steps_ready.connect(self._on_runner_steps_ready)
        self.runner.finished.connect(self._on_runner_finished)
        self.runner.failed.connect(self._on_runner_failed)
        self.setAcceptDrops(True)
        self.resize(1280, 800)
        self._build_ui()
        self._build_menus()
        stored = self.settings_store.value("classify/steps", None)
        self.steps_spin.setValue(int(steps or (stored if stored is not None else default_steps)))
        geometry = self.settings_store.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        saved_attack = self.settings_store.value("attack/settings")
        if saved_attack:
            try:
                self.attack_panel.apply(json.loads(saved_attack))
            except (TypeError, ValueError):
                pass  # settings from another version: keep the defaults
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
        self.gallery = Gallery(icon_size=40)
        self.gallery.image_chosen.connect(self._on_gallery_image_chosen)
        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(self.input_view)
        gallery_box = QWidget()
        gl = QVBoxLayout(gallery_box)
        gl.setContentsMargins(2, 2, 2, 2)
        gl.addWidget(QLabel("<b>Samples</b> (generated by the bundled model; click to open)"))
        gl.addWidget(self.gallery, 1)
        left.addWidget(gallery_box)
        left.setSizes([520, 200])
        self.tabs = QTabWidget()
        self.tabs.addTab(self._build_classify_tab(), "Classify")
        self.tabs.addTab(self._build_attack_tab(), "Attack")
        self.tabs.addTab(self._build_purify_tab(), "Purify")
        main = QSplitter(Qt.Orientation.Horizontal)
        main.addWidget(left)
        main.addWidget(self.tabs)
        main.setSizes([360, 920])
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

    def _build_classify_tab(self) -> QWidget:
        self.bars = ProbabilityBars(self.model.classes)
        self.curves = LikelihoodPlot(self.model.classes)
        curves_box = QWidget()
        cl = QVBoxLayout(curves_box)
        cl.setContentsMargins(2, 2, 2, 2)
        cl.addWidget(QLabel("<b>Per-class likelihood estimate, converging over noise levels</b>"))
        cl.addWidget(self.curves, 1)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.bars)
        split.addWidget(curves_box)
        split.setSizes([360, 360])
        return split

    def _build_attack_tab(self) -> QWidget:
        self.attack_panel = AttackPanel(self.model.classes)
        self.attack_panel.setMaximumWidth(260)
        self.attack_panel.run_requested.connect(self.run_attack)
        self.attack_panel.stop_requested.connect(self.stop)
        self.view_original = ImageView("Original")
        self.view_perturbation = PerturbationView("Perturbation (amplified)")
        self.view_adversarial = ImageView("Adversarial")
        self.view_purified = ImageView("Adversarial, purified")
        views = [self.view_original, self.view_perturbation, self.view_adversarial, self.view_purified]
        for v in views[1:]:  # linked zoom and pan
            v.view.setXLink(views[0].view)
            v.view.setYLink(views[0].view)
        grid = QGridLayout()
        for i, v in enumerate(views):
            grid.addWidget(v, 0, i)
        self.attack_verdict = QLabel("Run an attack to see the verdict")
        self.attack_verdict.setWordWrap(True)
        self.attack_verdict.setStyleSheet("font-size: 13pt; font-weight: bold;")
        self.attack_plot = StepPlot("iteration", "loss / margin", ["loss", "margin"])
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(2, 2, 2, 2)
        rl.addLayout(grid, 3)
        rl.addWidget(self.attack_verdict)
        rl.addWidget(self.attack_plot, 2)
        tab = QWidget()
        tl = QHBoxLayout(tab)
        tl.addWidget(self.attack_panel)
        tl.addWidget(right, 1)
        return tab

    def _build_purify_tab(self) -> QWidget:
        defaults = PurifySettings(**self.model.card.get("purify", {}))
        self.purify_panel = PurifyPanel(defaults)
        self.purify_panel.setMaximumWidth(260)
        self.purify_panel.run_requested.connect(self.run_purification)
        self.purify_panel.stop_requested.connect(self.stop)
        self.purify_view = ImageView("Purified image (live)")
        self.purify_curves = LikelihoodPlot(self.model.classes, x_label="likelihood-maximisation step")
        self.objective_plot = StepPlot("step", "diffusion loss", ["objective"])
        self.scrubber = QSlider(Qt.Orientation.Horizontal)
        self.scrubber.setEnabled(False)
        self.scrubber.valueChanged.connect(self._on_scrubber_value_changed)
        self.scrubber_label = QLabel("step –")
        scrub = QHBoxLayout()
        scrub.addWidget(QLabel("Replay:"))
        scrub.addWidget(self.scrubber, 1)
        scrub.addWidget(self.scrubber_label)
        top = QHBoxLayout()
        top.addWidget(self.purify_view, 1)
        top.addWidget(self.objective_plot, 1)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(2, 2, 2, 2)
        rl.addLayout(top, 1)
        rl.addWidget(QLabel("<b>Per-class likelihood over the purification steps</b>"))
        rl.addWidget(self.purify_curves, 1)
        rl.addLayout(scrub)
        tab = QWidget()
        tl = QHBoxLayout(tab)
        tl.addWidget(self.purify_panel)
        tl.addWidget(right, 1)
        return tab

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self._add_action(file_menu, "&Open image…", QKeySequence.StandardKey.Open, self.open_dialog)
        self._add_action(file_menu, "&Paste image", QKeySequence.StandardKey.Paste, self.paste_from_clipboard)
        self._add_action(file_menu, "&Browse dataset…", QKeySequence("Ctrl+B"), self.open_dataset_browser)
        file_menu.addSeparator()
        self._add_action(file_menu, "Export &adversarial PNG…", QKeySequence("Ctrl+E"), self.export_adversarial_dialog)
        self._add_action(file_menu, "Export curves and probabilities &CSV…", None, self.export_csv_dialog)
        self._add_action(file_menu, "&Save session…", QKeySequence.StandardKey.Save, self.save_session_dialog)
        self._add_action(file_menu, "Open sess&ion…", QKeySequence("Ctrl+Shift+O"), self.open_session_dialog)
        file_menu.addSeparator()
        self._add_action(file_menu, "&Quit", QKeySequence.StandardKey.Quit, self.close)
        run_menu = self.menuBar().addMenu("&Run")
        self._add_action(run_menu, "&Classify", QKeySequence("Ctrl+R"), self.classify)
        self._add_action(run_menu, "&Attack", QKeySequence("Ctrl+T"), self.run_attack)
        self._add_action(run_menu, "&Purify", QKeySequence("Ctrl+P"), self.run_purification)
        self._add_action(run_menu, "&Stop", QKeySequence("Esc"), self.stop)
        model_menu = self.menuBar().addMenu("&Model")
        for name in list_bundled_models():
            self._add_action(model_menu, f"Bundled: {name}", None, lambda checked=False, n=name: self.load_model(n))
        model_menu.addSeparator()
        self._add_action(model_menu, "&Load checkpoint…", QKeySequence("Ctrl+L"), self.load_model_dialog)
        self._add_action(model_menu, "&Generate sample of class…", QKeySequence("Ctrl+G"), self.generate_sample_dialog)
        device_menu = self.menuBar().addMenu("&Device")
        for name in ("cpu", "cuda"):
            action = self._add_action(device_menu, name.upper(), None, lambda checked=False, d=name: self.set_device(d))
            action.setEnabled(name == "cpu" or torch.cuda.is_available())

    def _add_action(self, menu, text, shortcut, slot) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(shortcut)
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _load_samples(self) -> None:
        cfg = self.model.net.config
        images, labels = [], []
        if self.model.card.get("dataset") == "mnist" and SAMPLES_DIR.exists():
            for path in sorted(SAMPLES_DIR.glob("*.png")):
                try:
                    images.append(load_for_model(path, cfg.image_size, cfg.in_channels, invert=False))
                    labels.append(path.stem)
                except ImageLoadError:
                    continue
        self.gallery.set_images(images, labels)

    def _on_gallery_image_chosen(self, image: np.ndarray, label: str) -> None:
        self.image_path = ""
        self.set_image(image, label)

    def open_dataset_browser(self) -> None:
        cfg = self.model.net.config
        browser = DatasetBrowser(self.model.card.get("dataset", "mnist"), cfg.image_size, cfg.in_channels, self)
        browser.image_chosen.connect(self._on_gallery_image_chosen)
        browser.failed.connect(lambda msg: self.show_error("Cannot open dataset", msg))
        browser.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        browser.show()
        self.dataset_browser = browser

    def set_device(self, device: str) -> None:
        if device == self.device:
            return
        self.runner.cancel()
        self.device = device
        self.model.net.to(device)
        self._apply_model()

    def generate_sample_dialog(self) -> None:
        label, ok = QInputDialog.getItem(self, "Generate sample", "Class:", self.model.classes, 0, False)
        if ok:
            self.generate_sample(self.model.classes.index(label))

    def generate_sample(self, label: int, seed: int | None = None, steps: int = 18) -> None:
        """Draw an image of class ``label`` with the EDM sampler (shown live), then classify it."""
        seed = int(time.time()) % 100000 if seed is None else seed
        net = self.model.net
        self.progress.setRange(0, steps)
        self.progress.setFormat("%v / %m sampler steps")
        self.sample_label = f"generated {self.model.classes[label]} (seed {seed})"
        self._start_job("sample", lambda cancelled: sample(net, label, 1, steps, seed, cancelled))

    def _apply_model(self) -> None:
        self.setWindowTitle(f"RDC Studio — {self.model.name}")
        self.bars.set_classes(self.model.classes)
        self.curves.set_classes(self.model.classes)
        self.purify_curves.set_classes(self.model.classes)
        self._load_samples()
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
        self.image_path = str(path)
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

    # -- export and sessions ----------------------------------------------------------
    def _save_dialog(self, title: str, name: str, filt: str) -> str:
        start = str(Path(str(self.settings_store.value("paths/last_dir", str(Path.home())))) / name)
        path, _ = QFileDialog.getSaveFileName(self, title, start, filt)
        return path

    def export_adversarial_dialog(self) -> None:
        path = self._save_dialog("Export adversarial image", "adversarial.png", "PNG (*.png)")
        if path:
            self.export_adversarial(path)

    def export_adversarial(self, path: str) -> bool:
        """Save the last attack's adversarial image as a lossless 8-bit PNG."""
        if self.last_outcome is None:
            self.show_error("Nothing to export", "Run an attack first.")
            return False
        try:
            save_png_atomic(self.last_outcome.adversarial[0], path, source=self.image_path or None)
        except (OSError, ValueError) as exc:
            self.show_error("Cannot export", str(exc))
            return False
        self.statusBar().showMessage(f"Saved {path}", 5000)
        return True

    def export_csv_dialog(self) -> None:
        path = self._save_dialog("Export CSV", "rdc-results.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path: str) -> bool:
        """Probabilities, likelihood curves, purification and attack curves in one tidy CSV."""
        classes = self.model.classes
        rows: list[list] = []
        if self.last_probabilities is not None:
            rows += [["probability", "", c, float(p)] for c, p in zip(classes, self.last_probabilities)]
        for step, logits in zip(self.curves.steps, self.curves.history):
            rows += [["classify_logit", step, c, float(v)] for c, v in zip(classes, logits)]
        for rec in self.purify_records:
            rows.append(["purify_objective", rec.step, "", float(rec.objective[0])])
            rows += [["purify_logit", rec.step, c, float(v)] for c, v in zip(classes, rec.logits[0])]
        for name, (xs, ys) in self.attack_plot.data.items():
            rows += [[f"attack_{name}", int(x), "", y] for x, y in zip(xs, ys)]
        try:
            write_csv(path, ["kind", "step", "class", "value"], rows)
        except OSError as exc:
            self.show_error("Cannot export", str(exc))
            return False
        self.statusBar().showMessage(f"Saved {path} ({len(rows)} rows)", 5000)
        return True

    def session(self) -> dict:
        """The current session: model, exact input, every setting (with seeds) and results."""
        if self.image is None:
            raise SessionError("no image is open")
        results = {}
        if self.last_probabilities is not None:
            results["probabilities"] = [float(p) for p in self.last_probabilities]
        if self.last_outcome is not None:
            results["attack"] = {"success": bool(self.last_outcome.attack_succeeded[0]),
                                 "defense_recovered": bool(self.last_outcome.defense_recovered[0]),
                                 "linf": float(self.last_outcome.linf[0]), "l2": float(self.last_outcome.l2[0])}
        return make_session(str(self.model.path), self.image, self.image_source,
                            self._classifier().settings.to_dict(), self.attack_panel.settings().to_dict(),
                            self.purify_panel.settings().to_dict(), results, self.device) | {
            "attack_gradient": self.attack_panel.grad.currentText()}

    def save_session_dialog(self) -> None:
        path = self._save_dialog("Save session", "session.json", "RDC Studio session (*.json)")
        if path:
            self.save_session(path)

    def save_session(self, path: str) -> bool:
        try:
            save_session(path, self.session())
        except (OSError, SessionError) as exc:
            self.show_error("Cannot save session", str(exc))
            return False
        self.statusBar().showMessage(f"Saved session {path}", 5000)
        return True

    def open_session_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open session", "", "RDC Studio session (*.json)")
        if path:
            self.open_session(path)

    def open_session(self, path: str) -> bool:
        """Restore a saved session and re-run its classification."""
        try:
            session = load_session(path)
        except SessionError as exc:
            self.show_error("Cannot open session", str(exc))
            return False
        if str(self.model.path) != session["model"] and not self.load_model(session["model"]):
            return False
        cfg = self.model.net.config
        image = session["image_array"]
        if image.shape != (cfg.in_channels, cfg.image_size, cfg.image_size):
            self.show_error("Cannot open session", f"{path}: image shape {image.shape} does not fit the model")
            return False
        self.session_classifier = dict(session["classifier"])
        self.steps_spin.setValue(int(self.session_classifier.get("steps", self.steps_spin.value())))
        if session.get("attack"):
            self.attack_panel.apply(session["attack"])
        if session.get("attack_gradient"):
            self.attack_panel.grad.setCurrentText(session["attack_gradient"])
        if session.get("purify"):
            self.purify_panel.apply(session["purify"])
        self.image_path = ""
        self.set_image(image, session["image"].get("source", Path(path).name))
        return True

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
        clf = self._classifier()
        x = torch.from_numpy(self.image).unsqueeze(0).to(self.device)
        self.curves.reset(x_extent=steps)
        self.progress.setRange(0, steps)
        self.progress.setFormat("%v / %m levels")
        self.progress.setValue(0)
        levels_per_step = max(1, steps // 32)
        self._start_job("classify", lambda cancelled: clf.stream(x, levels_per_step, cancelled))

    def _start_job(self, kind: str, factory) -> None:
        self._job_kind = kind
        self._started_at = time.perf_counter()
        self._timer.start()
        self.stop_button.setEnabled(True)
        self.attack_panel.set_running(kind == "attack")
        self.purify_panel.set_running(kind == "purify")
        self.runner.start(factory)

    def _job_ended(self) -> None:
        self._timer.stop()
        self._on_timer_timeout()
        self.stop_button.setEnabled(False)
        self.attack_panel.set_running(False)
        self.purify_panel.set_running(False)

    def _classifier(self):
        overrides = dict(self.session_classifier or {})
        overrides["steps"] = int(self.steps_spin.value())
        return build_classifier(self.model, self.device, **overrides)

    def run_attack(self) -> None:
        """Attack the current image with the panel's settings against the full defense."""
        if self.image is None:
            self.statusBar().showMessage("Open, drop or paste an image first", 4000)
            return
        settings = self.attack_panel.settings()
        grad = self.attack_panel.grad.currentText()
        clf = self._classifier()
        purify_settings = self.purify_panel.settings()
        full = RobustDiffusionClassifier(self.model.net, clf.settings, purify_settings, "exact").to(self.device)
        attacked = clf
        if grad != "dc-only":
            attacked = RobustDiffusionClassifier(self.model.net, clf.settings, purify_settings, grad).to(self.device)
            grad = attacked.grad_mode  # "auto" resolved
        x = torch.round(torch.from_numpy(self.image).unsqueeze(0) * 255).div(255).to(self.device)
        self.attack_plot.reset(x_extent=settings.steps * settings.restarts)
        for v in (self.view_original, self.view_adversarial, self.view_purified):
            v.set_image(None)
        self.view_perturbation.set_perturbation(None)
        self.view_original.set_image(x[0].cpu().numpy(), self.image_source)
        self.attack_verdict.setText("Attacking…")
        self.attack_verdict.setStyleSheet("font-size: 13pt; font-weight: bold; color: #444;")
        self.progress.setRange(0, settings.steps * settings.restarts)
        self.progress.setFormat("%v / %m iterations")
        self.progress.setValue(0)
        self.tabs.setCurrentIndex(1)
        if warning := masked_gradient_warning(grad, purify_settings):
            self.statusBar().showMessage(f"Note: {warning.replace('--grad ', '')}", 15000)
        self._start_job("attack", lambda cancelled: attack_session(attacked, x, settings, defense=full,
                                                                   purify=full.purify, cancelled=cancelled))

    def run_purification(self) -> None:
        """Likelihood maximisation of the current image, drawn live."""
        if self.image is None:
            self.statusBar().showMessage("Open, drop or paste an image first", 4000)
            return
        settings = self.purify_panel.settings()
        clf = self._classifier()
        lm = LikelihoodMaximizer(self.model.net, settings)
        x = torch.from_numpy(self.image).unsqueeze(0).to(self.device)
        self.purify_records = []
        self.purify_curves.reset(x_extent=settings.steps)
        self.objective_plot.reset(x_extent=settings.steps)
        self.scrubber.setEnabled(False)
        self.progress.setRange(0, settings.steps)
        self.progress.setFormat("%v / %m steps")
        self.progress.setValue(0)
        self.tabs.setCurrentIndex(2)
        self._start_job("purify", lambda cancelled: lm.run(x, classifier=clf, cancelled=cancelled))

    def stop(self) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self._job_ended()
            self.statusBar().showMessage("Stopped", 3000)

    @Slot(list)
    def _on_runner_steps_ready(self, records: list) -> None:
        """Draw one throttled flush of step records: data for every record, one redraw per view."""
        def of_type(kind):
            return [r for r in records if isinstance(r, kind)]

        if classified := of_type(ClassifyStep):
            last = classified[-1]
            self.curves.add_points([r.levels_done for r in classified], [r.logits[0] for r in classified])
            self.bars.set_probabilities(last.probabilities[0], final=last.levels_done == last.total_levels)
            self.progress.setValue(last.levels_done)
        if attacked := of_type(AttackStep):
            last = attacked[-1]
            done = [r.restart * r.total_iterations + r.iteration for r in attacked]
            self.attack_plot.extend("loss", done, [r.loss[0] for r in attacked])
            self.attack_plot.extend("margin", done, [r.margin[0] for r in attacked])
            self.view_adversarial.set_image(last.image[0], f"iteration {last.iteration}: predicted "
                                            f"{self.model.classes[int(last.prediction[0])]}")
            self.view_perturbation.set_perturbation(last.image[0] - self.view_original.image)
            self.progress.setValue(done[-1])
        if purified := of_type(PurifyStep):
            self.purify_records.extend(purified)
            steps = [r.step for r in purified]
            self.purify_curves.add_points(steps, [r.logits[0] for r in purified])
            self.objective_plot.extend("objective", steps, [r.objective[0] for r in purified])
            self.progress.setValue(steps[-1])
            self._show_purify_record(purified[-1])
        if sampled := of_type(SampleStep):
            last = sampled[-1]
            self.input_view.set_image(last.image[0], f"sampling: step {last.step}/{last.total_steps}, "
                                      f"sigma {last.sigma:.3f}")
            self.progress.setValue(last.step)
        for outcome in of_type(DefenseOutcome):
            self._show_outcome(outcome)

    def _show_purify_record(self, record: PurifyStep) -> None:
        probs = np.exp(record.logits[0] - record.logits[0].max())
        probs /= probs.sum()
        top = int(np.argmax(probs))
        self.purify_view.set_image(record.image[0], f"step {record.step}/{record.total_steps}: "
                                   f"{self.model.classes[top]} ({probs[top]:.1%}), ‖x*−x‖∞ = "
                                   f"{record.linf[0] * 255:.1f}/255, objective {record.objective[0]:.2f}")

    def _on_scrubber_value_changed(self, index: int) -> None:
        if 0 <= index < len(self.purify_records):
            self._show_purify_record(self.purify_records[index])
            self.purify_curves.show_upto(index + 1)
            self.scrubber_label.setText(f"step {self.purify_records[index].step}")

    def _show_outcome(self, outcome: DefenseOutcome) -> None:
        self.last_outcome = outcome
        classes = self.model.classes
        label = int(outcome.labels[0])
        adv_pred = int(outcome.attacked_prediction[0])
        probs = outcome.defense_probabilities[0]
        defended = int(np.argmax(probs))
        self.view_adversarial.set_image(outcome.adversarial[0], f"attacked model says {classes[adv_pred]}")
        self.view_perturbation.set_perturbation(outcome.adversarial[0] - outcome.clean[0])
        if outcome.purified is not None:
            self.view_purified.set_image(outcome.purified[0], f"defense says {classes[defended]} ({probs[defended]:.1%})")
        attack = "Attack succeeded" if outcome.attack_succeeded[0] else "Attack failed"
        defense = "defense recovered" if outcome.defense_recovered[0] else "defense failed"
        good = bool(outcome.defense_recovered[0])
        self.attack_verdict.setText(f"{attack} ({classes[label]} → {classes[adv_pred]}); {defense}: the full RDC "
                                    f"predicts {classes[defended]} ({probs[defended]:.1%}).")
        colour = "#1a7f37" if good else "#c62828"
        self.attack_verdict.setStyleSheet(f"font-size: 13pt; font-weight: bold; color: {colour};")

    @Slot(object)
    def _on_runner_finished(self, record) -> None:
        self._job_ended()
        if self._job_kind == "attack":
            self.attack_finished.emit(record)
            return
        if self._job_kind == "sample":
            self.image_path = ""
            self.set_image(record.image[0], self.sample_label)
            return
        if self._job_kind == "purify":
            if self.purify_records:
                self.scrubber.blockSignals(True)
                self.scrubber.setRange(0, len(self.purify_records) - 1)
                self.scrubber.setValue(len(self.purify_records) - 1)
                self.scrubber.blockSignals(False)
                self.scrubber.setEnabled(True)
                self.scrubber_label.setText(f"step {self.purify_records[-1].step}")
            self.purification_finished.emit(self.purify_records)
            return
        step = record
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
        self._job_ended()
        self.show_error(f"{self._job_kind.capitalize() or 'Job'} failed", message)

    def _on_timer_timeout(self) -> None:
        self.elapsed_label.setText(f"{time.perf_counter() - self._started_at:.1f} s")

    def closeEvent(self, event) -> None:  # noqa: N802
        self.settings_store.setValue("window/geometry", self.saveGeometry())
        self.settings_store.setValue("attack/settings", json.dumps(self.attack_panel.settings().to_dict()))
        self._timer.stop()
        self.runner.shutdown()
        super().closeEvent(event)
