"""Likelihood-maximisation settings form: eta, steps, step size, optimiser."""
from __future__ import annotations

from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QSpinBox, QWidget

from ...core.purify import PurifySettings

from .run_stop_panel import RunStopPanel


class PurifyPanel(RunStopPanel):
    """Likelihood-maximisation settings; :meth:`settings` builds the engine settings."""

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
        self.eta.setToolTip("Radius of the l-inf ball the purified image stays in, around its input")
        self._build([("Eta (l∞)", self.eta), ("Steps N", self.steps), ("Step size", self.step_size),
                     ("Optimiser", self.optimizer)], "Run purification")

    def settings(self) -> PurifySettings:
        d = self._defaults.to_dict()
        d.update(eta=self.eta.value() / 255, steps=self.steps.value(), step_size=self.step_size.value() / 255,
                 optimizer=self.optimizer.currentText())
        return PurifySettings(**d)


    def apply(self, settings: dict) -> None:
        """Restore the form (and the hidden settings such as the noise seed) from a dictionary."""
        s = PurifySettings(**settings)
        self._defaults = s
        self.eta.setValue(s.eta * 255)
        self.steps.setValue(s.steps)
        self.step_size.setValue(s.step_size * 255)
        self.optimizer.setCurrentText(s.optimizer)
