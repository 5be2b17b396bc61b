"""Attack settings form: method, norm, eps, steps, step size, target, gradient mode, EOT, seed,
and the optional input binarisation of the attacked defense."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QSpinBox, QWidget

from ...core.attacks import AttackSettings

from .run_stop_panel import RunStopPanel

METHODS = {"APGD-CE": ("apgd", "ce"), "APGD-DLR": ("apgd", "dlr"), "APGD-T (targeted DLR)": ("apgd", "dlr-targeted"),
           "PGD (CE)": ("pgd", "ce"), "Square": ("square", "margin"),
           "Threshold flip": ("flip", "margin")}
METHOD_TIPS = {
    "APGD-CE": "APGD on the cross-entropy loss (AutoAttack's first attack)",
    "APGD-DLR": "APGD on the difference-of-logits-ratio loss",
    "APGD-T (targeted DLR)": "APGD on the targeted DLR loss (target: the runner-up or the class chosen below)",
    "PGD (CE)": "Projected gradient descent on the cross-entropy loss (fixed step size)",
    "Square": "Random square patches, no gradient (a check for masked gradients); steps = queries",
    "Threshold flip": "For a defense that binarises its input (set Binarise input): searches which pixels "
                      "within eps to push across the threshold",
}
FLIP_NEEDS_BINARIZATION = ("The threshold-flip attack is for a defense that binarises its input: "
                           "set \u201cBinarise input\u201d to a threshold (0.50 for MNIST) first.")


DEFAULT_RADII = {"mnist": {"linf": 0.3, "l2": 1.5}, "cifar10": {"linf": 8 / 255, "l2": 0.5}}
"""The usual threat models of each dataset (l-inf in [0, 1] units): the panel's starting epsilon."""


class AttackPanel(RunStopPanel):
    """Emits ``run_requested`` / ``stop_requested``; :meth:`settings` builds the engine settings."""

    def __init__(self, classes: list[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.method = QComboBox()
        self.method.addItems(list(METHODS))
        for index, text in enumerate(METHODS):
            self.method.setItemData(index, METHOD_TIPS[text], Qt.ItemDataRole.ToolTipRole)
        self.norm = QComboBox()
        self.norm.addItems(["linf", "l2"])
        self.eps = QDoubleSpinBox()
        self.eps.setDecimals(2)
        self.eps.setRange(0.0, 255.0)
        self.radii = DEFAULT_RADII["mnist"]
        self.eps.setValue(self.radii["linf"] * 255)
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
        self.binarize = QDoubleSpinBox()
        self.binarize.setDecimals(2)
        self.binarize.setRange(0.0, 0.99)
        self.binarize.setSingleStep(0.05)
        self.binarize.setSpecialValueText("off")
        self.binarize.setToolTip("Optional, off by default: the defense sees its input thresholded here (1 above, "
                                 "0 below; the Binary-ABS trick for l-inf on MNIST). Gradient attacks get the "
                                 "straight-through gradient; the threshold-flip attack searches which pixels "
                                 "to push across it")
        self.norm.currentTextChanged.connect(self._on_norm_changed)
        self.method.currentTextChanged.connect(self._on_method_changed)
        self._build([("Method", self.method), ("Norm", self.norm), ("Epsilon", self.eps), ("Steps", self.steps),
                     ("Step size", self.step_size), ("Target", self.target), ("Gradient", self.grad),
                     ("EOT draws", self.eot), ("Seed", self.seed), ("Binarise input", self.binarize)],
                    "Run attack")
        self.steps.setToolTip("Iterations (Square: queries; threshold flip: search iterations)")
        self._on_method_changed(self.method.currentText())

    def set_classes(self, classes: list[str]) -> None:
        """Offer another model's classes as targets (the chosen one stays if it still exists)."""
        index = self.target.currentIndex()
        self.target.clear()
        self.target.addItem("runner-up (auto)")
        self.target.addItems(classes)
        self.target.setCurrentIndex(index if index <= len(classes) else 0)

    def _on_method_changed(self, text: str) -> None:
        """Enable what the method uses: the flip attack is l-inf only, Square takes no gradient."""
        method, loss = METHODS[text]
        if method == "flip":
            self.norm.setCurrentText("linf")
        self.norm.setEnabled(method != "flip")
        self.step_size.setEnabled(method == "pgd")
        self.target.setEnabled(loss == "dlr-targeted")
        self.grad.setEnabled(method != "square")
        self.eot.setEnabled(method in ("apgd", "pgd"))

    def set_dataset(self, dataset: str | None) -> None:
        """Start epsilon at the usual threat model of ``dataset`` (unknown: MNIST's)."""
        self.radii = DEFAULT_RADII.get(dataset or "", DEFAULT_RADII["mnist"])
        self._on_norm_changed(self.norm.currentText())

    def _on_norm_changed(self, norm: str) -> None:
        if norm == "l2":
            self.eps.setSuffix("")
            self.eps.setValue(self.radii["l2"])
        else:
            self.eps.setSuffix(" /255")
            self.eps.setValue(self.radii["linf"] * 255)

    def eps_value(self) -> float:
        return self.eps.value() / 255.0 if self.norm.currentText() == "linf" else self.eps.value()

    def binarize_threshold(self) -> float | None:
        """The threshold the attacked defense binarises its input at, or None (off)."""
        value = self.binarize.value()
        return value if value > 0 else None

    def problem(self) -> str | None:
        """Why these settings cannot run (for the user), or None."""
        method, _ = METHODS[self.method.currentText()]
        if method == "flip" and self.binarize_threshold() is None:
            return FLIP_NEEDS_BINARIZATION
        return None

    def settings(self) -> AttackSettings:
        """The engine settings of the form (check :meth:`problem` before running them)."""
        method, loss = METHODS[self.method.currentText()]
        target = self.target.currentIndex() - 1
        threshold = self.binarize_threshold()
        return AttackSettings(method=method, loss=loss, norm=self.norm.currentText(), eps=self.eps_value(),
                              steps=self.steps.value(), step_size=self.step_size.value() or None,
                              target=target if target >= 0 else None, eot=self.eot.value(), seed=self.seed.value(),
                              **({"threshold": threshold} if method == "flip" and threshold is not None else {}))


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
        # Binarisation belongs to the defense, not the attack: sessions restore it on their
        # own ("attack_binarize"), and a launch never starts with it on.
