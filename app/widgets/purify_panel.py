"""Likelihood-maximisation settings form: eta, steps, step size, optimiser."""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QPushButton, QSpinBox,
                               QVBoxLayout, QWidget)

from core.purify import PurifySettings


class PurifyPanel(QWidget):
    run_requested = Signal()
    stop_requested = Signal()

    def __init__(self, defaults: PurifySettings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.eta = QDoubleSpinBox()
        self.eta.setRange(0.0, 255.0)
        self.eta.setSuffix(" /255")
        self.eta.setValue(defaults.eta * 255)
        self.steps = QSpinBox()
        self.steps.setRange(0, 1000)
        self.steps.setValue(defaults.steps)
        self.step_size = QDoubleSpinBox()
        self.step_size.setRange(0.0, 255.0)
        self.step_size.setSuffix(" /255")
        self.step_size.setValue(defaults.step_size * 255)
        self.optimizer = QComboBox()
        self.optimizer.addItems(["sign", "adam"])
        self.optimizer.setCurrentText(defaults.optimizer)
        self._defaults = defaults
        form = QFormLayout()
        for label, widget in (("Eta (l-inf radius)", self.eta), ("Steps N", self.steps),
                              ("Step size", self.step_size), ("Optimiser", self.optimizer)):
            form.addRow(label, widget)
        self.run_button = QPushButton("Run purification")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.run_button.clicked.connect(self._on_run_button_clicked)
        self.stop_button.clicked.connect(self._on_stop_button_clicked)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addStretch(1)

    def settings(self) -> PurifySettings:
        d = self._defaults.to_dict()
        d.update(eta=self.eta.value() / 255, steps=self.steps.value(), step_size=self.step_size.value() / 255,
                 optimizer=self.optimizer.currentText())
        return PurifySettings(**d)

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _on_run_button_clicked(self) -> None:
        self.run_requested.emit()

    def _on_stop_button_clicked(self) -> None:
        self.stop_requested.emit()

    def apply(self, settings: dict) -> None:
        """Restore the form (and the hidden settings such as the noise seed) from a dictionary."""
        s = PurifySettings(**settings)
        self._defaults = s
        self.eta.setValue(s.eta * 255)
        self.steps.setValue(s.steps)
        self.step_size.setValue(s.step_size * 255)
        self.optimizer.setCurrentText(s.optimizer)
