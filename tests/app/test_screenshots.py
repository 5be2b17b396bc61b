"""Screenshots of every tab at 1024x700, 1280x800 and 1920x1080 (bundled default model),
saved into docs/screenshots/, with checks that the plots and images have room to be read."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")
from PySide6.QtWidgets import QApplication  # noqa: E402

from rdc_studio.app.main_window import MainWindow  # noqa: E402
from rdc_studio.core.models import load_checkpoint  # noqa: E402

from test_main_window import isolate_settings  # noqa: E402 (tests/app is on sys.path)

SIZES = [(1024, 700), (1280, 800), (1920, 1080)]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def digit() -> tuple[np.ndarray, str, int | None]:
    """The first MNIST test digit with its caption and label (a drawn bar without MNIST)."""
    from rdc_studio.core.data import load_dataset, mnist_available

    if mnist_available():
        test = load_dataset("mnist", "test")
        return test.float_images(slice(0, 1))[0].numpy(), "MNIST test #0", int(test.labels[0])
    image = np.zeros((1, 28, 28), np.float32)
    image[0, 5:23, 12:16] = 1
    return image, "a drawn bar", None


def out_dir(tmp_path: Path) -> Path:
    """docs/screenshots in a source checkout, else a temporary folder."""
    try:
        DOCS.mkdir(parents=True, exist_ok=True)
        return DOCS
    except OSError:
        return tmp_path


def check_readable(window: MainWindow, tab: str) -> None:
    """Every visible plot is tall enough to read and shows its whole legend; images get room."""
    plots = {"classify": [window.bars.plot, window.curves],
             "attack": [window.attack_plot],
             "purify": [window.purify_curves, window.objective_plot]}[tab]
    for plot in plots:
        assert plot.height() >= 130 and plot.width() >= 230, (tab, plot.size())
        drawn = plot.getPlotItem().geometry()  # wider than the widget: the scene cuts off its right
        assert drawn.width() <= plot.width() and drawn.height() <= plot.height(), (tab, plot.size(), drawn)
        legend = getattr(plot, "legend", None)
        if legend is not None and legend.items:
            assert legend.boundingRect().height() <= plot.height(), f"{tab}: legend taller than its plot"
    views = {"classify": [window.input_view],
             "attack": [window.view_original, window.view_perturbation, window.view_adversarial],
             "purify": [window.purify_view]}[tab]
    for view in views:
        side = min(view.graphics.width(), view.graphics.height())
        assert side >= 96, (tab, view.graphics.size())


def test_screenshots_of_every_tab_at_three_sizes(qtbot, tmp_path, monkeypatch):
    isolate_settings(monkeypatch, tmp_path)
    model = load_checkpoint()
    win = MainWindow(model)
    win.show_error = lambda title, text: pytest.fail(f"{title}: {text}")
    qtbot.addWidget(win)
    win.show()
    try:
        with qtbot.waitSignal(win.classification_finished, timeout=120000):
            image, caption, label = digit()
            win.set_image(image, caption, known_class=label)  # as the dataset browser opens it
        win.attack_panel.steps.setValue(5)
        with qtbot.waitSignal(win.attack_finished, timeout=300000):
            win.run_attack()
        with qtbot.waitSignal(win.purification_finished, timeout=300000):
            win.attack_tab.purify_button.click()  # purify the adversarial image
        win.scrubber.setValue(2)
        folder = out_dir(tmp_path)
        for width, height in SIZES:
            win.resize(width, height)
            for index, tab in enumerate(["classify", "attack", "purify"]):
                win.tabs.setCurrentIndex(index)
                for _ in range(3):
                    QApplication.processEvents()
                qtbot.wait(100)
                assert win.width() == width and win.height() == height
                check_readable(win, tab)
                path = folder / f"{tab}-{width}x{height}.png"
                assert win.grab().save(str(path), "PNG")
    finally:
        win.runner.shutdown()
