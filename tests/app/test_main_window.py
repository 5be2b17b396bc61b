"""pytest-qt tests of the main window, driving the real engine on a tiny model."""
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pytestqt")
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDropEvent  # noqa: E402

from rdc_studio.app.main_window import MainWindow  # noqa: E402
from rdc_studio.core.classifier import build_classifier  # noqa: E402
from rdc_studio.core.images import load_for_model  # noqa: E402
from rdc_studio.core.models import load_checkpoint  # noqa: E402


def isolate_settings(monkeypatch, tmp_path) -> None:
    """Keep QSettings of a test away from the user's and from other tests'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    from PySide6.QtCore import QSettings

    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path))
    # Qt resolves the user config folder once per process, so earlier tests' values may
    # still be visible: start from an empty store.
    QSettings("RDC Studio", "RDC Studio").clear()


def open_window(qtbot, checkpoint, steps: int) -> MainWindow:
    """A shown window on ``checkpoint`` whose error dialogs are recorded in ``win.errors``."""
    win = MainWindow(load_checkpoint(checkpoint), steps=steps)
    errors = []
    win.show_error = lambda title, text: errors.append((title, text))
    win.errors = errors
    qtbot.addWidget(win)
    win.show()
    return win


@pytest.fixture
def window(qtbot, tiny_checkpoint, monkeypatch, tmp_path):
    isolate_settings(monkeypatch, tmp_path)
    win = open_window(qtbot, tiny_checkpoint, steps=4)
    yield win
    win.runner.shutdown()


def drop(window, path):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)


def _classified_with_small_budgets(qtbot, window, digit_png, attack_steps: int = 2) -> None:
    """Open and classify the digit, then make T, the attack and the purification cheap."""
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    window.steps_spin.setValue(2)
    window.attack_panel.steps.setValue(attack_steps)
    window.purify_panel.steps.setValue(1)


def test_drop_classifies_and_bars_match_engine(qtbot, window, digit_png, tiny_checkpoint):
    with qtbot.waitSignal(window.classification_finished, timeout=30000) as blocker:
        drop(window, digit_png)
    shown = window.bars.heights
    assert shown.sum() == pytest.approx(1.0, abs=1e-5)
    model = load_checkpoint(tiny_checkpoint)
    clf = build_classifier(model, steps=4)
    x = torch.from_numpy(load_for_model(digit_png, 28, 1)).unsqueeze(0)
    expected = clf.predict_proba(x)[0].numpy()
    assert np.allclose(shown, expected, atol=1e-4)
    assert np.allclose(blocker.args[0], expected, atol=1e-4)
    assert window.bars.verdict.text().startswith("Predicted: ")
    assert len(window.curves.steps) >= 1 and window.curves.steps[-1] == 4
    assert window.input_view.image.shape == (1, 28, 28)


def test_corrupt_drop_shows_error_and_changes_nothing(qtbot, window, digit_png, tmp_path):
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        drop(window, digit_png)
    before_img, before_p = window.image.copy(), window.bars.heights.copy()
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    drop(window, bad)
    assert window.errors and "corrupt.png" in window.errors[-1][1]
    assert np.array_equal(window.image, before_img) and np.array_equal(window.bars.heights, before_p)
    assert not window.runner.busy


def test_new_job_cancels_running_one(qtbot, window, digit_png):
    window.steps_spin.setValue(64)
    finished = []
    window.classification_finished.connect(finished.append)
    window.open_path(str(digit_png))
    window.steps_spin.setValue(3)
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.classify()
    qtbot.wait(200)
    assert len(finished) == 1
    assert window.progress.maximum() == 3 and window.curves.steps[-1] == 3


def test_stop_cancels_quickly(qtbot, window, digit_png):
    window.steps_spin.setValue(400)
    window.open_path(str(digit_png))
    qtbot.waitUntil(lambda: len(window.curves.steps) >= 1, timeout=30000)
    window.stop()
    # (how quickly is measured by benchmarks/bench_gui_latency.py; the counted version of
    # this test, with the worker held inside a network pass, is in test_stop_and_close.py)
    qtbot.waitUntil(lambda: window.runner.running_threads() == 0, timeout=60000)
    assert window.curves.steps[-1] < 400 and not window.runner.busy


def test_close_during_run_exits_cleanly(qtbot, window, digit_png):
    window.steps_spin.setValue(400)
    window.open_path(str(digit_png))
    qtbot.waitUntil(lambda: window.runner.running_threads() == 1, timeout=10000)
    window.close()  # returns at once; the window closes when the worker has ended
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=10000)
    assert window.runner.running_threads() == 0


def test_network_runs_on_the_worker_thread_only(qtbot, window, digit_png):
    """The GUI thread never runs the network (the product target, a longest event-loop
    gap under 100 ms, is measured by benchmarks/bench_gui_latency.py, not here)."""
    callers = []
    handle = window.model.net.noise_embedding.register_forward_hook(lambda *_: callers.append(threading.get_ident()))
    try:
        window.steps_spin.setValue(8)
        with qtbot.waitSignal(window.classification_finished, timeout=60000):
            window.open_path(str(digit_png))
        window.purify_panel.steps.setValue(2)
        with qtbot.waitSignal(window.purification_finished, timeout=60000):
            window.run_purification()
        window.attack_panel.steps.setValue(1)
        with qtbot.waitSignal(window.attack_finished, timeout=60000):
            window.run_attack()
    finally:
        handle.remove()
    assert callers, "the hook saw no network pass"
    assert threading.get_ident() not in set(callers)


def test_bad_checkpoint_keeps_current_model(qtbot, window, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    assert window.load_model(str(bad)) is False
    assert "bad.safetensors" in window.errors[-1][1] and window.model.name == "tiny"


def test_screenshot_command(tiny_checkpoint, digit_png, tmp_path, qapp):
    from rdc_studio.app.main import main

    out = tmp_path / "shot.png"
    assert main([str(digit_png), "--model", str(tiny_checkpoint), "--levels", "3", "--screenshot", str(out)]) == 0
    img = Image.open(out)
    assert img.size[0] >= 1000 and img.size[1] >= 600


def test_screenshot_bad_model_exits_2(tmp_path, qapp, capsys):
    from rdc_studio.app.main import main

    assert main(["--model", str(tmp_path / "none.safetensors"), "--screenshot", str(tmp_path / "s.png")]) == 2
    assert "none.safetensors" in capsys.readouterr().err


def test_attack_run_shows_adversarial_and_verdict(qtbot, window, digit_png):
    _classified_with_small_budgets(qtbot, window, digit_png, attack_steps=3)
    with qtbot.waitSignal(window.attack_finished, timeout=60000):
        window.run_attack()
    out = window.last_outcome
    assert out is not None and out.adversarial.shape == (1, 1, 28, 28)
    eps = window.attack_panel.eps_value()
    assert np.abs(out.adversarial - out.clean).max() <= eps + 1e-6
    assert window.view_adversarial.image is not None and window.view_purified.image is not None
    assert window.view_perturbation.image is not None and "‖δ‖∞" in window.view_perturbation.caption.text()
    text = window.attack_verdict.text()
    assert ("Attack succeeded" in text or "Attack failed" in text) and "defense" in text
    assert len(window.attack_plot.data["loss"][0]) == 3
    assert window.progress.value() == window.progress.maximum() == 3


def test_purification_run_draws_one_point_per_step_and_replays(qtbot, window, digit_png):
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    window.purify_panel.steps.setValue(4)
    with qtbot.waitSignal(window.purification_finished, timeout=60000) as blocker:
        window.run_purification()
    records = blocker.args[0]
    assert [r.step for r in records] == [0, 1, 2, 3, 4]
    hist = np.stack(window.purify_curves.history)
    assert hist.shape == (5, 10)  # one point per step (and the start) per class
    # the objective: the deterministic estimate (fixed noise bank) in front, the one-draw value faint behind it
    from rdc_studio.app.tabs.purify_tab import OBJECTIVE_DRAW, OBJECTIVE_ESTIMATE

    plot = window.objective_plot
    estimate, draw = plot.curves[OBJECTIVE_ESTIMATE], plot.curves[OBJECTIVE_DRAW]
    assert list(estimate.getData()[1]) == pytest.approx([r.objective_estimate[0] for r in records])
    assert list(draw.getData()[1]) == pytest.approx([r.objective[0] for r in records])
    assert list(estimate.getData()[0]) == list(draw.getData()[0]) == [0, 1, 2, 3, 4]
    assert OBJECTIVE_DRAW in plot.faint and draw.zValue() < estimate.zValue()
    assert draw.opts["pen"].color().alpha() < estimate.opts["pen"].color().alpha()
    assert draw.opts["pen"].widthF() < estimate.opts["pen"].widthF()
    assert window.scrubber.isEnabled() and window.scrubber.maximum() == 4
    x, _ = window.purify_curves.curves[0].getData()
    assert list(x) == [0, 1, 2, 3, 4]  # from step 0 (the input) on
    for plot in (window.purify_curves, window.objective_plot):  # the cursor starts on the last step
        assert plot.cursor.isVisible() and plot.cursor.value() == 4
    for index in (1, 3):
        window.scrubber.setValue(index)
        assert np.allclose(window.purify_view.image, records[index].image[0])
        for plot in (window.purify_curves, window.objective_plot):  # a cursor on every plot follows
            assert plot.cursor.isVisible() and plot.cursor.value() == index
    window.scrubber.setValue(1)
    assert window.purify_tab.attack_button.isEnabled()
    # "Attack this": the purified image shown (step 1) is attacked, then "Purify this" purifies the result
    window.attack_panel.steps.setValue(1)
    window.purify_panel.steps.setValue(1)
    with qtbot.waitSignal(window.attack_finished, timeout=60000) as attacked:
        window.purify_tab.attack_button.click()
    assert np.allclose(attacked.args[0].clean[0], np.round(records[1].image[0] * 255) / 255, atol=1e-6)
    assert window.tabs.currentWidget() is window.attack_tab
    with qtbot.waitSignal(window.purification_finished, timeout=60000) as purified:
        window.attack_tab.purify_button.click()
    assert np.allclose(purified.args[0][0].image[0], attacked.args[0].adversarial[0])
    assert window.state.purification.source.startswith("adversarial")


def test_exports_and_session_round_trip(qtbot, window, digit_png, tmp_path, tiny_checkpoint):
    import csv
    import json

    window.steps_spin.setValue(5)
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    window.attack_panel.steps.setValue(2)
    window.attack_panel.seed.setValue(7)
    window.purify_panel.steps.setValue(1)
    with qtbot.waitSignal(window.attack_finished, timeout=60000):
        window.run_attack()
    png, table, sess = tmp_path / "adv.png", tmp_path / "out.csv", tmp_path / "session.json"
    assert window.export_adversarial(str(png))
    saved = np.asarray(Image.open(png), dtype=np.float32)[None] / 255
    assert np.array_equal(saved, window.last_outcome.adversarial[0])  # lossless
    assert window.export_csv(str(table))
    rows = list(csv.DictReader(open(table)))
    probs = [float(r["value"]) for r in rows if r["kind"] == "probability"]
    assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-5
    assert {r["image"] for r in rows if r["kind"] in ("attack_loss", "probability")} == {f"#1 {window.image_source}"}
    verdict = [r for r in rows if r["kind"] == "attack_succeeded"]
    assert [int(r["value"]) for r in verdict] == [int(window.last_outcome.attack_succeeded[0])]
    assert window.save_session(str(sess))
    data = json.loads(sess.read_text())
    assert data["attack"]["seed"] == 7 and data["classifier"]["steps"] == 5
    # a new window reopens the session and reproduces the same probabilities
    other = MainWindow(load_checkpoint(tiny_checkpoint), steps=3)
    qtbot.addWidget(other)
    with qtbot.waitSignal(other.classification_finished, timeout=30000) as blocker:
        assert other.open_session(str(sess))
    assert np.array_equal(np.asarray(blocker.args[0]), window.last_probabilities)
    assert other.steps_spin.value() == 5 and other.attack_panel.seed.value() == 7
    other.runner.shutdown()


def test_session_command_line(tmp_path, qapp, window, digit_png, qtbot):
    from rdc_studio.app.main import main

    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    sess = tmp_path / "s.json"
    assert window.save_session(str(sess))
    shot = tmp_path / "shot.png"
    assert main(["--session", str(sess), "--screenshot", str(shot)]) == 0 and shot.stat().st_size > 0
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["--session", str(bad), "--screenshot", str(shot)]) == 2


def test_generate_sample_then_classify(qtbot, window):
    before = window.gallery.count()
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.generate_sample(3, seed=1, steps=4)
    assert window.image.shape == (1, 28, 28) and "generated 3" in window.image_source
    # the sample joins the gallery, captioned with its class and seed, and opens from there
    assert window.gallery.count() == before + 1
    item = window.gallery.item(before)
    assert item.text() == "3 (seed 1)" and np.array_equal(window.gallery.images[-1], window.image)
    assert window.state.image_known_class == 3 and window.gallery.class_names[-1] == "3"  # drawn from class 3
    assert "Generate sample" in window.samples_label.text()


def test_dataset_browser_opens_a_test_digit(qtbot, window):
    from rdc_studio.core.data import mnist_available

    if not mnist_available():
        pytest.skip("needs ../shared/data MNIST")
    from rdc_studio.app.widgets.dataset_browser import DatasetBrowser

    browser = DatasetBrowser("mnist", 28, 1)
    qtbot.addWidget(browser)
    chosen = []
    browser.image_chosen.connect(lambda img, caption, class_name: chosen.append((img, caption, class_name)))
    with qtbot.waitSignal(browser.loaded, timeout=60000):  # loads on a worker thread
        browser.load(0, str(__import__("rdc_studio.core.data", fromlist=["x"]).default_data_root()))
    assert browser.gallery.count() == 48 and browser.gallery.item(0).text() == "#0: 7"
    browser.gallery.itemClicked.emit(browser.gallery.item(0))
    assert chosen and chosen[0][0].shape == (1, 28, 28) and chosen[0][1:] == ("#0: 7", "7")
    with qtbot.waitSignal(browser.failed, timeout=10000) as blocker:
        browser.load(2, "/nonexistent/folder")
    assert "/nonexistent/folder" in blocker.args[0]


def test_gallery_click_opens_image(qtbot, window):
    img = np.zeros((1, 28, 28), np.float32)
    img[0, 10:20, 12:16] = 1
    window.gallery.set_images([img], ["sample"])
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.gallery.itemClicked.emit(window.gallery.item(0))
    assert np.array_equal(window.image, img) and window.image_source == "sample"


def test_a_labelled_image_is_attacked_with_its_label_through_purify_and_attack(qtbot, window, tmp_path,
                                                                               tiny_checkpoint):
    """A gallery image with a known class (a dataset digit, a sample drawn from a class) is attacked
    with that label, not with the model's prediction; "Purify this" / "Attack this" carry it, and a
    session keeps it."""
    import json

    img = np.zeros((1, 28, 28), np.float32)
    img[0, 10:20, 12:16] = 1
    with qtbot.waitSignal(window.classification_finished, timeout=30000) as classified:
        window.gallery.set_images([img, img], ["digit", "unlabelled"], ["3", None])
        window.gallery.itemClicked.emit(window.gallery.item(0))
    assert window.state.image_known_class == 3
    right = "right" if int(np.argmax(classified.args[0])) == 3 else "wrong"
    assert f"label 3: {right}</span>" in window.bars.verdict.text()
    label = 3 if int(np.argmax(classified.args[0])) != 3 else 5  # a label the untrained model does not predict
    window.state.image_known_class = label
    window.attack_panel.steps.setValue(1)
    window.purify_panel.steps.setValue(1)
    with qtbot.waitSignal(window.attack_finished, timeout=60000) as attacked:
        window.run_attack()
    assert int(attacked.args[0].labels[0]) == label and window.state.attack.known_class == label
    assert f"labelled {label}" in window.attack_verdict.text()  # misclassified already: the attack succeeded
    with qtbot.waitSignal(window.purification_finished, timeout=60000):
        window.attack_tab.purify_button.click()
    assert window.state.purification.known_class == label
    window.purify_tab.scrubber.setValue(1)
    with qtbot.waitSignal(window.attack_finished, timeout=60000) as again:
        window.purify_tab.attack_button.click()
    assert int(again.args[0].labels[0]) == label
    sess = tmp_path / "session.json"
    assert window.save_session(str(sess))
    assert json.loads(sess.read_text())["image"]["known_class"] == label
    other = MainWindow(load_checkpoint(tiny_checkpoint), steps=3)
    qtbot.addWidget(other)
    with qtbot.waitSignal(other.classification_finished, timeout=30000):
        assert other.open_session(str(sess))
    assert other.state.image_known_class == label
    saved = "succeeded" if again.args[0].attack_succeeded[0] else "failed"
    # the last attack was of the purified image, not of the session's image: it is not passed off as that
    assert (f"last attack was of another image (purified, step 1 (adversarial (#1 digit))): it {saved}"
            in other.message_label.toolTip())
    other.runner.shutdown()
    # an image of unknown class is attacked with the attacked model's prediction
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.gallery.itemClicked.emit(window.gallery.item(1))
    assert window.state.image_known_class is None and "label" not in window.bars.verdict.text()
    with qtbot.waitSignal(window.attack_finished, timeout=60000):
        window.run_attack()
    assert window.state.attack.known_class is None and "predicted" in window.attack_verdict.text()


def test_light_settings_persist_heavy_ones_reset_unless_pinned(qtbot, window, tiny_checkpoint):
    """T and the attack's steps / EOT draws start from the defaults on launch unless pinned."""
    window.steps_spin.setValue(256)
    window.attack_panel.steps.setValue(17)
    window.attack_panel.eot.setValue(50)
    window.attack_panel.norm.setCurrentText("l2")
    window.attack_panel.binarize.setValue(0.5)
    window.close()
    again = MainWindow(load_checkpoint(tiny_checkpoint))
    qtbot.addWidget(again)
    assert again.steps_spin.value() == 16  # the classifier default (the tiny card has none)
    assert again.attack_panel.steps.value() == 20 and again.attack_panel.eot.value() == 1
    assert again.attack_panel.norm.currentText() == "l2"
    assert again.attack_panel.binarize_threshold() is None  # a launch never starts binarised
    again.steps_spin.setValue(256)
    again.attack_panel.steps.setValue(17)
    again.pin_check.setChecked(True)
    again.close()
    pinned = MainWindow(load_checkpoint(tiny_checkpoint))
    qtbot.addWidget(pinned)
    assert pinned.pin_check.isChecked()
    assert pinned.steps_spin.value() == 256 and pinned.attack_panel.steps.value() == 17


def test_bundled_default_model_end_to_end(qtbot, tmp_path, monkeypatch):
    """The shipped default model in the real window: drop a digit, classify, attack, purify."""
    from rdc_studio.core.data import load_dataset, mnist_available
    from rdc_studio.core.models import DEFAULT_MODEL

    isolate_settings(monkeypatch, tmp_path)  # the card's classifier settings, not a stored T
    model = load_checkpoint()
    assert model.name == DEFAULT_MODEL
    if mnist_available():  # a real test digit, else the synthetic stroke
        digit = load_dataset("mnist", "test").float_images(slice(0, 1))[0].numpy()
    else:
        digit = np.zeros((1, 28, 28), np.float32)
        digit[0, 5:23, 12:16] = 1
    path = tmp_path / "digit.png"
    Image.fromarray(np.round(digit[0] * 255).astype(np.uint8)).save(path)
    win = MainWindow(model)
    assert win.steps_spin.value() == model.card["classifier"]["steps"]
    win.show_error = lambda title, text: pytest.fail(f"{title}: {text}")
    qtbot.addWidget(win)
    win.show()
    try:
        with qtbot.waitSignal(win.classification_finished, timeout=60000) as blocker:
            drop(win, path)
        expected = build_classifier(model).predict_proba(torch.from_numpy(load_for_model(path, 28, 1))[None])[0]
        assert np.allclose(blocker.args[0], expected.numpy(), atol=1e-4)
        assert win.bars.verdict.text().startswith(f"Predicted: {int(expected.argmax())}")
        win.attack_panel.steps.setValue(2)
        win.purify_panel.steps.setValue(1)
        with qtbot.waitSignal(win.attack_finished, timeout=120000):
            win.run_attack()
        assert win.last_outcome is not None and "defense" in win.attack_verdict.text()
    finally:
        win.runner.shutdown()


def test_sample_captions_name_the_class():
    from rdc_studio.app.main_window import sample_caption

    classes = [str(k) for k in range(10)]
    assert sample_caption("3-007", classes) == "3 #7"
    assert sample_caption("0-000", ["airplane"] + classes[1:]) == "airplane #0"
    assert sample_caption("uncond-003", classes) == "uncond-003"  # not a class: shown as named
    assert sample_caption("12-000", classes) == "12-000"  # no such class


def test_bundled_gallery_is_labelled_per_class(qtbot, window):
    """The bundled samples are conditional samples named LABEL-INDEX: every class, captioned."""
    from rdc_studio.app.main_window import SAMPLES_DIR

    stems = sorted(p.stem for p in SAMPLES_DIR.glob("*.png"))
    assert {s.split("-")[0] for s in stems} == {str(k) for k in range(10)}
    captions = [window.gallery.item(i).text() for i in range(window.gallery.count())]
    assert len(captions) == len(stems)
    assert all(c.split(" #")[0] in window.model.classes for c in captions)


def test_classify_tab_shows_ood_under_the_verdict(qtbot, window, tiny_checkpoint):
    """No reference: the label says so; a reference far below a noise image's score: a warning."""
    from rdc_studio.app.widgets.ood_label import PLAIN_STYLE, WARNING_STYLE
    from rdc_studio.core.models import update_card
    from rdc_studio.core.ood import CARD_KEY, NO_REFERENCE, OodScorer, OodSettings, make_reference

    label = window.classify_tab.ood
    assert window.bars.details.indexOf(label) == 0  # the row under the verdict, so neither cuts the other
    noise = np.random.default_rng(0).random((1, 28, 28)).astype(np.float32)
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.set_image(noise, "noise")
    assert NO_REFERENCE in label.text() and not label.warning and label.styleSheet() == PLAIN_STYLE
    bpd = label.score.bits_per_dim
    assert bpd == pytest.approx(float(OodScorer(window.model.net).bits_per_dim(torch.from_numpy(noise)[None])[0]))

    def reload_with_reference(low: float, high: float) -> None:
        ref = make_reference(np.linspace(low, high, 1001), OodSettings(), "mnist", "val", command="test")
        update_card(tiny_checkpoint, CARD_KEY, ref)
        with qtbot.waitSignal(window.classification_finished, timeout=30000):
            assert window.load_model(str(tiny_checkpoint))  # re-classifies the open image

    reload_with_reference(bpd - 2.0, bpd - 1.0)
    assert label.warning and label.styleSheet() == WARNING_STYLE
    assert "Out of distribution" in label.text() and "percentile 100.0" in label.text()
    assert window.state.results()["ood"]["out_of_distribution"] is True
    reload_with_reference(bpd - 1.0, bpd + 1.0)
    assert not label.warning and label.styleSheet() == PLAIN_STYLE
    assert label.text().startswith("In distribution") and "percentile 50" in label.text()


def test_attack_panel_enables_what_each_method_uses(qapp):
    from rdc_studio.app.widgets.attack_panel import FLIP_NEEDS_BINARIZATION, AttackPanel

    panel = AttackPanel([str(c) for c in range(10)])
    assert panel.binarize_threshold() is None and panel.binarize.text() == "off"  # never on by default
    assert not panel.step_size.isEnabled() and not panel.target.isEnabled()  # APGD-CE: neither applies
    panel.method.setCurrentText("PGD (CE)")
    assert panel.step_size.isEnabled()
    panel.method.setCurrentText("APGD-T (targeted DLR)")
    assert panel.target.isEnabled()
    panel.method.setCurrentText("Square")
    assert not panel.grad.isEnabled() and not panel.eot.isEnabled() and panel.settings().method == "square"
    panel.norm.setCurrentText("l2")
    panel.method.setCurrentText("Threshold flip")
    assert panel.norm.currentText() == "linf" and not panel.norm.isEnabled() and panel.grad.isEnabled()
    assert panel.problem() == FLIP_NEEDS_BINARIZATION
    assert panel.settings().method == "flip"  # still valid settings (the window saves them on close)
    panel.binarize.setValue(0.4)
    assert panel.problem() is None and panel.settings().threshold == pytest.approx(0.4)
    saved = panel.settings().to_dict()
    other = AttackPanel([str(c) for c in range(10)])
    other.apply(saved)
    assert other.method.currentText() == "Threshold flip" and not other.norm.isEnabled()
    assert other.binarize_threshold() is None  # the defense's binarisation is not an attack setting
    panel.method.setCurrentText("APGD-CE")
    assert panel.norm.isEnabled() and "threshold" not in panel.settings().to_dict()


def test_flip_attack_needs_binarisation_then_attacks_the_binarised_defense(qtbot, window, digit_png):
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    window.steps_spin.setValue(2)
    window.purify_panel.steps.setValue(1)
    panel = window.attack_panel
    panel.method.setCurrentText("Threshold flip")
    panel.steps.setValue(2)
    window.run_attack()  # no threshold set: a clear message and no job
    assert window.errors and "binarises its input" in window.errors[-1][1]
    assert not window.runner.busy
    assert window.last_outcome is None
    panel.binarize.setValue(0.5)
    with qtbot.waitSignal(window.attack_finished, timeout=120000):
        window.run_attack()
    out = window.last_outcome
    assert out is not None and np.abs(out.adversarial - out.clean).max() <= 0.3 + 1e-6
    assert "binarised at 0.50" in window.attack_verdict.text()
    # the purified pane and "Purify this" show what the defense purified: the binarised image
    with qtbot.waitSignal(window.attack_tab.purify_requested) as sent:
        window.attack_tab.purify_button.click()
    image, caption, known_class = sent.args
    assert set(np.unique(image)) <= {0.0, 1.0} and "binarised at 0.50" in caption and known_class is None
    assert np.array_equal(image, (out.adversarial[0] > 0.5).astype(image.dtype))


def test_binarisation_is_part_of_the_session(qtbot, window, digit_png, tmp_path, tiny_checkpoint):
    import json

    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    window.attack_panel.binarize.setValue(0.45)
    sess = tmp_path / "session.json"
    assert window.save_session(str(sess))
    data = json.loads(sess.read_text())
    assert data["attack_binarize"] == pytest.approx(0.45)
    data["classifier"]["a_later_setting"] = 1  # written by another version of the app: left out, no error
    sess.write_text(json.dumps(data))
    other = MainWindow(load_checkpoint(tiny_checkpoint), steps=3)
    qtbot.addWidget(other)
    errors = []
    other.show_error = lambda title, text: errors.append((title, text))
    with qtbot.waitSignal(other.classification_finished, timeout=30000):
        assert other.open_session(str(sess))
    assert other.attack_panel.binarize_threshold() == pytest.approx(0.45) and not errors
    other.runner.shutdown()


def test_square_attack_runs_in_the_app(qtbot, window, digit_png):
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    window.steps_spin.setValue(2)
    window.purify_panel.steps.setValue(1)
    window.attack_panel.method.setCurrentText("Square")
    window.attack_panel.steps.setValue(3)
    with qtbot.waitSignal(window.attack_finished, timeout=60000):
        window.run_attack()
    out = window.last_outcome
    assert out is not None and np.abs(out.adversarial - out.clean).max() <= window.attack_panel.eps_value() + 1e-6
    assert "the full RDC predicts" in window.attack_verdict.text()
    # Square stops once the attacked model is fooled (on this tiny model, often by its first query)
    ran = len(window.attack_plot.data["loss"][0])
    assert ran <= 3
    assert window.progress.value() == ran and window.progress.maximum() == 3  # how far it went, of 3
    assert np.array_equal(np.round(out.adversarial * 255) / 255, out.adversarial)  # 8-bit, as saved


def test_attack_fooled_by_its_starting_point_says_why_the_plot_is_empty(window):
    """Square's initial stripes can fool the attacked model before its first iteration."""
    from rdc_studio.core.attacks import DefenseOutcome

    clean = np.zeros((1, 1, 28, 28), np.float32)
    adversarial = clean + 0.1
    probs = np.full((1, 10), 0.01, np.float32)
    probs[0, 3] = 0.91

    def outcome(succeeded: bool) -> DefenseOutcome:
        return DefenseOutcome(clean=clean, adversarial=adversarial, purified=adversarial, labels=np.array([3]),
                              attacked_prediction=np.array([5 if succeeded else 3]), defense_probabilities=probs,
                              attack_succeeded=np.array([succeeded]), defense_recovered=np.array([True]),
                              linf=np.array([0.1]), l2=np.array([2.8]))

    tab = window.attack_tab
    for succeeded in (True, False):
        tab.begin(clean[0], "zeros", 10)
        assert tab.plot.message() is None
        tab.finish(outcome(succeeded))
        assert tab.verdict.text().startswith("Attack succeeded (predicted 3 → 5); the defense recovered"
                                             if succeeded else "Attack failed (predicted 3, still 3); the defense holds")
        note = tab.plot.message()
        assert (note is not None and "starting point already fooled" in note) == succeeded
        assert len(tab.plot.data["loss"][0]) == 0
    tab.begin(clean[0], "zeros", 10)  # the next attack starts without the note
    assert tab.plot.message() is None
    # the attacked model held but the full defense did not (another gradient mode, DC only)
    fooled = probs[:, ::-1].copy()  # the full defense says 6 (91%)
    tab.finish(DefenseOutcome(clean=clean, adversarial=adversarial, purified=adversarial, labels=np.array([3]),
                              attacked_prediction=np.array([3]), defense_probabilities=fooled,
                              attack_succeeded=np.array([False]), defense_recovered=np.array([False]),
                              linf=np.array([0.1]), l2=np.array([2.8])))
    assert tab.verdict.text().startswith("Attack failed against the attacked model (predicted 3, still 3), but")
    assert tab.verdict.text().endswith("predicts 6 (91.0%): the defense failed.")


def test_progress_bar_is_wide_enough_for_its_text(window):
    """'stopped at 1000 / 1000 iterations' fits on one line (it used to wrap and be cut)."""
    bar = window.progress
    for total, unit in ((16, "levels"), (1000, "iterations")):
        window._set_progress(total, unit)
        window._set_progress_format(f"stopped at %v / %m {unit}")
        text = f"stopped at {total} / {total} {unit}"
        assert bar.minimumWidth() >= bar.fontMetrics().horizontalAdvance(text)


def test_the_status_bar_says_how_long_a_running_job_has_left(window):
    """Linear in the units done; nothing before 2 s or a first unit, nor after the job."""
    import re
    import time

    from rdc_studio.core.runtime import time_left_text

    assert time_left_text(10.0, 20, 100) == "~40 s left"
    assert time_left_text(60.0, 10, 100) == "~9 min left" and time_left_text(19.0, 19, 20) == "~1 s left"
    assert time_left_text(1.0, 50, 100) == time_left_text(10.0, 0, 100) == time_left_text(10.0, 100, 100) == ""
    window.progress.setRange(0, 100)
    window.progress.setValue(20)
    window._started_at = time.perf_counter() - 10.0
    window._timer.start()  # as while a job runs
    try:
        window._on_timer_timeout()
        assert re.fullmatch(r"[0-9]+\.[0-9] s \u00b7 ~[0-9]+ s left", window.elapsed_label.text())
    finally:
        window._timer.stop()
    window._on_timer_timeout()  # the job over: the elapsed time only
    assert window.elapsed_label.text().endswith(" s") and "left" not in window.elapsed_label.text()


def _menu_action(window, menu_title: str, text: str):
    menu = next(a.menu() for a in window.menuBar().actions() if a.text() == menu_title)
    return next(a for a in menu.actions() if a.text() == text)


def test_run_menu_starts_an_attack_and_a_purification_of_the_input(qtbot, window, digit_png):
    """Run ▸ Attack (Ctrl+T) and Run ▸ Purify (Ctrl+P) run on the input (triggered's
    `checked` flag once arrived as the image)."""
    _classified_with_small_budgets(qtbot, window, digit_png)
    with qtbot.waitSignal(window.attack_finished, timeout=60000):
        _menu_action(window, "&Run", "&Attack").trigger()
    assert window.last_outcome is not None and np.array_equal(window.last_outcome.clean[0], window.image)
    with qtbot.waitSignal(window.purification_finished, timeout=60000):
        _menu_action(window, "&Run", "&Purify").trigger()
    assert np.array_equal(window.purify_records[0].image[0], window.image)
    assert not window.errors
    model_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&Model")
    bundled = [a.text().removeprefix("Bundled: ") for a in model_menu.actions() if a.text().startswith("Bundled")]
    assert "mnist-embedding" in bundled and "mnist-cnn" not in bundled  # the CNN is no diffusion model


def test_stopping_before_the_first_level_shows_no_old_verdict(qtbot, window, digit_png):
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    assert window.bars.verdict.text().startswith("Predicted")
    window.steps_spin.setValue(400)
    window.set_image(np.zeros((1, 28, 28), np.float32), "blank")
    assert window.bars.verdict.text() == "Classifying…" and window.bars.heights.sum() == 0
    window.stop()  # before any record of the new image was drawn
    assert window.bars.verdict.text() == "Stopped before the first noise level"
    assert window.bars.heights.sum() == 0 and window.last_probabilities is None


def test_a_job_cut_short_by_another_says_it_stopped(qtbot, window, digit_png):
    _classified_with_small_budgets(qtbot, window, digit_png, attack_steps=500)
    window.run_attack()
    assert window.attack_verdict.text() == "Attacking…"
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.classify()  # cuts the attack short
    assert window.attack_verdict.text().startswith("Stopped after")
    window.purify_panel.steps.setValue(500)
    window.run_purification()
    window.steps_spin.setValue(400)
    window.classify()
    assert window.purify_view.title.text().startswith("<b>Stopped")
    window.stop()


def test_a_model_switch_clears_old_results_and_takes_the_new_cards_settings(qtbot, window, digit_png, tiny_net,
                                                                            tmp_path):
    from rdc_studio.core.models import save_checkpoint

    other = save_checkpoint(tmp_path / "other" / "other.safetensors", tiny_net,
                            {"name": "other", "dataset": "mnist", "classes": [f"c{i}" for i in range(10)],
                             "classifier": {"steps": 7}, "purify": {"eta": 0.2, "steps": 3, "step_size": 0.05}})
    _classified_with_small_budgets(qtbot, window, digit_png)
    with qtbot.waitSignal(window.attack_finished, timeout=60000):
        window.run_attack()
    assert window.attack_tab.purify_button.isEnabled() and window.view_adversarial.image is not None
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        assert window.load_model(str(other))
    assert window.steps_spin.value() == 7
    purify = window.purify_panel.settings()
    assert (purify.eta, purify.steps, purify.step_size) == pytest.approx((0.2, 3, 0.05))
    assert window.view_adversarial.image is None and window.view_original.image is None
    assert not window.attack_tab.purify_button.isEnabled() and window.attack_verdict.text().startswith("Run an")
    assert window.attack_panel.target.itemText(1) == "c0"
    assert not window.scrubber.isEnabled() and window.purify_view.image is None


def test_a_preset_classifies_again_and_a_session_keeps_the_settings_of_its_result(qtbot, window, digit_png):
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    with qtbot.waitSignal(window.classification_finished, timeout=60000):
        window.preset_combo.setCurrentIndex(window.preset_combo.findData("fast"))
    session = window.session()
    assert session["classifier"]["preset"] == "fast" and session["classifier"]["steps"] == 16
    window.steps_spin.setValue(5)  # not classified with it yet: the session keeps the result's settings
    assert window.session()["classifier"]["steps"] == 16
    assert "CIFAR-10" in window.message_label.toolTip()


def test_purifying_zero_steps_says_why_nothing_runs(qtbot, window, digit_png):
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    window.purify_panel.steps.setValue(0)
    window.run_purification()
    assert window.errors and window.errors[-1][0] == "Nothing to purify" and not window.runner.busy


def test_ood_percentiles_never_read_past_their_warning_lines():
    from rdc_studio.app.widgets.ood_label import percentile_text
    from rdc_studio.core.ood import WARN_HIGH, WARN_LOW

    assert percentile_text(27.4) == "27" and percentile_text(99.0) == "99"
    assert percentile_text(WARN_HIGH) == "99.9" and percentile_text(99.89) == "99.8"
    assert percentile_text(WARN_LOW) == "0.1" and percentile_text(0.14) == "0.2"


def test_dataset_browser_tells_a_window_user_where_to_point_it(qtbot, tmp_path, monkeypatch):
    from rdc_studio.app.widgets.dataset_browser import DatasetBrowser

    monkeypatch.delenv("RDC_DATA_ROOT", raising=False)
    browser = DatasetBrowser("mnist", 28, 1)
    qtbot.addWidget(browser)
    assert "Load" in browser.info.text()
    with qtbot.waitSignal(browser.failed, timeout=30000) as failed:
        browser.load(0, str(tmp_path / "empty"))
    message = failed.args[0]
    assert "Browse…" in message and "--data-root" not in message and "RDC_DATA_ROOT" not in message


def test_a_session_records_the_settings_of_the_results_it_holds(qtbot, window, digit_png):
    """Changing a panel after a run must not relabel the run's results in the session."""
    _classified_with_small_budgets(qtbot, window, digit_png)
    with qtbot.waitSignal(window.attack_finished, timeout=60000):
        window.run_attack()
    window.purify_panel.eta.setValue(8.0)
    with qtbot.waitSignal(window.purification_finished, timeout=60000):
        window.run_purification()
    window.attack_panel.steps.setValue(7)
    window.purify_panel.eta.setValue(4.0)
    session = window.session()
    assert session["attack"]["steps"] == 2 and session["purify"]["eta"] == pytest.approx(8 / 255)


def test_few_levels_on_a_model_that_eliminates_classes_still_classify(qtbot, window, digit_png, tiny_net, tmp_path):
    from rdc_studio.core.models import save_checkpoint

    other = save_checkpoint(tmp_path / "elim" / "elim.safetensors", tiny_net,
                            {"name": "elim", "dataset": "mnist", "classes": [str(i) for i in range(10)],
                             "classifier": {"steps": 8, "screen_levels": 6, "keep_classes": 2}})
    assert window.load_model(str(other))
    window.steps_spin.setValue(4)
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    assert window.bars.verdict.text().startswith("Predicted") and not window.errors


def test_a_stopped_purification_replays_the_steps_it_made(qtbot, window, digit_png):
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    window.steps_spin.setValue(2)
    window.purify_panel.steps.setValue(500)
    window.run_purification()
    qtbot.waitUntil(lambda: len(window.purify_records) >= 2, timeout=60000)
    window.stop()
    assert window.scrubber.isEnabled() and window.purify_tab.attack_button.isEnabled()
    assert window.purify_view.title.text().startswith("<b>Stopped")


def test_a_cifar10_model_starts_the_attack_at_its_own_threat_model(qapp):
    from rdc_studio.app.widgets.attack_panel import AttackPanel

    panel = AttackPanel([str(c) for c in range(10)])
    assert panel.eps_value() == pytest.approx(0.3, abs=1e-3)
    panel.set_dataset("cifar10")
    assert panel.eps_value() == pytest.approx(8 / 255, abs=1e-3)
    panel.norm.setCurrentText("l2")
    assert panel.eps_value() == pytest.approx(0.5)


def test_a_model_whose_settings_fail_is_refused_and_the_window_keeps_its_model(qtbot, window, digit_png,
                                                                              tiny_checkpoint, tmp_path):
    import json
    import shutil

    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    before, eta = window.model, window.purify_panel.eta.value()
    bad = tmp_path / "bad.safetensors"
    shutil.copy(tiny_checkpoint, bad)
    card = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    bad.with_suffix(".json").write_text(json.dumps(card | {"purify": {"eta": 5}}))
    assert not window.load_model(str(bad))
    assert window.errors[-1][0] == "Cannot load model" and "settings are unusable" in window.errors[-1][1]
    assert window.model is before and window.purify_panel.eta.value() == eta
    with qtbot.waitSignal(window.classification_finished, timeout=30000):  # still works
        window.classify()


def test_a_session_with_unusable_settings_changes_nothing(qtbot, window, digit_png, tmp_path):
    import json

    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.open_path(str(digit_png))
    sess = tmp_path / "s.json"
    assert window.save_session(str(sess))
    data = json.loads(sess.read_text())
    data["classifier"]["sigma_min"] = "abc"
    sess.write_text(json.dumps(data))
    steps, source = window.steps_spin.value(), window.image_source
    assert not window.open_session(str(sess))
    assert "sigma_min must be a positive number" in window.errors[-1][1] and str(sess) in window.errors[-1][1]
    assert window.steps_spin.value() == steps and window.image_source == source and window.session_classifier is None
    with qtbot.waitSignal(window.classification_finished, timeout=30000):  # classify still works
        window.classify()


def test_a_model_switch_keeps_the_inputs_label_only_by_name(qtbot, window, tiny_checkpoint, tmp_path):
    import json
    import shutil

    img = np.zeros((1, 28, 28), np.float32)
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        window.set_image(img, "digit", known_class=3)
    same = tmp_path / "same.safetensors"
    shutil.copy(tiny_checkpoint, same)
    shutil.copy(tiny_checkpoint.with_suffix(".json"), same.with_suffix(".json"))
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        assert window.load_model(str(same))
    assert window.state.image_known_class == 3
    letters = tmp_path / "letters.safetensors"
    shutil.copy(tiny_checkpoint, letters)
    card = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    letters.with_suffix(".json").write_text(json.dumps(card | {"classes": list("abcdefghij")}))
    with qtbot.waitSignal(window.classification_finished, timeout=30000):
        assert window.load_model(str(letters))
    assert window.state.image_known_class is None  # class "3" is not one of the new model's
