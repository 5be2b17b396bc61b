"""GUI responsiveness while the engine runs: the longest gap between event-loop ticks.

A 5 ms QTimer ticks on the GUI thread while the window classifies a digit (``--repeats``
times) and then runs an attack on it with the real engine; the script prints the longest
and the 99th percentile gap between ticks for each job (the goal: under 100 ms). The
window is shown and painted once before measuring, as it is before a user drops a file.

    QT_QPA_PLATFORM=offscreen python benchmarks/bench_gui_latency.py [--model NAME] [--attack-steps 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=None, help="classifier noise levels (default: the model card's)")
    p.add_argument("--attack-steps", type=int, default=5)
    p.add_argument("--purify-steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="classifications measured")
    args = p.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import torch
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from rdc_studio.app.main_window import MainWindow
    from rdc_studio.core.evaluate import hardware_description
    from rdc_studio.core.models import load_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    app = QApplication.instance() or QApplication([])
    model = load_checkpoint(args.model)
    window = MainWindow(model, steps=args.steps)
    window.show_error = lambda title, text: print(f"error: {title}: {text}", file=sys.stderr)
    window.show()
    settle = QEventLoop()
    QTimer.singleShot(300, settle.quit)
    settle.exec()
    digit = np.zeros((1, 28, 28), np.float32)
    digit[0, 5:23, 12:16] = 1.0

    def measure(start_job, finished_signal) -> tuple[float, float, float]:
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(5)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        loop = QEventLoop()
        finished_signal.connect(loop.quit)
        timer.start()
        t0 = time.perf_counter()
        start_job()
        loop.exec()
        elapsed = time.perf_counter() - t0
        timer.stop()
        finished_signal.disconnect(loop.quit)
        gaps = np.diff(ticks) * 1000
        return float(gaps.max()), float(np.percentile(gaps, 99)), elapsed

    runs = [measure(lambda: window.set_image(digit, "bar digit"), window.classification_finished)
            for _ in range(args.repeats)]
    cls = (max(r[0] for r in runs), max(r[1] for r in runs), float(np.mean([r[2] for r in runs])))
    window.attack_panel.steps.setValue(args.attack_steps)
    window.purify_panel.steps.setValue(args.purify_steps)
    atk = measure(window.run_attack, window.attack_finished)
    print(f"model {model.name}; {hardware_description()}")
    print(f"classification : longest event-loop gap {cls[0]:6.1f} ms, p99 {cls[1]:5.1f} ms "
          f"({args.repeats} runs of {cls[2]:.2f} s on average)")
    print(f"attack ({args.attack_steps} it.) : longest event-loop gap {atk[0]:6.1f} ms, p99 {atk[1]:5.1f} ms "
          f"over {atk[2]:.2f} s")
    window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
