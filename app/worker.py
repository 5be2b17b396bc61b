"""Runs one engine generator at a time on a worker thread and relays its step records.

The job is a callable ``factory(cancelled) -> iterator of step records``; ``cancelled`` is
a zero-argument callable the generator polls at every step. Records cross the thread
boundary through queued signals (they are immutable numpy copies) in batches at most
about 30 times a second, so the GUI redraws at most at that rate; no record is dropped.
"""
from __future__ import annotations

import time
import traceback
from typing import Any, Callable, Iterator

from PySide6.QtCore import QObject, QThread, Signal, Slot

JobFactory = Callable[[Callable[[], bool]], Iterator[Any]]
UPDATE_INTERVAL_S = 1.0 / 30.0


class _Job(QObject):
    step_ready = Signal(int, object)
    finished = Signal(int, object)
    failed = Signal(int, str)
    cancelled = Signal(int)

    def __init__(self, job_id: int, factory: JobFactory) -> None:
        super().__init__()
        self.job_id = job_id
        self._factory = factory
        self._cancel = False

    def cancel(self) -> None:
        self._cancel = True

    def is_cancelled(self) -> bool:
        return self._cancel

    @Slot()
    def run(self) -> None:
        last, pending, last_emit = None, [], 0.0
        try:
            for record in self._factory(self.is_cancelled):
                last = record
                pending.append(record)
                now = time.monotonic()
                if now - last_emit >= UPDATE_INTERVAL_S:
                    self.step_ready.emit(self.job_id, pending)
                    last_emit, pending = now, []
                if self._cancel:
                    break
            if self._cancel:
                self.cancelled.emit(self.job_id)
                return
            if pending:
                self.step_ready.emit(self.job_id, pending)
            self.finished.emit(self.job_id, last)
        except Exception as exc:  # the GUI shows it; the thread must not die silently
            traceback.print_exc()
            self.failed.emit(self.job_id, f"{type(exc).__name__}: {exc}")


class JobRunner(QObject):
    """One job at a time on a worker thread; starting a job cancels the running one.

    Signals carry only the current job's events: ``steps_ready(records)`` (the records of
    one throttled flush, oldest first, so a view can redraw once per flush),
    ``finished(last_record)``, ``failed(message)``, ``cancelled()``.
    """

    steps_ready = Signal(list)
    finished = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    busy_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._next_id = 0
        self._current: _Job | None = None
        self._threads: dict[int, tuple[QThread, _Job]] = {}

    @property
    def busy(self) -> bool:
        return self._current is not None

    def start(self, factory: JobFactory) -> int:
        """Cancel any running job and start ``factory`` on a new worker thread."""
        self.cancel()
        self._next_id += 1
        job = _Job(self._next_id, factory)
        thread = QThread()
        thread.setObjectName(f"rdc-job-{job.job_id}")
        job.moveToThread(thread)
        thread.started.connect(job.run)
        job.step_ready.connect(self._on_job_step_ready)
        job.finished.connect(self._on_job_finished)
        job.failed.connect(self._on_job_failed)
        job.cancelled.connect(self._on_job_cancelled)
        for sig in (job.finished, job.failed, job.cancelled):
            sig.connect(thread.quit)
        thread.finished.connect(lambda jid=job.job_id: self._on_thread_finished(jid))
        self._threads[job.job_id] = (thread, job)
        self._current = job
        thread.start()
        self.busy_changed.emit(True)
        return job.job_id

    def cancel(self) -> None:
        """Ask the running job to stop at its next step."""
        if self._current is not None:
            self._current.cancel()
            self._current = None
            self.busy_changed.emit(False)
            self.cancelled.emit()

    def shutdown(self, timeout_ms: int = 30000) -> bool:
        """Cancel every job and wait for the worker threads; True if all stopped."""
        self.cancel()
        ok = True
        for thread, job in list(self._threads.values()):
            job.cancel()
            thread.quit()
            ok = thread.wait(timeout_ms) and ok
        return ok

    def running_threads(self) -> int:
        return sum(1 for thread, _ in self._threads.values() if thread.isRunning())

    def _is_current(self, job_id: int) -> bool:
        return self._current is not None and self._current.job_id == job_id

    @Slot(int, object)
    def _on_job_step_ready(self, job_id: int, records: list) -> None:
        if self._is_current(job_id) and records:
            self.steps_ready.emit(records)

    def _release_if_current(self, job_id: int) -> bool:
        """Mark the current job done; False if ``job_id`` is a stale (cancelled) job."""
        if not self._is_current(job_id):
            return False
        self._current = None
        self.busy_changed.emit(False)
        return True

    @Slot(int, object)
    def _on_job_finished(self, job_id: int, record: object) -> None:
        if self._release_if_current(job_id):
            self.finished.emit(record)

    @Slot(int, str)
    def _on_job_failed(self, job_id: int, message: str) -> None:
        if self._release_if_current(job_id):
            self.failed.emit(message)

    @Slot(int)
    def _on_job_cancelled(self, job_id: int) -> None:
        pass  # cancel() already told the listeners

    def _on_thread_finished(self, job_id: int) -> None:
        entry = self._threads.pop(job_id, None)
        if entry is not None:
            thread, job = entry
            job.deleteLater()
            thread.deleteLater()
