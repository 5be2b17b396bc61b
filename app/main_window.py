"""The RDC Studio main window: open an image, classify it live with the diffusion model."""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PySide6.QtCore import QSettings, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent, QGuiApplication, QImage, QKeySequence
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QHBoxLayout, QInputDialog, QLabel, QMainWindow,
                               QMessageBox, QProgressBar, QPushButton, QSpinBox, QSplitter, QTabWidget, QToolBar,
                               QVBoxLayout, QWidget)

from ..core.choices import PRESETS
from ..core.classifier import ClassifierSettings, build_classifier, classifier_settings
from ..core.defense import build_defense, build_maximizer, gradient_warning, purify_settings
from ..core.ood import OodScorer
from ..core.presets import get_preset
from ..core.runtime import time_left_text
from ..core.sample import SampleStep, parse_sample_filename
from ..core.images import (MAX_PIXELS, ImageLoadError, convert_image, image_from_array, load_for_model, same_file,
                           save_png_atomic)
from ..core.session import (SessionError, load_session, make_session, save_session, session_model,
                            session_model_reference, session_settings, write_csv)
from ..core.models import (DEFAULT_MODEL, CheckpointError, LoadedModel, file_sha256, list_bundled_models,
                           load_checkpoint, resolve_model_path, resource_dir)

from .jobs import attack_job, classify_job, purify_job, sample_job
from .session_state import CSV_HEADER, SessionState, saved_results
from .tabs.attack_tab import AttackTab
from .tabs.classify_tab import ClassifyTab
from .tabs.purify_tab import PurifyTab
from .widgets.dataset_browser import DatasetBrowser
from .widgets.gallery import Gallery
from .widgets.image_view import ImageView
from .worker import JobRunner

SAMPLES_DIR = resource_dir("samples")
HEAVY_ATTACK_SETTINGS = ("steps", "eot", "restarts")
"""Attack settings that set an attack's cost: reset on launch unless pinned."""
IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.bmp *.webp *.tif *.tiff *.gif);;All files (*)"
MAX_LEVELS = 4096
"""The most noise levels T the toolbar offers: the diffusion classifier's own bound."""


def sample_caption(stem: str, classes: list[str]) -> str:
    """The gallery caption of a bundled sample named ``LABEL-INDEX`` (as ``rdc sample`` writes).

    ``3-007`` becomes ``"3 #7"`` for MNIST's classes; names that do not follow the pattern
    are shown as they are.
    """
    parsed = parse_sample_filename(stem)
    if parsed is not None and parsed[0] < len(classes):
        return f"{classes[parsed[0]]} #{parsed[1]}"
    return stem


def saved_attack_note(attack: dict | None, classes: list[str]) -> str:
    """What a session's saved attack result was, for the status line after it is reopened
    (the attack itself is re-run on request, with the session's settings and seed).

    Only an attack the session records as one of its own image (``of_input``) is described
    as such; an attack of another image (an earlier input, a purified image) is named by
    that image's caption, and older sessions, which did not record it, by neither.
    """
    if not isinstance(attack, dict) or not isinstance(attack.get("success"), bool):
        return ""
    label = attack.get("label")
    name = (f" on {'labelled' if attack.get('label_known') else 'predicted'} {classes[label]}"
            if type(label) is int and 0 <= label < len(classes) else "")
    if attack["success"]:
        verdict = "succeeded; the defense " + ("recovered" if attack.get("defense_recovered") else "failed")
    else:
        verdict = "failed; the defense " + ("held" if attack.get("defense_recovered") else "failed")
    if attack.get("of_input") is True:
        return f"The session's attack{name} {verdict}. Run ▸ Attack (Ctrl+T) re-runs it with its settings and seed."
    source = attack.get("source")
    if "of_input" in attack and isinstance(source, str) and source:
        what = f"The session's last attack was of another image ({source}): it {verdict}"
    else:  # an older session: it did not record which image was attacked
        what = f"The session's attack{name} {verdict} (the session does not say of which image)"
    return f"{what}. Run ▸ Attack (Ctrl+T) attacks this image with the session's settings and seed."


def model_problem(model: LoadedModel) -> str:
    """Why the window cannot work with ``model`` ("" when it can)."""
    if not model.classes:
        return (f"{model.name} is an unconditional model: it has no classes, so it cannot classify (it serves as "
                f"the purifier of a class-conditional model, named in that model's card)")
    return ""


class MainWindow(QMainWindow):
    """Drop, open or paste an image; the engine classifies it on a worker thread."""

    classification_finished = Signal(object)
    attack_finished = Signal(object)
    purification_finished = Signal(object)

    def __init__(self, model: LoadedModel, device: str = "cpu", steps: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.settings_store = QSettings("RDC Studio", "RDC Studio")
        self.state = SessionState(model.classes)
        self.state.subscribe(self._on_state_changed)
        self.session_classifier: dict | None = None
        self.sample_label = ""
        self.sample_caption = ""
        self.sample_class = 0
        self._job_kind = ""
        self._started_at = 0.0
        self._closing = False
        self._pending_device: str | None = None
        self.dataset_browser: DatasetBrowser | None = None  # the open one, if any
        self._model_sha256: str | None = None  # of the current model's weights, once a session needed it
        self._classify_note = ""  # said again when the classification that a preset or session started ends
        self.runner = JobRunner(self)
        self.runner.steps_ready.connect(self._on_runner_steps_ready)
        self.runner.finished.connect(self._on_runner_finished)
        self.runner.failed.connect(self._on_runner_failed)
        self.runner.drained.connect(self._on_runner_drained)
        self.setAcceptDrops(True)
        self.resize(1280, 800)
        self._build_ui()
        self._build_menus()
        self.attack_panel.set_dataset(model.card.get("dataset"))  # saved settings below take precedence
        self._restore_settings(steps)
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
        self.steps_spin.setRange(1, MAX_LEVELS)
        self.steps_spin.setToolTip("Number of noise levels in the likelihood quadrature (more: slower, steadier)")
        toolbar.addWidget(self.steps_spin)
        toolbar.addWidget(QLabel(" Preset: "))
        self.preset_combo = QComboBox()
        self.preset_combo.addItem("model card", "")
        for name in PRESETS:
            self.preset_combo.addItem(name, name)
            self.preset_combo.setItemData(self.preset_combo.count() - 1, get_preset(name).description,
                                          Qt.ItemDataRole.ToolTipRole)
        self.preset_combo.setToolTip("Named classifier and purification settings: the model card's (chosen "
                                     "for the model), or the RDC paper's CIFAR-10 settings for EDM networks: "
                                     "the paper's (paper), the released code's (paper-code) or paper with "
                                     "T = 16 (fast). Choosing one sets T and the purification panel and "
                                     "classifies again")
        self.preset_combo.currentIndexChanged.connect(self._on_preset_combo_current_index_changed)
        toolbar.addWidget(self.preset_combo)
        self.classify_button = QPushButton("Classify")
        self.classify_button.clicked.connect(self.classify)
        toolbar.addWidget(self.classify_button)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        toolbar.addWidget(self.stop_button)
        toolbar.addSeparator()
        self.pin_check = QCheckBox("Pin heavy settings")
        self.pin_check.setToolTip("Keep T and the attack's steps and EOT draws for the next launch; unpinned, "
                                  "they start from the model card's defaults")
        toolbar.addWidget(self.pin_check)

        self.input_view = ImageView("Model input (converted)")
        self.gallery = Gallery(icon_size=40)
        self.gallery.image_chosen.connect(self._on_gallery_image_chosen)
        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(self.input_view)
        gallery_box = QWidget()
        gl = QVBoxLayout(gallery_box)
        gl.setContentsMargins(2, 2, 2, 2)
        self.samples_label = QLabel()
        self.samples_label.setWordWrap(True)
        gl.addWidget(self.samples_label)
        gl.addWidget(self.gallery, 1)
        gallery_box.setMinimumHeight(110)
        left.addWidget(gallery_box)
        left.setChildrenCollapsible(False)
        left.setSizes([520, 200])
        left.setMinimumWidth(190)
        defaults = purify_settings(self.model)
        self.classify_tab = ClassifyTab(self.state)
        self.attack_tab = AttackTab(self.state)
        self.purify_tab = PurifyTab(self.state, defaults)
        self.attack_tab.panel.run_requested.connect(self._on_attack_panel_run_requested)
        self.attack_tab.panel.stop_requested.connect(self.stop)
        self.attack_tab.purify_requested.connect(self._on_attack_tab_purify_requested)
        self.purify_tab.panel.run_requested.connect(self._on_purify_panel_run_requested)
        self.purify_tab.panel.stop_requested.connect(self.stop)
        self.purify_tab.attack_requested.connect(self._on_purify_tab_attack_requested)
        self._views = {"classify": self.classify_tab, "attack": self.attack_tab, "purify": self.purify_tab}
        # the widgets tests, benchmarks and sessions reach by name
        self.bars, self.curves = self.classify_tab.bars, self.classify_tab.curves
        self.attack_panel, self.attack_plot = self.attack_tab.panel, self.attack_tab.plot
        self.view_original, self.view_perturbation = self.attack_tab.view_original, self.attack_tab.view_perturbation
        self.view_adversarial, self.view_purified = self.attack_tab.view_adversarial, self.attack_tab.view_purified
        self.attack_verdict = self.attack_tab.verdict
        self.purify_panel, self.purify_view = self.purify_tab.panel, self.purify_tab.view
        self.purify_curves, self.objective_plot = self.purify_tab.curves, self.purify_tab.objective_plot
        self.scrubber = self.purify_tab.scrubber
        self.tabs = QTabWidget()
        self.tabs.addTab(self.classify_tab, "Classify")
        self.tabs.addTab(self.attack_tab, "Attack")
        self.tabs.addTab(self.purify_tab, "Purify")
        self.tabs.setMinimumWidth(600)
        main = QSplitter(Qt.Orientation.Horizontal)
        main.addWidget(left)
        main.addWidget(self.tabs)
        main.setChildrenCollapsible(False)
        main.setStretchFactor(0, 0)
        main.setStretchFactor(1, 1)
        main.setSizes([300, 980])
        self.main_splitter = main
        central = QWidget()
        layout = QHBoxLayout(central)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(main)
        self.setCentralWidget(central)

        self.device_label = QLabel()
        self.progress = QProgressBar()
        self._set_progress_format("%v / %m levels")
        self.elapsed_label = QLabel("")
        self.message_label = QLabel("")  # long messages are elided here, whole in the tooltip
        self.message_label.setMinimumWidth(50)
        self._message_text = ""
        self._message_timer = QTimer(self)
        self._message_timer.setSingleShot(True)
        self._message_timer.timeout.connect(self._on_message_timer_timeout)
        status = self.statusBar()
        status.addWidget(self.message_label, 1)
        status.addPermanentWidget(self.elapsed_label)
        status.addPermanentWidget(self.progress)
        status.addPermanentWidget(self.device_label)

    def _restore_settings(self, steps: int | None) -> None:
        """Window geometry and light settings always; T and the attack's heavy settings only
        when pinned (otherwise the model card's and the panel's defaults)."""
        store = self.settings_store
        pinned = str(store.value("settings/pinned", "false")).lower() == "true"
        self.pin_check.setChecked(pinned)
        preset = str(store.value("classify/preset", "") or "")
        if preset in PRESETS:  # sets the purification panel; T below
            self.preset_combo.setCurrentIndex(self.preset_combo.findData(preset))
        default_steps = classifier_settings(self.model, self.preset).steps
        stored = store.value("classify/steps", None) if pinned else None
        self.steps_spin.setValue(int(steps or (stored if stored is not None else default_steps)))
        geometry = store.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        saved_attack = store.value("attack/settings")
        if saved_attack:
            try:
                saved = json.loads(saved_attack)
                if not pinned:
                    defaults = self.attack_panel.settings().to_dict()
                    saved.update({k: defaults[k] for k in HEAVY_ATTACK_SETTINGS if k in defaults})
                self.attack_panel.apply(saved)
            except (TypeError, ValueError, KeyError):
                pass  # settings from another version: keep the defaults

    def _save_settings(self) -> None:
        store = self.settings_store
        store.setValue("window/geometry", self.saveGeometry())
        store.setValue("attack/settings", json.dumps(self.attack_panel.settings().to_dict()))
        store.setValue("settings/pinned", "true" if self.pin_check.isChecked() else "false")
        store.setValue("classify/steps", int(self.steps_spin.value()))
        store.setValue("classify/preset", self.preset or "")

    def show_status(self, text: str, timeout_ms: int = 5000) -> None:
        """A status-bar message, elided to the room left by the permanent widgets."""
        self._message_text = text
        self._elide_message()
        self.message_label.setToolTip(text)
        if timeout_ms > 0:
            self._message_timer.start(timeout_ms)

    def _elide_message(self) -> None:
        width = max(20, self.message_label.width() - 4)
        metrics = self.message_label.fontMetrics()
        self.message_label.setText(metrics.elidedText(self._message_text, Qt.TextElideMode.ElideRight, width))

    def _on_message_timer_timeout(self) -> None:
        self._message_text = ""
        self.message_label.setText("")
        self.message_label.setToolTip("")

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        super().resizeEvent(event)
        if self._message_text:
            QTimer.singleShot(0, self._elide_message)  # after the status bar's layout

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
            self._add_action(model_menu, f"Bundled: {name}", None, lambda n=name: self.load_model(n))
        model_menu.addSeparator()
        self._add_action(model_menu, "&Load checkpoint…", QKeySequence("Ctrl+L"), self.load_model_dialog)
        self._add_action(model_menu, "&Generate sample of class…", QKeySequence("Ctrl+G"), self.generate_sample_dialog)
        device_menu = self.menuBar().addMenu("&Device")
        for name in ("cpu", "cuda"):
            action = self._add_action(device_menu, name.upper(), None, lambda d=name: self.set_device(d))
            action.setEnabled(name == "cpu" or torch.cuda.is_available())

    def _add_action(self, menu, text, shortcut, slot) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(shortcut)
        # triggered(bool) would pass its `checked` flag as a slot's first argument (run_attack's image)
        action.triggered.connect(lambda _checked=False: slot())
        menu.addAction(action)
        return action

    def _load_samples(self) -> None:
        """The bundled per-class samples (MNIST models), or a caption saying how to make some."""
        cfg = self.model.net.config
        images, captions, class_names = [], [], []
        dataset = self.model.card.get("dataset") or ""
        if dataset == "mnist" and SAMPLES_DIR.exists():
            for path in sorted(SAMPLES_DIR.glob("*.png")):
                try:
                    images.append(load_for_model(path, cfg.image_size, cfg.in_channels, invert=False))
                except ImageLoadError:
                    continue
                captions.append(sample_caption(path.stem, self.model.classes))
                parsed = parse_sample_filename(path.stem)  # the class it was drawn from
                known = parsed is not None and parsed[0] < len(self.model.classes)
                class_names.append(self.model.classes[parsed[0]] if known else None)
        self.gallery.set_images(images, captions, class_names)
        make_more = "Model ▸ Generate sample of class… (Ctrl+G) adds samples of the loaded model here"
        if not images:
            browse = ("File ▸ Browse dataset… (Ctrl+B) opens test images" if dataset else
                      "File ▸ Browse dataset… (Ctrl+B) opens a folder of images")
            text = f"<b>Samples</b>: none bundled for this {dataset + ' ' if dataset else ''}model. {make_more}; {browse}."
        elif self.model.name == DEFAULT_MODEL:
            text = f"<b>Samples</b> of this model, per class (click to open). {make_more}."
        else:
            text = f"<b>Samples</b> of the bundled model {DEFAULT_MODEL}, per class (click to open). {make_more}."
        self.samples_label.setText(text)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model's input (channels, height, width)."""
        cfg = self.model.net.config
        return cfg.in_channels, cfg.image_size, cfg.image_size

    def fit_image(self, image: np.ndarray) -> np.ndarray | None:
        """``image`` (C, H, W) in [0, 1] as the model's input: resized as an opened image is
        when only its size differs; None when its channels differ (a grayscale digit is no
        colour photo, nor the reverse)."""
        channels, size, _ = shape = self.input_shape
        if image.shape == shape:
            return image
        if image.ndim != 3 or image.shape[0] != channels:
            return None
        return convert_image(image_from_array(image), size, channels, invert=False)

    def _on_gallery_image_chosen(self, image: np.ndarray, caption: str, class_name: str | None) -> None:
        fitted = self.fit_image(np.asarray(image))
        if fitted is None:  # e.g. a browser page of the previous model's data
            c, h, w = self.input_shape
            self.show_error("Cannot open image", f"{caption} has {image.shape[0]} channel(s); {self.model.name} "
                            f"takes {'grayscale' if c == 1 else 'RGB'} {w}×{h} images")
            return
        known = self.model.classes.index(class_name) if class_name in self.model.classes else None
        self.set_image(fitted, caption, known_class=known)

    def open_dataset_browser(self) -> None:
        """Show the dataset browser of the model's data (the open one, if any)."""
        if self.dataset_browser is not None:
            self.dataset_browser.raise_()
            self.dataset_browser.activateWindow()
            return
        c, size, _ = self.input_shape
        browser = DatasetBrowser(self.model.card.get("dataset", "mnist"), size, c, self)
        browser.image_chosen.connect(self._on_gallery_image_chosen)
        browser.failed.connect(lambda msg: self.show_error("Cannot open dataset", msg))
        browser.finished.connect(self._on_dataset_browser_finished)
        browser.runner.drained.connect(self._on_runner_drained)  # a close waits for its load to end too
        browser.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        browser.show()
        self.dataset_browser = browser
        if browser.source_indices[0] != 2:  # the model's test split, at once (Load shows another source)
            browser.load(0, browser.root.text())

    def _on_dataset_browser_finished(self, _code: int) -> None:
        if self.sender() is self.dataset_browser:
            self.dataset_browser = None

    def _refit_dataset_browser(self) -> None:
        """After a model switch: the open browser shows the new model's input, or closes
        when the model is of another dataset (its pages would be of the old one)."""
        browser = self.dataset_browser
        if browser is None:
            return
        c, size, _ = self.input_shape
        if browser.dataset_name == self.model.card.get("dataset", "mnist"):
            browser.set_input(size, c)
        else:
            browser.close()

    def set_device(self, device: str) -> None:
        """Run later jobs on ``device``.

        A cancelled job may still be inside a network pass on the old device: while a worker
        runs, the network is copied to the new device instead of moved, so the old job keeps
        its own (the copy is freed when it ends).
        """
        if device == self.device:
            return
        self.runner.cancel()
        self._on_job_stopped()
        purifier = self.model.purifier
        if self.runner.running_threads():
            if purifier is not None:
                purifier = dataclasses.replace(purifier, net=copy.deepcopy(purifier.net).to(device))
            self.model = dataclasses.replace(self.model, net=copy.deepcopy(self.model.net).to(device),
                                             purifier=purifier)
        else:
            self.model.net.to(device)
            if purifier is not None:
                purifier.net.to(device)
        self.device = device
        self._show_model()  # the same weights: the results on show stay valid, so they stay

    def generate_sample_dialog(self) -> None:
        label, ok = QInputDialog.getItem(self, "Generate sample", "Class:", self.model.classes, 0, False)
        if ok:
            self.generate_sample(self.model.classes.index(label))

    def generate_sample(self, label: int, seed: int | None = None, steps: int = 18) -> None:
        """Draw an image of class ``label`` with the EDM sampler (shown live), then classify it."""
        seed = int(time.time()) % 100000 if seed is None else seed
        net = self.model.net
        self._set_progress(steps, "sampler steps")
        self.sample_label = f"generated {self.model.classes[label]} (seed {seed})"
        self.sample_class = label
        self.sample_caption = f"{self.model.classes[label]} (seed {seed})"
        self._start_job("sample", lambda cancelled: sample_job(net, label, steps, seed, cancelled))

    def _apply_model(self) -> None:
        self.state.set_classes(self.model.classes)  # drops the old model's results: so do the views
        self.classify_tab.set_classes(self.model.classes)
        self.attack_tab.set_classes(self.model.classes)
        self.purify_tab.set_classes(self.model.classes)
        self._load_samples()
        self._show_model()

    def _show_model(self) -> None:
        """The window title and the status bar's model and device."""
        self.setWindowTitle(f"RDC Studio — {self.model.name}")
        cfg = self.model.net.config
        pair = f" + purifier {self.model.purifier.name}" if self.model.purifier is not None else ""
        self.device_label.setText(f"{self.model.name}{pair} · {cfg.architecture} · {self.device.upper()} "
                                  f"· {torch.get_num_threads()} threads")

    # -- errors -----------------------------------------------------------------
    def show_error(self, title: str, text: str) -> None:
        """Report a problem without changing the current state (tests replace this)."""
        self.show_status(f"{title}: {text}", 10000)
        box = QMessageBox(QMessageBox.Icon.Warning, title, text, QMessageBox.StandardButton.Ok, self)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()

    def show_warning(self, title: str, text: str) -> None:
        """Tell the user of something to bear in mind about what was done (tests replace this)."""
        self.show_status(f"{title}: {text}", 15000)
        box = QMessageBox(QMessageBox.Icon.Information, title, text, QMessageBox.StandardButton.Ok, self)
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
        self.set_image(arr, Path(path).name, path=str(path))
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
        """Convert and classify a pasted or dropped image; refused above :data:`MAX_PIXELS`
        pixels, as a file is (converting one would hold the GUI thread for seconds)."""
        from PIL import Image

        w, h = qimage.width(), qimage.height()
        if w == 0 or h == 0:
            self.show_error("Cannot open image", f"{label} is empty")
            return
        if w * h > MAX_PIXELS:
            self.show_error("Cannot open image", f"{label} is {w}x{h} = {w * h:,} pixels, more than the "
                            f"{MAX_PIXELS:,} allowed; scale it down first")
            return
        rgba = qimage.convertToFormat(QImage.Format.Format_RGBA8888)
        buf = np.frombuffer(rgba.constBits(), np.uint8, count=rgba.sizeInBytes())
        arr = buf.reshape(h, rgba.bytesPerLine())[:, : w * 4].reshape(h, w, 4).copy()
        cfg = self.model.net.config
        self.set_image(convert_image(Image.fromarray(arr, "RGBA"), cfg.image_size, cfg.in_channels), label)

    def set_image(self, image: np.ndarray, source: str, path: str = "", known_class: int | None = None) -> None:
        """Make ``image`` (C, H, W) in [0, 1] the input and classify it; ``known_class``: its
        label when known (a dataset image, a sample drawn from a class), which attacks then use."""
        self._classify_note = ""  # a note on the previous input's classification
        self.state.set_image(image, source, path, known_class)
        self.classify()

    def _on_state_changed(self, event: str) -> None:
        if event == "image":
            image, source = self.state.image, self.state.image_source
            if image is None:
                self.input_view.set_image(None)
            else:
                c, h, w = image.shape
                self.input_view.set_image(image, f"{source} → {w}×{h}, {'grayscale' if c == 1 else 'RGB'}")

    # the session state, by the names tests and scripts use
    @property
    def image(self) -> np.ndarray | None:
        return self.state.image

    @property
    def image_source(self) -> str:
        return self.state.image_source

    @property
    def image_path(self) -> str:
        return self.state.image_path

    @property
    def last_probabilities(self) -> np.ndarray | None:
        return self.state.probabilities

    @property
    def last_outcome(self):
        return self.state.attack.outcome

    @property
    def purify_records(self) -> list:
        return self.state.purification.records

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
        """Save the last attack's adversarial image as a lossless 8-bit PNG, never over the
        attacked image's file nor the input's."""
        if self.last_outcome is None:
            self.show_error("Nothing to export", "Run an attack first.")
            return False
        try:
            for source, what in ((self.image_path, "the input image"), (self.state.attack.path, "the attacked image")):
                if source and same_file(path, source):  # the attacked image: an earlier input, say
                    raise ValueError(f"{path}: refusing to overwrite {what}")
            save_png_atomic(self.last_outcome.adversarial[0], path, source=self.image_path or None)
        except (OSError, ValueError) as exc:
            self.show_error("Cannot export", str(exc))
            return False
        self.show_status(f"Saved {path}", 5000)
        return True

    def export_csv_dialog(self) -> None:
        path = self._save_dialog("Export CSV", "rdc-results.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path: str) -> bool:
        """Probabilities, likelihood curves, purification and attack curves in one tidy CSV."""
        rows = self.state.csv_rows()
        try:
            write_csv(path, CSV_HEADER, rows)
        except OSError as exc:
            self.show_error("Cannot export", str(exc))
            return False
        self.show_status(f"Saved {path} ({len(rows)} rows)", 5000)
        return True

    def session(self) -> dict:
        """The current session: model, exact input, every setting (with seeds) and results."""
        if self.image is None:
            raise SessionError("no image is open")
        results = self.state.results()
        # the settings that made the results on show (the panels may have changed since)
        classified = self.state.classification.settings if self.state.probabilities is not None else None
        try:
            classifier = classified or self._classifier().settings.to_dict()
        except ValueError as exc:
            raise SessionError(f"classifier settings: {exc}") from None
        attacked = self.state.attack.settings if self.state.attack.outcome is not None else None
        attack = attacked or {"attack": self.attack_panel.settings().to_dict(),
                              "attack_gradient": self.attack_panel.grad.currentText(),
                              "attack_binarize": self.attack_panel.binarize_threshold(),
                              "purify": self.purify_panel.settings().to_dict()}
        purified = self.state.purification.settings if self.state.purification.records else None
        if self._model_sha256 is None:
            try:
                self._model_sha256 = file_sha256(self.model.path)
            except OSError:
                self._model_sha256 = ""  # the file has gone since it was loaded: the session names it all the same
        return make_session(session_model_reference(self.model.path), self.image, self.image_source, classifier,
                            attack["attack"], purified or attack["purify"], results, self.device,
                            known_class=self.state.image_known_class, model_sha256=self._model_sha256) | {
            "attack_gradient": attack["attack_gradient"], "attack_binarize": attack["attack_binarize"]}

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
        self.show_status(f"Saved session {path}", 5000)
        return True

    def open_session_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open session", "", "RDC Studio session (*.json)")
        if path:
            self.open_session(path)

    def open_session(self, path: str) -> bool:
        """Restore a saved session: its settings and image, whose classification runs again,
        and the attack and purification it holds, shown as they ended."""
        try:  # everything is checked before anything changes
            session = load_session(path)
            classifier, attack, purify = session_settings(session)
        except SessionError as exc:
            self.show_error("Cannot open session", f"{path}: {exc}" if str(path) not in str(exc) else str(exc))
            return False
        reference, warning = session_model(session)
        model = self.model if self._is_current_model(reference) else self._load_candidate(reference)
        if model is None:
            return False
        cfg = model.net.config
        image = session["image_array"]
        if image.shape != (cfg.in_channels, cfg.image_size, cfg.image_size):
            self.show_error("Cannot open session", f"{path}: image shape {image.shape} does not fit the model "
                            f"{model.name} ({cfg.in_channels}, {cfg.image_size}, {cfg.image_size})")
            return False
        try:  # the attack and purification it holds, checked against the model before anything changes
            saved = saved_results(session.get("results") or {}, model.classes, image.shape)
        except SessionError as exc:
            self.show_error("Cannot open session", f"{path}: {exc}")
            return False
        if model is not self.model:
            self._switch_model(model)
        if warning:
            self.show_warning("Session model", f"{path}: {warning}.")
        self.session_classifier = classifier
        self.preset_combo.blockSignals(True)  # show the session's preset; its settings come from the session
        index = self.preset_combo.findData(self.session_classifier.get("preset", ""))
        self.preset_combo.setCurrentIndex(max(0, index))
        self.preset_combo.blockSignals(False)
        self.steps_spin.setValue(int(self.session_classifier.get("steps", self.steps_spin.value())))
        if attack:
            self.attack_panel.apply(attack)
        if session.get("attack_gradient"):
            self.attack_panel.grad.setCurrentText(session["attack_gradient"])
        binarize = session.get("attack_binarize")  # absent in older sessions: off
        self.attack_panel.binarize.setValue(float(binarize) if isinstance(binarize, (int, float)) else 0.0)
        if purify:
            self.purify_panel.apply(purify)
        known = session["image"].get("known_class")  # absent in older sessions: unknown
        known = known if type(known) is int and 0 <= known < len(self.model.classes) else None
        self.set_image(image, str(session["image"].get("source", Path(path).name)), known_class=known)
        self.state.restore(saved)  # after the image: an attack of the session's image is one of this input
        self._classify_note = saved_attack_note((session.get("results") or {}).get("attack"), self.model.classes)
        return True

    # -- model ------------------------------------------------------------------
    def load_model_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load checkpoint", "", "Checkpoints (*.safetensors *.json *.pkl)")
        if path:
            self.load_model(path)

    def load_model(self, name_or_path: str) -> bool:
        """Load a model and switch to it; on any problem say so and keep the current one."""
        model = self._load_candidate(name_or_path)
        if model is None:
            return False
        self._switch_model(model)
        return True

    def _is_current_model(self, name_or_path: str) -> bool:
        """Whether ``name_or_path`` names the loaded model's weights file."""
        if str(self.model.path) == name_or_path:
            return True
        try:
            return resolve_model_path(name_or_path).resolve() == self.model.path.resolve()
        except (CheckpointError, OSError):
            return False

    def _load_candidate(self, name_or_path: str) -> LoadedModel | None:
        """A model the window can switch to, checked (else None, after saying why)."""
        try:
            model = load_checkpoint(name_or_path, device=self.device)
            if problem := model_problem(model):
                self.show_error("Cannot load model", f"{name_or_path}: {problem}.")
                return None
            # the settings this window would use with it (the card's with the toolbar's preset)
            classifier_settings(model, self.preset)
            purify_settings(model, self.preset)
        except (CheckpointError, OSError, RuntimeError, MemoryError, RecursionError) as exc:
            self.show_error("Cannot load model", str(exc))
            return None
        except (TypeError, ValueError) as exc:
            self.show_error("Cannot load model", f"{name_or_path}: its settings do not work with the preset "
                            f"{self.preset or 'of its card'} ({exc})")
            return None
        return model

    def _switch_model(self, model: LoadedModel) -> None:
        """Make ``model`` the window's: the old model's results go; the input stays when it
        fits (resized when only its size differs), and is classified again."""
        self.runner.cancel()
        self._on_job_stopped()
        known, old_classes = self.state.image_known_class, self.model.classes
        # the input's label, by name: an index into the old model's classes means nothing to the new one
        if known is not None:
            known = model.classes.index(old_classes[known]) if old_classes[known] in model.classes else None
        self.model = model
        self._model_sha256 = None
        image, source, path = self.image, self.image_source, self.image_path
        self._apply_model()
        self._apply_preset_settings(self.preset)  # T and the purification: this model's card's
        self.attack_panel.set_dataset(model.card.get("dataset"))  # and epsilon its data's usual one
        self._refit_dataset_browser()
        fitted = None if image is None else self.fit_image(image)
        if image is not None and fitted is None:
            c, size, _ = self.input_shape
            self.state.set_image(None)
            self.show_status(f"{source} was closed: {model.name} takes {'grayscale' if c == 1 else 'RGB'} "
                             f"{size}×{size} images", 10000)
        elif fitted is not image:  # the same picture at the new model's size, as opening it would give
            self.state.set_image(fitted, source, path, known)
        else:
            self.state.image_known_class = known
        if self.image is not None:
            self.classify()

    # -- jobs ---------------------------------------------------------------------
    def _set_progress(self, total: int, unit: str) -> None:
        self.progress.setRange(0, max(1, total))
        self._set_progress_format(f"%v / %m {unit}")
        self.progress.setValue(0)

    def _set_progress_format(self, text: str) -> None:
        """The progress bar's text, with the bar wide enough for it at its longest
        (e.g. "stopped at 100 / 100 iterations" on one line)."""
        self.progress.setFormat(text)
        widest = text.replace("%v", str(self.progress.maximum())).replace("%m", str(self.progress.maximum()))
        self.progress.setMinimumWidth(min(360, self.progress.fontMetrics().horizontalAdvance(widest) + 24))

    def _start_job(self, kind: str, factory) -> None:
        if self._closing:
            return
        if self._job_kind and self._job_kind != kind:  # the new job cuts the running one short: say so
            self._show_stopped(self._job_kind)
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

    @property
    def preset(self) -> str | None:
        """The preset chosen in the toolbar (None: the model card's settings)."""
        return self.preset_combo.currentData() or None

    def _on_preset_combo_current_index_changed(self, _index: int) -> None:
        self.apply_preset(self.preset)

    def apply_preset(self, preset: str | None) -> None:
        """Take T and the purification settings from ``preset`` (None: the model card's)."""
        index = self.preset_combo.findData(preset or "")
        if index != self.preset_combo.currentIndex():
            self.preset_combo.setCurrentIndex(index)  # comes back here through the signal
            return
        self._apply_preset_settings(preset)
        self._classify_note = ""
        if preset:
            note = ""
            if self.model.card.get("dataset") != "cifar10":
                note = (f" These are the paper's CIFAR-10 settings; {self.model.name}'s own, chosen on its "
                        f"validation split, are its model card's.")
            self._classify_note = f"Preset {preset}: {get_preset(preset).description}.{note}"
            self.show_status(self._classify_note, 15000)
        if self.image is not None and self._job_kind in ("", "classify"):  # the result on show: these settings'
            self.classify()  # its status line repeats the note
        else:
            self._classify_note = ""

    def _apply_preset_settings(self, preset: str | None) -> None:
        """T and the purification panel from the model's card and ``preset``."""
        self.session_classifier = None
        self.steps_spin.setValue(classifier_settings(self.model, preset).steps)
        self.purify_panel.apply(purify_settings(self.model, preset).to_dict())

    def _classifier(self):
        # a session's settings; keys another version of the app wrote are left out
        known = set(ClassifierSettings.__dataclass_fields__) | {"preset"}
        overrides = {k: v for k, v in (self.session_classifier or {}).items() if k in known}
        overrides["steps"] = int(self.steps_spin.value())
        preset = overrides.pop("preset", "") if self.session_classifier else self.preset  # a session's own
        return build_classifier(self.model, self.device, preset=preset, **overrides)

    def _classifier_for(self, job: str):
        """The classifier of the toolbar's settings, or None after saying why ``job`` cannot run."""
        try:
            return self._classifier()
        except ValueError as exc:
            self.show_error(f"Cannot {job}", f"Classifier settings: {exc}")
            return None

    def classify(self) -> None:
        """Classify the input with the current T, drawing the running estimate."""
        if self.image is None:
            self.show_status("Open, drop or paste an image first", 4000)
            return
        steps = int(self.steps_spin.value())
        clf = self._classifier_for("classify")
        if clf is None:
            return
        x = torch.from_numpy(self.image).unsqueeze(0).to(self.device)
        self.classify_tab.begin(steps, clf.settings.to_dict())
        try:
            ood = OodScorer.for_model(self.model)
        except ValueError as exc:  # a malformed reference: classify without the score
            ood = None
            self.classify_tab.ood.clear_score(f"No OOD score: {exc}")
        self._set_progress(steps, "levels")
        levels_per_step = max(1, steps // 32)
        self._start_job("classify", lambda cancelled: classify_job(clf, x, levels_per_step, cancelled, ood))

    def _on_attack_panel_run_requested(self) -> None:
        self.run_attack()

    def _on_purify_tab_attack_requested(self, image: np.ndarray, caption: str, known_class: int | None) -> None:
        self.run_attack(image, caption, known_class, path=self.state.purification.path)

    def run_attack(self, image: np.ndarray | None = None, source: str = "", known_class: int | None = None,
                   path: str = "") -> None:
        """Attack ``image`` (default: the input) with the panel's settings against the full
        defense; the label is ``known_class`` (the input's when known), else the attacked
        model's prediction on the image; ``path``: the file ``image`` derives from."""
        of_input = image is None
        if image is None:
            image, source, known_class = self.image, self.image_source, self.state.image_known_class
        if image is None:
            self.show_status("Open, drop or paste an image first", 4000)
            return
        if problem := self.attack_panel.problem():
            self.show_error("Cannot run this attack", problem)
            return
        settings = self.attack_panel.settings()
        grad = self.attack_panel.grad.currentText()
        threshold = self.attack_panel.binarize_threshold()
        clf = self._classifier_for("run this attack")
        if clf is None:
            return
        purify_settings = self.purify_panel.settings()
        full = build_defense("rdc", self.model, clf, purify=purify_settings, grad_mode="exact", device=self.device,
                             binarize=threshold)
        if grad == "dc-only":
            attacked = build_defense("dc", self.model, clf, device=self.device, binarize=threshold)
        else:
            attacked = build_defense("rdc", self.model, clf, purify=purify_settings, grad_mode=grad,
                                     device=self.device, binarize=threshold)
        # the purified pane shows what the defense purifies: the binarised image when it binarises
        purify = full.purify if threshold is None else (lambda adv: full.purify(full.binarize(adv)))
        x = torch.round(torch.from_numpy(np.asarray(image)).unsqueeze(0) * 255).div(255).to(self.device)
        iterations = settings.steps * settings.restarts
        run_settings = {"attack": settings.to_dict(), "attack_gradient": grad, "attack_binarize": threshold,
                        "purify": purify_settings.to_dict()}  # what a session records with the result
        self.attack_tab.begin(x[0].cpu().numpy(), source, iterations, threshold, run_settings, known_class,
                              of_input, path)
        y = None if known_class is None else torch.tensor([known_class], device=self.device)
        self._set_progress(iterations, "iterations")
        self.tabs.setCurrentWidget(self.attack_tab)
        if warning := gradient_warning(attacked):
            self.show_status(f"Note: {warning} (choose it under Gradient)", 15000)
        self._start_job("attack", lambda cancelled: attack_job(attacked, x, settings, full, purify, cancelled, y))

    def _on_purify_panel_run_requested(self) -> None:
        self.run_purification()

    def _on_attack_tab_purify_requested(self, image: np.ndarray, caption: str, known_class: int | None) -> None:
        self.run_purification(image, caption, known_class, path=self.state.attack.path)

    def run_purification(self, image: np.ndarray | None = None, source: str = "",
                         known_class: int | None = None, path: str = "") -> None:
        """Likelihood maximisation of ``image`` (default: the input), drawn live; ``known_class``
        (the input's when known) is carried to an attack of the result, and so is ``path``,
        the file ``image`` derives from."""
        of_input = image is None
        if image is None:
            image, source, known_class = self.image, self.image_source, self.state.image_known_class
        if image is None:
            self.show_status("Open, drop or paste an image first", 4000)
            return
        settings = self.purify_panel.settings()
        if settings.steps == 0:
            self.show_error("Nothing to purify", "Steps N is 0: the purification leaves the image as it is. "
                            "Set at least 1 step (0 steps in an attack's defense means no purification).")
            return
        clf = self._classifier_for("purify")
        if clf is None:
            return
        lm = build_maximizer(self.model, settings)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).unsqueeze(0).to(self.device)
        self.purify_tab.begin(source, settings.steps, settings.to_dict(), known_class, of_input, path)
        self._set_progress(settings.steps, "steps")
        self.tabs.setCurrentWidget(self.purify_tab)
        self._start_job("purify", lambda cancelled: purify_job(lm, x, clf, cancelled))

    def stop(self) -> None:
        """Stop the running job; the views say so at once (the worker may end a moment later)."""
        if self.runner.cancel():
            self._on_job_stopped()
            self.show_status("Stopped", 3000)

    def _on_job_stopped(self) -> None:
        """Reflect a stop in the views: verdict, progress bar, buttons."""
        if not self._job_kind:
            return
        self._job_ended()
        self._show_stopped(self._job_kind)
        self._set_progress_format(f"stopped at %v / %m {self.progress.format().split('%m ', 1)[-1]}")
        self._job_kind = ""

    def _show_stopped(self, kind: str) -> None:
        """Tell the view of a job of ``kind`` that it ended early."""
        view = self._views.get(kind)
        if view is not None:
            view.stopped()
        elif kind == "sample":  # the sampler drew into the input view: show the input again
            self._on_state_changed("image")

    @Slot(list)
    def _on_runner_steps_ready(self, records: list) -> None:
        """Hand one throttled flush of records to the view of the running job (one redraw)."""
        view = self._views.get(self._job_kind)
        if view is not None:
            done = view.show_records(records)
        else:  # the sampler draws into the input view
            sampled = [r for r in records if isinstance(r, SampleStep)]
            done = -1
            if sampled:
                last = sampled[-1]
                self.input_view.set_image(last.image[0], f"sampling: step {last.step}/{last.total_steps}, "
                                          f"sigma {last.sigma:.3f}")
                done = last.step
        if done >= 0:
            self.progress.setValue(done)

    @Slot(object)
    def _on_runner_finished(self, result) -> None:
        """The job's return value: a final record, an outcome or a trajectory (None: ended early)."""
        kind, self._job_kind = self._job_kind, ""
        self._job_ended()
        if result is None:
            return
        if kind != "attack":
            self.progress.setValue(self.progress.maximum())
        if kind == "attack":  # it may end early (the model fooled): the bar says how far it went
            ran = self.state.attack.iterations
            self.progress.setValue(ran[-1] if ran else 0)
            self.attack_tab.finish(result)
            self.attack_finished.emit(result)
        elif kind == "sample":
            self.gallery.add_image(result.image[0], self.sample_caption,
                                   class_name=self.model.classes[self.sample_class])
            self.set_image(result.image[0], self.sample_label, known_class=self.sample_class)
        elif kind == "purify":
            self.purify_tab.finish(result)
            self.purification_finished.emit(result)
        elif kind == "classify":
            self.classify_tab.finish(result)
            probs = self.state.probabilities
            top = int(np.argmax(probs))
            note, self._classify_note = self._classify_note, ""
            self.show_status(f"{self.image_source}: {self.model.classes[top]} ({probs[top]:.1%}) "
                             f"in {time.perf_counter() - self._started_at:.2f} s" + (f". {note}" if note else ""),
                             15000 if note else 10000)
            self.classification_finished.emit(probs)

    @Slot(str)
    def _on_runner_failed(self, message: str) -> None:
        kind, self._job_kind = self._job_kind, ""
        self._job_ended()
        self._set_progress_format(f"failed at %v / %m {self.progress.format().split('%m ', 1)[-1]}")
        self.state.fail(kind, message)
        view = self._views.get(kind)
        if view is not None:  # never leave a view saying that the job still runs
            view.failed()
        elif kind == "sample":  # the sampler drew into the input view: show the input again
            self._on_state_changed("image")
        self._classify_note = ""
        self.show_error(f"{kind.capitalize() or 'Job'} failed", message)

    def _on_timer_timeout(self) -> None:
        """The running job's elapsed time and, while it runs, the time it has left."""
        elapsed = time.perf_counter() - self._started_at
        left = time_left_text(elapsed, self.progress.value(), self.progress.maximum()) if self._timer.isActive() else ""
        self.elapsed_label.setText(f"{elapsed:.1f} s" + (f" \u00b7 {left}" if left else ""))

    # -- closing ------------------------------------------------------------------
    def closeEvent(self, event) -> None:  # noqa: N802
        """Close at once when idle; else cancel the job and close when its worker has ended.

        The GUI thread never waits for the worker: the window stays responsive (and says
        that it is stopping) until the runner reports that its threads have drained.
        """
        if not self._closing:
            self._save_settings()
            self._timer.stop()
            self._closing = True
        self.stop()
        browser = self.dataset_browser
        if browser is not None:  # its load is cancelled; the close goes on when its worker has ended
            browser.runner.cancel()
        if self.runner.running_threads() or (browser is not None and browser.runner.running_threads()):
            self.setEnabled(False)
            self.show_status("Stopping the running job before closing…", 0)
            event.ignore()
            return
        super().closeEvent(event)

    @Slot()
    def _on_runner_drained(self) -> None:
        if self._closing:
            QTimer.singleShot(0, self.close)

    def cancel_close(self) -> None:
        """Forget a pending close (tests; the window stays usable)."""
        self._closing = False
        self.setEnabled(True)
