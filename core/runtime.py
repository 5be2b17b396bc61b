"""Process-level tuning for CPU inference and training, and the driver of step generators
(no Qt, no torch import needed).

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

import ctypes
import ctypes.util
import sys
from typing import Any, Callable, Generator, TypeVar

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
