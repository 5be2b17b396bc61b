"""Runs one engine job at a time on a worker thread and relays its step records.

A job is a callable ``factory(cancelled) -> generator``; ``cancelled`` is a zero-argument
callable the engine polls between chunks of network passes. The job runs inside a
:func:`core.runtime.cancellation_scope` of the same callable, so the diffusion classifier
also polls it between the network calls of one pass (a pass of hundreds of noise levels
takes seconds on a CPU); the :class:`core.runtime.OperationCancelled` that ends such a pass
ends the job quietly. The generator yields step
records and *returns* its result (``return value`` of the generator, None when the job
gave up); a factory that is a plain function (no records) just returns its result. The
runner relays the records in batches at most about 30 times a second (so
the GUI redraws at most at that rate; no record is dropped; a job yields :data:`.jobs.FLUSH` to
have them relayed at once before a long stretch without records) and the return value once.

Worker threads outlive the runner that started them until their job ends: a cancelled
job that is still inside a long network pass is never destroyed while running (Qt aborts
the process when that happens). :func:`wait_for_workers` joins them before exit.
"""
from __future__ import annotations

import gc
import threading
import time
import traceback
from collections import abc
from typing import Any, Callable, Generator

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from ..core.runtime import OperationCancelled, cancellation_scope
from .jobs import Flush

JobFactory = Callable[[Callable[[], bool]], Generator[Any, None, Any] | Any]
UPDATE_INTERVAL_S = 1.0 / 30.0

_LIVE: set["_JobThread"] = set()  # every started worker thread until it has finished
_LIVE_LOCK = threading.Lock()


def live_workers() -> int:
    """How many worker threads (of any runner) are still running.

    Also forgets threads that have finished: a runner deleted before its thread's queued
    ``finished`` arrived never discards its thread, and the set would keep it for ever.
    """
    with _LIVE_LOCK:
        ended = [t for t in _LIVE if t.isFinished()]
        _LIVE.difference_update(ended)
        running = sum(1 for t in _LIVE if t.isRunning())
    del ended  # the last references to threads of deleted runners, dropped outside the lock
    return running


def wait_for_workers(timeout_ms: int | None = 60000) -> bool:
    """Cancel and join every worker thread; True if all ended within ``timeout_ms`` (None:
    however long they take)."""
    deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
    with _LIVE_LOCK:
        threads = list(_LIVE)
    for thread in threads:
        thread.cancel()
    ok = True
    for thread in threads:
        if deadline is None:
            ok = thread.wait() and ok
        else:
            ok = thread.wait(max(0, int((deadline - time.monotonic()) * 1000))) and ok
    _restore_collection_if_idle()
    return ok


class _GuiThreadCollection:
    """Python's cyclic garbage collection kept on the GUI thread while worker threads run.

    A collection runs in whichever thread allocates when a threshold is crossed. Started by
    a worker thread, it can free Qt objects that only cycles held (a closed window's
    widgets) off the GUI thread, and PySide then deadlocks: the worker waits for the GIL
    inside a QObject destructor while the GUI thread, holding the GIL, waits for Qt's lock
    (seen once as a hung test run). So while any worker runs, automatic collection is off
    and a timer on the GUI thread collects, generation by generation as the automatic
    collection would (pyqtgraph's ``GarbageCollector`` does the same for a whole program);
    once none runs, automatic collection is on again: when the last runner's finished slot says
    so, or at the timer's next tick (a runner deleted before its thread's queued ``finished``
    arrived never says so).
    """

    INTERVAL_MS = 250

    def __init__(self) -> None:
        self._timer: QTimer | None = None
        self._was_enabled = True

    def workers_started(self) -> None:
        """A worker is about to start (call on the GUI thread)."""
        if self._timer is None:
            self._timer = QTimer()
            self._timer.timeout.connect(self._tick)
        if not self._timer.isActive():
            self._was_enabled = gc.isenabled()
            gc.disable()
            self._timer.start(self.INTERVAL_MS)

    def workers_done(self) -> None:
        """No worker runs any more (call on the GUI thread)."""
        if self._timer is not None and self._timer.isActive():
            self._timer.stop()
            if self._was_enabled:
                gc.enable()
            self.collect()

    def _tick(self) -> None:
        if live_workers():
            self.collect()
        else:
            self.workers_done()

    @staticmethod
    def collect() -> None:
        """One collection of the generations the automatic collector would collect now."""
        count, threshold = gc.get_count(), gc.get_threshold()
        if count[0] > threshold[0]:
            gc.collect(2 if count[1] > threshold[1] and count[2] > threshold[2] else 1 if count[1] > threshold[1]
                       else 0)


_COLLECTION = _GuiThreadCollection()


def _restore_collection_if_idle() -> None:
    """Automatic garbage collection on again when no worker thread runs (GUI thread)."""
    if not live_workers():
        _COLLECTION.workers_done()


class _JobThread(QThread):
    """Drives one job's generator; its signals are queued to the GUI thread."""

    step_ready = Signal(int, object)
    finished_with = Signal(int, object)
    failed = Signal(int, str)

    def __init__(self, job_id: int, factory: JobFactory) -> None:
        super().__init__()
        self.job_id = job_id
        self._factory = factory
        self._cancel = threading.Event()
        self.setObjectName(f"rdc-job-{job_id}")

    def cancel(self) -> None:
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def run(self) -> None:  # the worker thread
        pending: list = []
        last_emit = 0.0
        try:
            # the engine also polls inside long network passes (between network calls)
            with cancellation_scope(self.is_cancelled):
                gen = self._factory(self.is_cancelled)
                result = gen
                while isinstance(gen, abc.Generator):  # a plain function's value is the result
                    try:
                        record = next(gen)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    flush = isinstance(record, Flush)
                    if not flush:
                        pending.append(record)
                    now = time.monotonic()
                    if pending and (flush or now - last_emit >= UPDATE_INTERVAL_S):
                        self.step_ready.emit(self.job_id, pending)
                        last_emit, pending = now, []
                    if self.is_cancelled():
                        gen.close()
                        return
            if self.is_cancelled():
                return
            if pending:
                self.step_ready.emit(self.job_id, pending)
            self.finished_with.emit(self.job_id, result)
        except OperationCancelled:
            return  # stopped inside a network pass
        except Exception as exc:  # the GUI shows it; the thread must not die silently
            if not self.is_cancelled():
                traceback.print_exc()
                self.failed.emit(self.job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self._factory = None  # drop the engine objects (model, tensors) with the job


class JobRunner(QObject):
    """One job at a time on a worker thread; starting a job cancels the running one.

    Signals carry only the current job's events: ``steps_ready(records)`` (the records of
    one throttled flush, oldest first, so a view can redraw once per flush),
    ``finished(result)`` (the generator's return value), ``failed(message)``,
    ``cancelled()`` (at once, when :meth:`cancel` stops the current job). ``drained()``
    is emitted when the last worker thread of this runner has ended (a cancelled job
    may run on for a while inside a network pass).
    """

    steps_ready = Signal(list)
    finished = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    drained = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._next_id = 0
        self._current: _JobThread | None = None
        self._threads: dict[int, _JobThread] = {}
        self.gui_thread = threading.get_ident()

    @property
    def busy(self) -> bool:
        """A job is current (not cancelled, not finished)."""
        return self._current is not None

    def start(self, factory: JobFactory) -> int:
        """Cancel any running job and start ``factory`` on a new worker thread."""
        self.cancel()
        self._next_id += 1
        thread = _JobThread(self._next_id, factory)
        thread.step_ready.connect(self._on_thread_step_ready)
        thread.finished_with.connect(self._on_thread_finished_with)
        thread.failed.connect(self._on_thread_failed)
        thread.finished.connect(self._on_thread_finished)  # queued: the slot runs on the GUI thread
        self._threads[thread.job_id] = thread
        _COLLECTION.workers_started()
        with _LIVE_LOCK:
            _LIVE.add(thread)
        self._current = thread
        thread.start()
        return thread.job_id

    def cancel(self) -> bool:
        """Ask the running job to stop at its next check; True if one was running."""
        if self._current is None:
            return False
        self._current.cancel()
        self._current = None
        self.cancelled.emit()
        return True

    def shutdown(self, timeout_ms: int = 30000) -> bool:
        """Cancel every job and block until the worker threads end; True if all stopped.

        Blocks the calling thread: the window uses :meth:`cancel` and :attr:`drained`
        instead; this is for scripts and tests.
        """
        self.cancel()
        ok = True
        for thread in list(self._threads.values()):
            thread.cancel()
            ok = thread.wait(timeout_ms) and ok
        _restore_collection_if_idle()
        return ok

    def running_threads(self) -> int:
        return sum(1 for thread in self._threads.values() if thread.isRunning())

    def _is_current(self, job_id: int) -> bool:
        return self._current is not None and self._current.job_id == job_id

    @Slot(int, object)
    def _on_thread_step_ready(self, job_id: int, records: list) -> None:
        if self._is_current(job_id) and records:
            self.steps_ready.emit(records)

    def _release_if_current(self, job_id: int) -> bool:
        """Mark the current job done; False if ``job_id`` is a stale (cancelled) job."""
        if not self._is_current(job_id):
            return False
        self._current = None
        return True

    @Slot(int, object)
    def _on_thread_finished_with(self, job_id: int, result: object) -> None:
        if self._release_if_current(job_id):
            self.finished.emit(result)

    @Slot(int, str)
    def _on_thread_failed(self, job_id: int, message: str) -> None:
        if self._release_if_current(job_id):
            self.failed.emit(message)

    @Slot()
    def _on_thread_finished(self) -> None:
        thread = self.sender()
        if not isinstance(thread, _JobThread) or self._threads.pop(thread.job_id, None) is None:
            return
        with _LIVE_LOCK:
            _LIVE.discard(thread)
        _restore_collection_if_idle()
        thread.deleteLater()
        if not any(t.isRunning() for t in self._threads.values()):
            self.drained.emit()
