"""Process-level tuning for CPU inference and training, the driver of step generators, and
cancellation inside a network pass (no Qt, no torch import needed).

glibc's malloc returns large freed blocks to the kernel at once (they are ``mmap``-ed
above a threshold, and the heap top is trimmed). PyTorch on the CPU frees and
re-allocates the same large activation buffers at every forward pass, so each pass pays
for fresh zeroed pages: on a 2-core machine the diffusion classifier spent about as much
time in the kernel as in its own arithmetic. Keeping freed memory in the process
halves the time per image there (measured with ``benchmarks/bench_classify.py``).

Threads get the same treatment: glibc gives a new thread its own arena, which does not
keep memory the way the main arena is told to, and the GUI runs the engine on a worker
thread; so all threads share the one arena. The engine has one compute thread, so the
arena's lock is not contended.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import sys
from typing import Any, Callable, Generator, Iterator, TypeVar

S = TypeVar("S")
R = TypeVar("R")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB still get their own mapping
_TRIM_THRESHOLD = 1 << 40

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc on Linux only); idempotent.

    Returns
    -------
    bool
        True when the allocator was tuned, False where it does not apply (other C
        libraries or operating systems) or refused the settings.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    ok_trim = mallopt(_M_TRIM_THRESHOLD, min(_TRIM_THRESHOLD, 2**31 - 1))
    ok_arena = mallopt(_M_ARENA_MAX, 1)
    _tuned = bool(ok_mmap and ok_trim and ok_arena)
    return _tuned


def run_to_end(steps: Generator[S, Any, R], on_step: Callable[[S], None] | None = None) -> R:
    """Run a step generator (attack, ensemble, training, ...) to its return value.

    The engine's long operations are generators: they yield a record per step (for live
    plots and progress bars) and return their result. ``on_step`` sees every record.
    A cancelled operation returns None.
    """
    while True:
        try:
            record = next(steps)
        except StopIteration as stop:
            return stop.value
        if on_step is not None:
            on_step(record)


class OperationCancelled(Exception):
    """Raised inside a long operation when the cancellation callback of the active
    :func:`cancellation_scope` returns True; the operation's driver turns it into a stop."""


_CANCELLATION: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "rdc_cancellation", default=None)


@contextlib.contextmanager
def cancellation_scope(cancelled: Callable[[], bool] | None) -> Iterator[None]:
    """Let the code run inside poll ``cancelled`` (:func:`raise_if_cancelled`).

    Step generators poll their ``cancelled`` callback between network passes; a single
    pass of a large batch (hundreds of noise levels, a big EOT draw) can take seconds on a
    CPU, so the diffusion classifier also polls between its network calls, forward and
    backward, through this scope. ``None`` leaves an enclosing scope in force. The scope is
    per thread (a context variable): enter it around synchronous work only, never across
    a ``yield``.
    """
    if cancelled is None:
        yield
        return
    token = _CANCELLATION.set(cancelled)
    try:
        yield
    finally:
        _CANCELLATION.reset(token)


def active_cancellation() -> Callable[[], bool] | None:
    """The callback of the innermost :func:`cancellation_scope` of this thread, or None."""
    return _CANCELLATION.get()


def raise_if_cancelled(cancelled: Callable[[], bool] | None = None) -> None:
    """Raise :class:`OperationCancelled` when ``cancelled`` (default: the active scope's
    callback) returns True; a no-op outside any scope."""
    cancelled = cancelled if cancelled is not None else _CANCELLATION.get()
    if cancelled is not None and cancelled():
        raise OperationCancelled


def time_left_text(elapsed: float, done: int, total: int) -> str:
    """A job's estimated time left, e.g. ``"~40 s left"``, at the rate of the ``done`` of
    ``total`` units so far (``elapsed`` seconds); ``""`` until the estimate means something
    (2 s and one unit in) and once the job is done."""
    if elapsed < 2 or done <= 0 or done >= total:
        return ""
    left = elapsed / done * (total - done)
    return f"~{max(1, round(left))} s left" if left < 90 else f"~{round(left / 60)} min left"
