"""Attack settings form: method, norm, eps, steps, step size, target, gradient mode, EOT, seed."""
from __future__ import annotations

from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QSpinBox, QWidget

from ...core.attacks import AttackSettings

from .run_stop_panel import RunStopPanel

METHODS = {"APGD-CE": ("apgd", "ce"), "APGD-DLR": ("apgd", "dlr"), "APGD-T (targeted DLR)": ("apgd", "dlr-targeted"),
           "PGD (CE)": ("pgd", "ce")}


class AttackPanel(RunStopPanel):
    """Emits ``run_requested`` / ``stop_requested``; :meth:`settings` builds the engine settings."""

    def __init__(self, classes: list[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.method = QComboBox()
        self.method.addItems(list(METHODS))
        self.norm = QComboBox()
        self.norm.addItems(["linf", "l2"])
        self.eps = QDoubleSpinBox()
        self.eps.setDecimals(2)
        self.eps.setRange(0.0, 255.0)
        self.eps.setValue(76.5)
        self.eps.setSuffix(" /255")
        self.eps.setToolTip("l-inf: radius in /255 pixel units; l2: radius in [0,1] units")
        self.steps = QSpinBox()
        self.steps.setRange(1, 10000)
        self.steps.setValue(20)
        self.step_size = QDoubleSpinBox()
        self.step_size.setDecimals(4)
        self.step_size.setRange(0.0, 10.0)
        self.step_size.setSpecialValueText("auto")
        self.step_size.setToolTip("PGD step size in [0,1] units (auto: 2.5 eps / steps); APGD adapts its own")
        self.target = QComboBox()
        self.target.addItem("runner-up (auto)")
        self.target.addItems(classes)
        self.grad = QComboBox()
        self.grad.addItems(["auto", "exact", "smooth", "bpda", "dc-only"])
        self.grad.setToolTip("auto: smooth for sign-step purification, exact for Adam; exact: through the "
                             "purification; smooth: exact with a tanh surrogate for the sign steps' backward "
                             "pass; bpda: identity through it; dc-only: no purification")
        self.eot = QSpinBox()
        self.eot.setRange(1, 100)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.norm.currentTextChanged.connect(self._on_norm_changed)
        self._build([("Method", self.method), ("Norm", self.norm), ("Epsilon", self.eps), ("Steps", self.steps),
                     ("Step size", self.step_size), ("Target", self.target), ("Gradient", self.grad),
                     ("EOT draws", self.eot), ("Seed", self.seed)], "Run attack")

    def _on_norm_changed(self, norm: str) -> None:
        if norm == "l2":
            self.eps.setSuffix("")
            self.eps.setValue(1.5)
        else:
            self.eps.setSuffix(" /255")
            self.eps.setValue(76.5)

    def eps_value(self) -> float:
        return self.eps.value() / 255.0 if self.norm.currentText() == "linf" else self.eps.value()

    def settings(self) -> AttackSettings:
        method, loss = METHODS[self.method.currentText()]
        target = self.target.currentIndex() - 1
        return AttackSettings(method=method, loss=loss, norm=self.norm.currentText(), eps=self.eps_value(),
                              steps=self.steps.value(), step_size=self.step_size.value() or None,
                              target=target if target >= 0 else None, eot=self.eot.value(), seed=self.seed.value())


    def apply(self, settings: dict) -> None:
        """Restore the form from :meth:`settings`' dictionary form (session files)."""
        s = AttackSettings(**settings)
        for text, (method, loss) in METHODS.items():
            if (method, loss) == (s.method, s.loss):
                self.method.setCurrentText(text)
        self.norm.setCurrentText(s.norm)
        self.eps.setValue(s.eps * 255 if s.norm == "linf" else s.eps)
        self.steps.setValue(s.steps)
        self.step_size.setValue(s.step_size or 0.0)
        self.target.setCurrentIndex(0 if s.target is None else s.target + 1)
        self.eot.setValue(s.eot)
        self.seed.setValue(s.seed)
