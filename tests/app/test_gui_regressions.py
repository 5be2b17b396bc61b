"""Regression tests of GUI defects: model switches (input size, stale verdicts, the dataset
browser), sessions (stale attacks, portable bundled models, refused sessions), stopping the
OOD score, quitting while the browser loads, unconditional models, Square's plot note, CSV
ids, export guards, pasted image size and the toolbar's T.

No test bounds wall-clock time: slow stand-ins loop until cancelled (with a hang detector)."""
import csv
import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pytestqt")
from PySide6.QtGui import QColor, QImage  # noqa: E402

from rdc_studio.app.main_window import MainWindow, saved_attack_note  # noqa: E402
from rdc_studio.core.models import load_checkpoint, save_checkpoint  # noqa: E402
from rdc_studio.core.nets import NetConfig, build_denoiser  # noqa: E402
from rdc_studio.core.runtime import OperationCancelled, cancellation_scope, raise_if_cancelled  # noqa: E402

from test_main_window import isolate_settings  # noqa: E402 (tests/app is on sys.path)

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HANG_S = 60  # only a hang detector: the stand-ins below end when cancelled


def make_checkpoint(path: Path, channels: int = 1, image_size: int = 28, classes: list[str] | None = None,
                    dataset: str = "mnist", **card) -> Path:
    """A tiny denoiser checkpoint of the given input shape."""
    cfg = NetConfig(channels=(8, 16), head_channels=(4,), emb_dim=32, in_channels=channels, image_size=image_size,
                    num_classes=len(classes) if classes is not None else 10)
    torch.manual_seed(0)
    net = build_denoiser(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    card = {"name": path.stem, "dataset": dataset, "classes": [str(i) for i in range(10)] if classes is None
            else classes} | card
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, net.eval(), card)


def digit(offset: int = 0) -> np.ndarray:
    image = np.zeros((1, 28, 28), np.float32)
    image[0, 5:23, 12 + offset:16 + offset] = 1
    return image


@pytest.fixture
def window(qtbot, tiny_checkpoint, monkeypatch, tmp_path):
    isolate_settings(monkeypatch, tmp_path)
    win = MainWindow(load_checkpoint(tiny_checkpoint), steps=4)
    errors, warnings = [], []
    win.show_error = lambda title, text: errors.append((title, text))
    win.show_warning = lambda title, text: warnings.append((title, text))
    win.errors, win.warnings = errors, warnings
    messages = []
    show_status = win.show_status
    win.show_status = lambda text, timeout_ms=5000: (messages.append(text), show_status(text, timeout_ms))
    win.messages = messages
    qtbot.addWidget(win)
    win.show()
    yield win
    win.runner.shutdown()
    if win.dataset_browser is not None:
        win.dataset_browser.runner.shutdown()


def classified(qtbot, window, image: np.ndarray, source: str = "digit", known_class: int | None = None) -> None:
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.set_image(image, source, known_class=known_class)


def cheap(window) -> None:
    window.steps_spin.setValue(2)
    window.purify_panel.steps.setValue(1)
    window.attack_panel.steps.setValue(2)


# -- 1, 2: model switches ------------------------------------------------------------------
def test_a_switch_to_a_model_of_another_size_resizes_the_input_and_classifies_it(qtbot, window, tmp_path):
    classified(qtbot, window, digit(), known_class=1)
    other = make_checkpoint(tmp_path / "m32" / "m32.safetensors", image_size=32)
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        assert window.load_model(str(other))
    assert window.image.shape == (1, 32, 32) and window.state.image_known_class == 1
    assert window.bars.verdict.text().startswith("Predicted") and not window.errors


def test_a_failed_classification_says_so_in_the_classify_tab(qtbot, window):
    window.state.set_image(np.zeros((1, 20, 20), np.float32), "wrong size")  # the model takes 28x28
    with qtbot.waitSignal(window.runner.failed, timeout=60000):
        window.classify()
    assert window.errors and window.errors[-1][0] == "Classify failed"
    assert "failed" in window.bars.verdict.text() and window.bars.verdict.text() != "Classifying…"
    assert not window.stop_button.isEnabled()


def test_a_failed_purification_says_so_in_the_purify_tab(qtbot, window):
    window.purify_panel.steps.setValue(2)
    with qtbot.waitSignal(window.runner.failed, timeout=60000):
        window.run_purification(np.zeros((1, 20, 20), np.float32), "wrong size")
    assert window.errors[-1][0] == "Purify failed"
    title = window.purify_view.title.text()
    assert title.startswith("<b>Failed") and "Purifying" not in title


def test_a_switch_that_closes_the_input_shows_no_verdict_of_the_old_model(qtbot, window, tmp_path):
    classified(qtbot, window, digit(), known_class=1)
    assert window.bars.verdict.text().startswith("Predicted") and window.classify_tab.ood.text()
    rgb = make_checkpoint(tmp_path / "rgb" / "rgb.safetensors", channels=3, image_size=32, classes=CIFAR,
                          dataset="cifar10")
    assert window.load_model(str(rgb))
    assert window.image is None and window.state.probabilities is None
    assert "Predicted" not in window.bars.verdict.text() and window.classify_tab.ood.text() == ""
    assert "digit was closed" in window.messages[-1] and "RGB 32×32" in window.messages[-1]


def test_a_device_change_keeps_the_results_it_shows(qtbot, window):
    classified(qtbot, window, digit())
    window.set_device("meta")  # any machine has it; the weights are the same
    assert window.state.probabilities is not None and window.bars.verdict.text().startswith("Predicted")
    assert window.classify_tab.ood.score is window.state.classification.ood is not None


# -- 3: the dataset browser after a switch -------------------------------------------------------
@pytest.fixture
def digit_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "digits"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.round(digit(k)[0] * 255).astype(np.uint8)).save(folder / f"{k}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def load_folder(qtbot, browser, folder: Path) -> None:
    with qtbot.waitSignal(browser.page_shown, timeout=60000):
        browser.load(2, str(folder))


def test_the_dataset_browser_follows_a_model_switch(qtbot, window, tmp_path, digit_folder):
    window.open_dataset_browser()
    browser = window.dataset_browser
    load_folder(qtbot, browser, digit_folder)
    assert [img.shape for img in browser.gallery.images] == [(1, 28, 28)] * 3
    assert "1 could not be read" in browser.info.text()
    other = make_checkpoint(tmp_path / "m32" / "m32.safetensors", image_size=32)  # MNIST too, 32x32
    with qtbot.waitSignal(browser.page_shown, timeout=60000):
        assert window.load_model(str(other))
    assert window.dataset_browser is browser and [img.shape for img in browser.gallery.images] == [(1, 32, 32)] * 3
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        browser.gallery.itemClicked.emit(browser.gallery.item(0))
    assert window.image.shape == (1, 32, 32) and window.image_source == "0.png"
    stale = browser.gallery.images[0]
    rgb = make_checkpoint(tmp_path / "rgb" / "rgb.safetensors", channels=3, image_size=32, classes=CIFAR,
                          dataset="cifar10")
    assert window.load_model(str(rgb))
    assert window.dataset_browser is None and not browser.isVisible()  # its pages were another dataset's
    window._on_gallery_image_chosen(stale, "0.png", None)  # a click that was on its way
    assert window.image is None and window.errors[-1][0] == "Cannot open image"


def test_a_folder_page_is_decoded_on_the_worker_thread(qtbot, window, digit_folder, monkeypatch):
    import rdc_studio.app.widgets.dataset_browser as browser_module

    threads = []
    real = browser_module.load_for_model

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(browser_module, "load_for_model", recording)
    window.open_dataset_browser()
    load_folder(qtbot, window.dataset_browser, digit_folder)
    assert threads and threading.get_ident() not in threads
    assert window.dataset_browser.gallery.count() == 3


# -- 5, 6: sessions -----------------------------------------------------------------------------------
def test_a_session_says_which_image_its_attack_was_of(qtbot, window, tmp_path):
    cheap(window)
    classified(qtbot, window, digit(), "digit A", known_class=3)
    with qtbot.waitSignal(window.attack_finished, timeout=120000):
        window.run_attack()
    own = tmp_path / "own.json"
    assert window.save_session(str(own))
    classified(qtbot, window, digit(4), "digit B", known_class=7)
    stale = tmp_path / "stale.json"
    assert window.save_session(str(stale))
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        assert window.open_session(str(stale))
    note = window.messages[-1]
    assert "labelled 3" not in note and "re-runs it" not in note and "another image (digit A)" in note
    attack = json.loads(stale.read_text())["results"]["attack"]
    assert attack["of_input"] is False and attack["source"] == "digit A"
    assert json.loads(own.read_text())["results"]["attack"]["of_input"] is True
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        assert window.open_session(str(own))
    assert "The session's attack on labelled 3" in window.messages[-1] and "re-runs it" in window.messages[-1]


def test_an_older_sessions_attack_is_not_claimed_for_its_image():
    attack = {"success": True, "defense_recovered": False, "label": 3, "label_known": True}
    note = saved_attack_note(attack, [str(i) for i in range(10)])
    assert "does not say of which image" in note and "re-runs it" not in note
    assert "re-runs it" in saved_attack_note(attack | {"of_input": True, "source": "x"}, [str(i) for i in range(10)])


def test_a_bundled_models_session_opens_in_another_installation(qtbot, monkeypatch, tmp_path):
    isolate_settings(monkeypatch, tmp_path)
    win = MainWindow(load_checkpoint("mnist-multihead"), steps=2)
    errors, warnings = [], []
    win.show_error = lambda title, text: errors.append((title, text))
    win.show_warning = lambda title, text: warnings.append((title, text))
    qtbot.addWidget(win)
    try:
        with qtbot.waitSignal(win.classification_finished, timeout=60000):
            win.set_image(digit(), "digit", known_class=1)
        path = tmp_path / "s.json"
        assert win.save_session(str(path))
        session = json.loads(path.read_text())
        assert session["model"] == "mnist-multihead" and len(session["model_sha256"]) == 64
        # written before names were recorded, in another installation: the path is not here
        session["model"] = "/elsewhere/site-packages/rdc_studio/resources/models/mnist-multihead.safetensors"
        other = tmp_path / "other.json"
        other.write_text(json.dumps(session))
        with qtbot.waitSignal(win.classification_finished, timeout=60000):
            assert win.open_session(str(other))
        assert not errors and not warnings  # the very weights (the sha256 says so)
        session["model_sha256"] = "0" * 64  # this installation's weights differ from the session's
        other.write_text(json.dumps(session))
        with qtbot.waitSignal(win.classification_finished, timeout=60000):
            assert win.open_session(str(other))
        assert not errors and warnings and "not those the session was saved with" in warnings[-1][1]
    finally:
        win.runner.shutdown()


def test_a_session_whose_image_does_not_fit_its_model_changes_nothing(qtbot, window, tmp_path):
    classified(qtbot, window, digit())
    path = tmp_path / "s.json"
    assert window.save_session(str(path))
    session = json.loads(path.read_text())
    session["model"] = str(make_checkpoint(tmp_path / "m32" / "m32.safetensors", image_size=32))
    path.write_text(json.dumps(session))
    model, steps = window.model, window.steps_spin.value()
    assert not window.open_session(str(path))
    assert window.errors[-1][0] == "Cannot open session" and "does not fit" in window.errors[-1][1]
    assert window.model is model and window.steps_spin.value() == steps


# -- 10: stop during the OOD score ----------------------------------------------------------------------
def test_stopping_the_ood_score_keeps_the_finished_classification(qtbot, window, tmp_path, monkeypatch):
    from rdc_studio.core import ood

    def slow(self, x, levels_per_pass=0):  # a costly network: the score takes until Stop
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            raise_if_cancelled()
            time.sleep(0.01)
        raise AssertionError("the OOD score was never stopped")

    monkeypatch.setattr(ood.OodScorer, "bits_per_dim", slow)
    window.set_image(digit(), "digit", known_class=6)
    qtbot.waitUntil(lambda: window.state.probabilities is not None, timeout=HANG_S * 1000)
    window.stop()
    qtbot.waitUntil(lambda: window.runner.running_threads() == 0, timeout=HANG_S * 1000)
    assert window.bars.verdict.text().startswith("Predicted") and not window.errors
    assert "stopped" in window.classify_tab.ood.text()
    path = tmp_path / "r.csv"
    assert window.export_csv(str(path))
    kinds = {row[1] for row in list(csv.reader(path.open()))[1:]}
    assert "probability" in kinds and "ood_bits_per_dim" not in kinds
    assert len(window.session()["results"]["probabilities"]) == 10


# -- 7: cancellable loads, and closing while the browser loads -------------------------------------------
def test_a_folder_walk_stops_when_cancelled(digit_folder):
    from rdc_studio.app.widgets.dataset_browser import load_source

    assert len(load_source("mnist", 2, str(digit_folder))) == 4
    with cancellation_scope(lambda: True), pytest.raises(OperationCancelled):
        load_source("mnist", 2, str(digit_folder))


def test_an_interrupted_cifar10_extraction_leaves_no_folder(tmp_path, monkeypatch):
    from rdc_studio.core.data import load_dataset

    root, cache = tmp_path / "data", tmp_path / "cache"
    source = tmp_path / "src" / "cifar10-jpeg"
    for split in ("train", "test"):
        for name in CIFAR:
            folder = source / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(folder / "0.png")
    root.mkdir()
    with tarfile.open(root / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="cifar10-jpeg")
    polls = []

    def cancelled() -> bool:  # stop a few members into the archive
        polls.append(1)
        return len(polls) > 5

    with cancellation_scope(cancelled), pytest.raises(OperationCancelled):
        load_dataset("cifar10", "test", root, cache)
    assert list(cache.iterdir()) == []  # neither a temporary folder nor a partial cifar10-jpeg
    assert len(load_dataset("cifar10", "test", root, cache)) == 10  # outside any scope: as before


def test_closing_the_window_stops_the_browsers_load_first(qtbot, window, monkeypatch):
    import rdc_studio.app.widgets.dataset_browser as browser_module
    from rdc_studio.app.worker import live_workers

    started = threading.Event()

    def slow_load(name, index, root):  # a huge folder tree: it ends only when cancelled
        started.set()
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            raise_if_cancelled()
            time.sleep(0.01)
        raise AssertionError("the load was never cancelled")

    monkeypatch.setattr(browser_module, "load_source", slow_load)
    window.open_dataset_browser()
    qtbot.waitUntil(started.is_set, timeout=HANG_S * 1000)
    window.close()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=HANG_S * 1000)
    assert live_workers() == 0  # the window closed only once the browser's worker had ended


# -- 8: unconditional models -----------------------------------------------------------------------------
def test_an_unconditional_model_is_refused(qtbot, window, tmp_path):
    net = build_denoiser(NetConfig(channels=(8, 16), head_channels=(4,), emb_dim=32, num_classes=0)).eval()
    path = save_checkpoint(tmp_path / "uncond" / "uncond.safetensors", net,
                           {"name": "uncond", "dataset": "mnist", "classes": []})
    classified(qtbot, window, digit())
    model = window.model
    assert not window.load_model(str(path))
    assert window.errors[-1][0] == "Cannot load model" and "unconditional" in window.errors[-1][1]
    assert window.model is model and window.state.probabilities is not None

    from rdc_studio.app.main import main

    threads = torch.get_num_threads()
    try:  # the command line refuses it too
        assert main(["--model", str(path), "--screenshot", str(tmp_path / "shot.png")]) == 2
    finally:
        torch.set_num_threads(threads)  # main() takes every core


# -- 4: Square's plot note ------------------------------------------------------------------------------------
def test_squares_note_tells_a_fooling_start_from_a_misclassified_image(qtbot, window):
    from rdc_studio.app.jobs import AttackOutcome

    clean = np.zeros((1, 1, 28, 28), np.float32)
    probs = np.full((1, 10), 0.01, np.float32)
    probs[0, 5] = 0.91

    def outcome(clean_correct: bool) -> AttackOutcome:
        return AttackOutcome(clean=clean, adversarial=clean + 0.1, purified=None, labels=np.array([3]),
                             attacked_prediction=np.array([5]), defense_probabilities=probs,
                             attack_succeeded=np.array([True]), defense_recovered=np.array([False]),
                             linf=np.array([0.1]), l2=np.array([2.8]), clean_correct=np.array([clean_correct]))

    tab = window.attack_tab
    for clean_correct in (True, False):
        tab.begin(clean[0], "labelled digit", 10, known_class=3)  # a labelled image, as from the browser
        tab.finish(outcome(clean_correct))
        note = tab.plot.message()
        if clean_correct:  # labelled 3 and classified 3: Square's starting stripes fooled the model
            assert "starting point already fooled" in note
        else:
            assert "misclassifies this labelled image already" in note
    # the app's attack carries the clean image's verdict
    cheap(window)
    window.attack_panel.method.setCurrentText("Square")
    classified(qtbot, window, digit())
    with qtbot.waitSignal(window.attack_finished, timeout=120000):
        window.run_attack()
    assert isinstance(window.last_outcome, AttackOutcome) and window.last_outcome.clean_correct.shape == (1,)


# -- 12: export guards ------------------------------------------------------------------------------------------
def test_export_never_overwrites_the_attacked_images_file(qtbot, window, tmp_path):
    cheap(window)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.round(digit()[0] * 255).astype(np.uint8)).save(a)
    Image.fromarray(np.round(digit(4)[0] * 255).astype(np.uint8)).save(b)
    original_a, original_b = a.read_bytes(), b.read_bytes()
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.open_path(str(a))
    with qtbot.waitSignal(window.attack_finished, timeout=120000):
        window.run_attack()
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.open_path(str(b))  # the attack of a.png stays on the Attack tab
    assert not window.export_adversarial(str(a)) and "the attacked image" in window.errors[-1][1]
    assert not window.export_adversarial(str(b)) and "the input image" in window.errors[-1][1]
    assert a.read_bytes() == original_a and b.read_bytes() == original_b
    assert window.export_adversarial(str(tmp_path / "adv.png"))


# -- 9: CSV ids ---------------------------------------------------------------------------------------------------
def test_csv_tells_two_pasted_images_apart_and_says_whether_the_label_was_known(qtbot, window, tmp_path):
    cheap(window)

    def qimage(value: int) -> QImage:
        img = QImage(28, 28, QImage.Format.Format_RGB888)
        img.fill(QColor(value, value, value))
        return img

    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.open_qimage(qimage(30), "pasted image")
    with qtbot.waitSignal(window.attack_finished, timeout=120000):
        window.run_attack()
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.open_qimage(qimage(220), "pasted image")
    path = tmp_path / "r.csv"
    assert window.export_csv(str(path))
    rows = list(csv.DictReader(path.open()))
    first = {r["image"] for r in rows if r["kind"].startswith("attack_")}
    second = {r["image"] for r in rows if r["kind"] == "probability"}
    assert len(first) == len(second) == 1 and first != second
    assert all(image.endswith("pasted image") for image in first | second)
    known = [r for r in rows if r["kind"] == "attack_label_known"]
    assert len(known) == 1 and known[0]["value"] == "0"  # the label was the model's prediction


# -- 11: pasted images --------------------------------------------------------------------------------------------
def test_a_pasted_image_above_the_pixel_cap_is_refused(qtbot, window):
    from rdc_studio.core.images import MAX_PIXELS

    classified(qtbot, window, digit())
    image = window.image.copy()
    huge = QImage(8000, MAX_PIXELS // 8000 + 1, QImage.Format.Format_Mono)  # one bit a pixel: small to hold
    huge.fill(0)
    window.open_qimage(huge, "pasted image")
    assert window.errors[-1][0] == "Cannot open image" and f"{MAX_PIXELS:,}" in window.errors[-1][1]
    assert np.array_equal(window.image, image) and not window.runner.busy


# -- 13: T above 1000 ------------------------------------------------------------------------------------------------
def test_the_toolbar_offers_as_many_levels_as_the_engine(qtbot, monkeypatch, tmp_path):
    isolate_settings(monkeypatch, tmp_path)
    model = load_checkpoint(make_checkpoint(tmp_path / "c" / "c.safetensors", classifier={"steps": 2048}))
    for steps, expected in ((None, 2048), (3000, 3000), (4096, 4096)):
        win = MainWindow(model, steps=steps)
        qtbot.addWidget(win)
        assert win.steps_spin.value() == expected
