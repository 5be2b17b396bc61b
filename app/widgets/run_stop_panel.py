"""Base of the settings panels: a form of labelled widgets above Run / Stop buttons."""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFormLayout, QHBoxLayout, QPushButton, QVBoxLayout, QWidget


class RunStopPanel(QWidget):
    """Emits ``run_requested`` / ``stop_requested``; ``set_running`` toggles the buttons."""

    run_requested = Signal()
    stop_requested = Signal()

    def _build(self, rows: list[tuple[str, QWidget]], run_text: str) -> None:
        form = QFormLayout()
        for label, widget in rows:
            form.addRow(label, widget)
        self.run_button = QPushButton(run_text)
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

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _on_run_button_clicked(self) -> None:
        self.run_requested.emit()

    def _on_stop_button_clicked(self) -> None:
        self.stop_requested.emit()
