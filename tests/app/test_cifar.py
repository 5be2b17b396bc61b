"""A colour (CIFAR-10-style) model in the window: an RGB image classified with class names,
the colour perturbation views, the presets, purification with the pair's purifier, and the
dataset browser on the CIFAR-10 test split. The model is a pair of EDM fixtures (16x16 RGB,
conditional classifier + unconditional purifier), imported as the paper's two checkpoints
are; the test also writes docs/screenshots/cifar10-attack-1280x800.png."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pytestqt")
from PySide6.QtWidgets import QApplication  # noqa: E402

from rdc_studio.app.main_window import MainWindow  # noqa: E402
from rdc_studio.app.widgets.image_view import PERTURBATION_MODES, perturbation_map  # noqa: E402
from rdc_studio.core.classifier import build_classifier  # noqa: E402
from rdc_studio.core.data import CIFAR10_CLASSES, data_root_candidates, default_data_root  # noqa: E402
from rdc_studio.core.defense import build_maximizer  # noqa: E402
from rdc_studio.core.edm_import import import_edm  # noqa: E402

from test_main_window import isolate_settings, open_window  # noqa: E402 (tests/app is on sys.path)

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "edm"
if not FIXTURES.exists():
    FIXTURES = Path("/work/shared/fixtures/edm")
pytestmark = pytest.mark.skipif(not (FIXTURES / "vp-ddpmpp-cond.pkl").exists(), reason="EDM fixtures not present")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def cifar_archive() -> bool:
    return any((root / "cifar10-jpeg.tar.gz").exists() for root in data_root_candidates())


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    """The fixture pair, with the card of a CIFAR-10 model (dataset and class names)."""
    path = import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", tmp_path / "models" / "cifar-fixture",
                      purifier=FIXTURES / "vp-ddpmpp-uncond.pkl")
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.update(dataset="cifar10", classes=list(CIFAR10_CLASSES), name="cifar-fixture")
    card_path.write_text(json.dumps(card))
    return path


@pytest.fixture
def window(qtbot, pair, monkeypatch, tmp_path):
    isolate_settings(monkeypatch, tmp_path)
    win = open_window(qtbot, pair, steps=2)
    yield win
    win.runner.shutdown()


@pytest.fixture
def colour_png(tmp_path: Path) -> Path:
    """A 40x30 RGB picture: a red square on a blue-green gradient."""
    y, x = np.mgrid[0:30, 0:40]
    rgb = np.stack([x * 6, y * 8, 255 - x * 6], axis=-1).astype(np.uint8)
    rgb[8:20, 12:26] = (230, 30, 30)
    path = tmp_path / "colour.png"
    Image.fromarray(rgb, "RGB").save(path)
    return path


def test_rgb_image_is_shown_in_colour_and_classified_with_class_names(qtbot, window, colour_png):
    assert window.model.purifier is not None and "purifier" in window.device_label.text()
    with qtbot.waitSignal(window.classification_finished, timeout=60000) as blocker:
        assert window.open_path(str(colour_png))
    assert window.image.shape == (3, 16, 16) and "RGB" in window.input_view.caption.text()
    shown = window.input_view.item.image
    assert shown.shape == (16, 16, 3) and not np.allclose(shown[..., 0], shown[..., 2])  # colour, not gray
    probs = np.asarray(blocker.args[0])
    clf = build_classifier(window.model, steps=2)
    with torch.no_grad():
        expected = torch.softmax(clf(torch.from_numpy(window.image).unsqueeze(0)), 1)[0].numpy()
    assert np.allclose(probs, expected, atol=1e-5)
    assert window.state.classes == CIFAR10_CLASSES
    top = CIFAR10_CLASSES[int(np.argmax(probs))]
    assert top in window.message_label.toolTip() and not window.errors
    # no bundled samples for a CIFAR-10 model: the empty gallery says how to fill it
    assert window.gallery.count() == 0
    assert "none bundled for this cifar10 model" in window.samples_label.text()
    assert "Generate sample" in window.samples_label.text() and "Browse dataset" in window.samples_label.text()


def test_colour_perturbation_views(qtbot, window):
    view = window.view_perturbation
    rng = np.random.default_rng(0)
    delta = (rng.random((3, 16, 16)) - 0.5) * 16 / 255
    view.set_perturbation(delta)
    assert not view.mode_row.isHidden() and view.mode.currentText() == "magnitude"
    assert np.allclose(view.item.image, np.sqrt(((delta * 255) ** 2).sum(0)))
    assert view.colour_bar.levels()[0] == 0.0  # magnitudes are >= 0
    view.mode.setCurrentText("green")
    assert np.allclose(view.item.image, delta[1] * 255)
    low, high = view.colour_bar.levels()
    assert low == -high  # signed, symmetric
    view.mode.setCurrentText("channel mean")
    assert np.allclose(view.item.image, delta.mean(0) * 255)
    view.set_perturbation(delta[:1])  # a grayscale perturbation: signed, no choice offered
    assert view.mode_row.isHidden() and np.allclose(view.item.image, delta[0] * 255)
    for mode in PERTURBATION_MODES:
        assert perturbation_map(delta, mode).shape == (16, 16)
    with pytest.raises(ValueError, match="unknown perturbation view"):
        perturbation_map(delta, "alpha")


def test_preset_choice_sets_levels_purification_and_is_recorded(qtbot, window):
    window.preset_combo.setCurrentIndex(window.preset_combo.findData("fast"))
    assert window.preset == "fast" and window.steps_spin.value() == 16
    lm = window.purify_panel.settings()
    assert (lm.preset, lm.optimizer, lm.momentum, lm.steps) == ("fast", "sign", 1.0, 5)
    assert lm.eta == pytest.approx(8 / 255)
    window.steps_spin.setValue(3)
    settings = window._classifier().settings
    assert (settings.preset, settings.steps, settings.sigma_max) == ("fast", 3, 80.0)
    window.apply_preset("paper-code")
    assert window.preset_combo.currentData() == "paper-code" and window.steps_spin.value() == 125
    assert window.purify_panel.settings().optimizer == "adam"
    window.apply_preset(None)
    assert window.preset is None and window._classifier().settings.preset == ""
    window.apply_preset("fast")
    window.close()  # the choice persists
    again = MainWindow(window.model)
    qtbot.addWidget(again)
    assert again.preset == "fast" and again.steps_spin.value() == 16
    again.runner.shutdown()


def test_purification_uses_the_pairs_purifier(qtbot, window, colour_png):
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.open_path(str(colour_png))
    window.purify_panel.steps.setValue(2)
    with qtbot.waitSignal(window.purification_finished, timeout=60000):
        window.run_purification()
    final = window.purify_records[-1].image[0]
    settings = window.purify_panel.settings()
    expected = build_maximizer(window.model, settings)(torch.from_numpy(window.image).unsqueeze(0))[0].numpy()
    assert np.allclose(final, expected, atol=1e-6)
    assert build_maximizer(window.model, settings).net is window.model.purifier.net


def test_dataset_browser_on_the_cifar10_test_split(qtbot, window):
    if not cifar_archive():
        pytest.skip("needs ../shared/data/cifar10-jpeg.tar.gz")
    from rdc_studio.app.widgets.dataset_browser import DatasetBrowser

    browser = DatasetBrowser("cifar10", 16, 3)
    qtbot.addWidget(browser)
    assert browser.source.itemText(0) == "cifar10 test"
    chosen = []
    browser.image_chosen.connect(lambda img, caption, class_name: chosen.append((img, caption, class_name)))
    with qtbot.waitSignal(browser.loaded, timeout=120000) as blocker:
        browser.load(0, str(default_data_root()))
    assert blocker.args[0] == 10000 and browser.gallery.count() == 48
    assert browser.gallery.item(0).text().split(": ")[1] in CIFAR10_CLASSES
    browser.gallery.itemClicked.emit(browser.gallery.item(0))
    assert chosen[0][0].shape == (3, 16, 16)  # converted to the model's input
    assert chosen[0][2] == browser.gallery.item(0).text().split(": ")[1]  # its label, for attacks
    folder_only = DatasetBrowser(None, 16, 3)  # a model without a known dataset: folders only
    qtbot.addWidget(folder_only)
    assert folder_only.source.count() == 1 and folder_only.source_indices == [2]


def test_attack_on_a_cifar10_image_and_screenshot(qtbot, window, tmp_path):
    """Attack tab on a CIFAR-10 test image (a cat when the archive is present), with the
    perturbation's magnitude map; saved to docs/screenshots/cifar10-attack-1280x800.png."""
    image, source = np.random.default_rng(3).random((3, 16, 16)).astype(np.float32), "random RGB"
    if cifar_archive():
        from rdc_studio.core.data import load_dataset
        from rdc_studio.core.images import convert_image, image_from_array

        ds = load_dataset("cifar10", "test")
        index = int((ds.labels == CIFAR10_CLASSES.index("cat")).nonzero()[0])
        image = convert_image(image_from_array(ds.float_images(slice(index, index + 1))[0]), 16, 3, invert=False)
        source = f"CIFAR-10 test #{index} (cat)"
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.set_image(image, source)
    window.attack_panel.eps.setValue(8.0)  # /255
    window.attack_panel.steps.setValue(3)
    with qtbot.waitSignal(window.attack_finished, timeout=120000):
        window.run_attack()
    assert window.last_outcome.adversarial.shape == (1, 3, 16, 16)
    linf = float(np.abs(window.last_outcome.adversarial[0] - window.last_outcome.clean[0]).max())
    assert linf <= 8 / 255 + 1e-6 and not window.errors
    assert not window.view_perturbation.mode_row.isHidden()
    window.resize(1280, 800)
    window.tabs.setCurrentWidget(window.attack_tab)
    for _ in range(3):
        QApplication.processEvents()
    qtbot.wait(100)
    try:
        DOCS.mkdir(parents=True, exist_ok=True)
        folder = DOCS
    except OSError:
        folder = tmp_path
    assert window.grab().save(str(folder / "cifar10-attack-1280x800.png"), "PNG")
