"""Stop and close in the middle of a deliberately slow step, for classify, attack and purify.

Every network pass is slowed by a forward hook (20 ms of sleep), and the settings are
those of the reported hang (T = 256 noise levels; attack: EOT 50 draws), so one attack
iteration would take minutes. The engine checks cancellation between noise-level chunks
(classify), EOT draws (attack) and steps (purify); these tests use a generous bound
(5 s) so a busy machine cannot fail them; the product target (0.5 s) is measured by
``benchmarks/bench_gui_latency.py``.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("pytestqt")
from rdc_studio.app.main_window import MainWindow  # noqa: E402
from rdc_studio.core.models import load_checkpoint  # noqa: E402

from test_main_window import isolate_settings  # noqa: E402 (tests/app is on sys.path)

KINDS = ["classify", "attack", "purify"]
STOP_BOUND_S = 5.0


def slow_down(window, seconds: float = 0.02) -> list:
    """Sleep in every network pass; returns the list the hook counts passes in."""
    calls = []

    def hook(*_):
        calls.append(time.perf_counter())
        time.sleep(seconds)

    window.model.net.noise_embedding.register_forward_hook(hook)  # once per network pass
    return calls


def start_slow_job(window, kind: str) -> None:
    window.steps_spin.setValue(256)
    window.attack_panel.eot.setValue(50)
    window.attack_panel.steps.setValue(5)
    if kind == "purify":  # (in an attack, the defense's purification is one uncancellable forward pass)
        window.purify_panel.steps.setValue(200)
    image = np.zeros((1, 28, 28), np.float32)
    image[0, 5:23, 12:16] = 1
    window.state.set_image(image, "bar digit")
    {"classify": window.classify, "attack": window.run_attack, "purify": window.run_purification}[kind]()


@pytest.fixture
def slow_window(qtbot, tiny_checkpoint, monkeypatch, tmp_path):
    isolate_settings(monkeypatch, tmp_path)
    win = MainWindow(load_checkpoint(tiny_checkpoint), steps=4)
    win.show_error = lambda title, text: pytest.fail(f"{title}: {text}")
    qtbot.addWidget(win)
    win.show()
    win.calls = slow_down(win)
    yield win
    win.runner.shutdown()


@pytest.mark.parametrize("kind", KINDS)
def test_stop_in_a_slow_step_shows_at_once_and_ends_the_worker(qtbot, slow_window, kind):
    win = slow_window
    start_slow_job(win, kind)
    qtbot.waitUntil(lambda: len(win.calls) >= 3, timeout=30000)  # inside the job's network passes
    win.stop()
    t0 = time.perf_counter()
    # the views say so at once, before the worker has ended
    assert not win.runner.busy and not win.stop_button.isEnabled()
    assert win.progress.format().startswith("stopped at")
    assert "Stopped" in win.message_label.text()
    if kind == "attack":
        assert win.attack_verdict.text().startswith("Stopped") and win.attack_panel.run_button.isEnabled()
    if kind == "classify" and win.curves.steps:
        assert win.bars.verdict.text().startswith("Stopped")
    qtbot.waitUntil(lambda: win.runner.running_threads() == 0, timeout=int(STOP_BOUND_S * 1000))
    assert time.perf_counter() - t0 < STOP_BOUND_S
    passes = len(win.calls)
    qtbot.wait(300)
    assert len(win.calls) == passes, "the network kept running after the worker ended"


@pytest.mark.parametrize("kind", KINDS)
def test_close_in_a_slow_step_never_blocks_the_gui(qtbot, slow_window, kind):
    win = slow_window
    start_slow_job(win, kind)
    qtbot.waitUntil(lambda: len(win.calls) >= 3, timeout=30000)
    t0 = time.perf_counter()
    win.close()
    returned = time.perf_counter() - t0
    assert returned < STOP_BOUND_S  # close() only cancels: it never waits for the worker
    qtbot.waitUntil(lambda: not win.isVisible(), timeout=int(STOP_BOUND_S * 1000))
    assert win.runner.running_threads() == 0


DRIVER = textwrap.dedent('''
    import json, os, signal, sys, time
    import numpy as np
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication
    from rdc_studio.app.interrupt import InterruptHandler
    from rdc_studio.app.main_window import MainWindow
    from rdc_studio.app.worker import wait_for_workers
    from rdc_studio.core.models import load_checkpoint
    sys.path.insert(0, os.path.dirname(sys.argv[4]))
    from test_stop_and_close import slow_down, start_slow_job

    checkpoint, kind, how = sys.argv[1:4]
    app = QApplication([])
    win = MainWindow(load_checkpoint(checkpoint), steps=4)
    win.show_error = lambda title, text: print(f"error: {title}: {text}", file=sys.stderr)
    win.show()
    calls = slow_down(win)
    ticks, times = [], {}
    tick = QTimer()
    tick.setInterval(10)
    tick.timeout.connect(lambda: ticks.append(time.perf_counter()))
    interrupt = InterruptHandler(win.close)

    def request():
        if len(calls) < 3:  # not yet inside the job's passes
            QTimer.singleShot(50, request)
            return
        times["request"] = time.perf_counter()
        tick.start()
        if how == "close":
            win.close()  # what File > Quit (Ctrl+Q) does
        else:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C in the terminal

    QTimer.singleShot(0, lambda: start_slow_job(win, kind))
    QTimer.singleShot(100, request)
    code = app.exec()
    closed = time.perf_counter()
    interrupt.uninstall()
    wait_for_workers()
    gaps = np.diff(ticks) if len(ticks) > 1 else np.zeros(1)
    print(json.dumps({"close_s": closed - times["request"], "max_gap_s": float(gaps.max())}))
    sys.exit(code)
''')


@pytest.mark.parametrize("how", ["close", "sigint"])
@pytest.mark.parametrize("kind", KINDS)
def test_quit_during_a_slow_step_exits_0_without_traceback(tmp_path, tiny_checkpoint, kind, how):
    """The reported crash: quitting mid-step froze the window, then aborted with code 134."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"),
               QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(driver), str(tiny_checkpoint), kind, how, __file__],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "QThread" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["close_s"] < STOP_BOUND_S
    assert report["max_gap_s"] < STOP_BOUND_S  # the GUI kept ticking while the worker stopped
    assert signal.SIGINT  # (Ctrl+C is delivered as SIGINT)
