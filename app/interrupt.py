"""Ctrl+C in the terminal closes the window the way File > Quit does (exit code 0).

Qt's event loop does not return to Python while it waits, so a plain SIGINT handler would
run only at the next Python slot (as a ``KeyboardInterrupt`` traceback in whatever slot
that is). The signal is instead written to a socket (:func:`signal.set_wakeup_fd`) that a
:class:`QSocketNotifier` watches, so the handler runs promptly, between events.
"""
from __future__ import annotations

import signal
import socket
from typing import Callable

from PySide6.QtCore import QObject, QSocketNotifier


class InterruptHandler(QObject):
    """While alive, SIGINT calls ``on_interrupt`` on the GUI thread; :meth:`uninstall` restores."""

    def __init__(self, on_interrupt: Callable[[], None], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._on_interrupt = on_interrupt
        self._reader, self._writer = socket.socketpair()
        for sock in (self._reader, self._writer):
            sock.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno())
        self._previous_handler = signal.signal(signal.SIGINT, self._on_signal)
        self._notifier = QSocketNotifier(self._reader.fileno(), QSocketNotifier.Type.Read, self)
        self._notifier.activated.connect(self._on_notifier_activated)
        self.interrupted = 0

    def _on_signal(self, _signum, _frame) -> None:  # runs when Python next gets control
        self.interrupted += 1
        self._on_interrupt()

    def _on_notifier_activated(self) -> None:
        try:
            while self._reader.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass  # drained; the Python-level handler has run (or runs right after this slot)

    def uninstall(self) -> None:
        signal.signal(signal.SIGINT, self._previous_handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._notifier.setEnabled(False)
        self._reader.close()
        self._writer.close()
