"""A saved session brings back the attack and the purification as they ended: the Attack and
Purify tabs draw the same curves, images and verdict after reopening, and the CSV export holds
the same rows. Real (tiny) runs in the window, no wall-clock bounds."""
import csv
import json

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from rdc_studio.app.main_window import MainWindow  # noqa: E402

from test_main_window import isolate_settings, open_window  # noqa: E402 (tests/app is on sys.path)

WAIT_MS = 120000  # only a hang detector


def new_window(qtbot, checkpoint) -> MainWindow:
    return open_window(qtbot, checkpoint, steps=2)


@pytest.fixture
def window(qtbot, tiny_checkpoint, monkeypatch, tmp_path):
    isolate_settings(monkeypatch, tmp_path)
    win = new_window(qtbot, tiny_checkpoint)
    yield win
    win.runner.shutdown()


@pytest.fixture
def fresh(qtbot, tiny_checkpoint):
    """Windows opened during a test, shut down after it."""
    made = []

    def make() -> MainWindow:
        made.append(new_window(qtbot, tiny_checkpoint))
        return made[-1]

    yield make
    for win in made:
        win.runner.shutdown()


def digit(offset: int = 0) -> np.ndarray:
    image = np.zeros((1, 28, 28), np.float32)
    image[0, 5:23, 12 + offset:16 + offset] = 1
    return image


def open_image(qtbot, win, image, source="digit", known_class=None) -> None:
    with qtbot.waitSignal(win.classification_finished, timeout=WAIT_MS):
        win.set_image(image, source, known_class=known_class)


def attack_and_purify(qtbot, win, attack_steps: int = 3, purify_steps: int = 3) -> None:
    win.attack_panel.steps.setValue(attack_steps)
    win.attack_panel.seed.setValue(5)
    win.purify_panel.steps.setValue(purify_steps)
    with qtbot.waitSignal(win.attack_finished, timeout=WAIT_MS):
        win.run_attack()
    with qtbot.waitSignal(win.purification_finished, timeout=WAIT_MS):
        win.run_purification()


def reopen(qtbot, win, path) -> None:
    with qtbot.waitSignal(win.classification_finished, timeout=WAIT_MS):
        assert win.open_session(str(path))
    assert not win.errors


def csv_rows(win, path) -> list[dict]:
    assert win.export_csv(str(path))
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def image_and_caption(view) -> tuple:
    image = None if view.image is None else (view.image.dtype, view.image.shape, view.image.tobytes())
    return image, view.caption.text(), view.title.text()


def shown(win) -> dict:
    """What the Attack and Purify tabs show: curves, images with captions, verdict, replay."""
    tab, purify = win.attack_tab, win.purify_tab
    views = [tab.view_original, tab.view_perturbation, tab.view_adversarial, tab.view_purified, purify.view]
    return {"attack_curves": {k: (list(x), list(y)) for k, (x, y) in tab.plot.data.items()},
            "extents": [p.x_extent for p in (tab.plot, purify.curves, purify.objective_plot)],
            "attack_note": tab.plot.message(),
            "verdict": (tab.verdict.text(), tab.verdict.styleSheet()),
            "purify_button": tab.purify_button.isEnabled(),
            "views": [image_and_caption(v) for v in views],
            "likelihood": [row.tolist() for row in purify.curves.history],
            "objective": {k: (list(x), list(y)) for k, (x, y) in purify.objective_plot.data.items()},
            "replay": (purify.scrubber.isEnabled(), purify.scrubber.maximum(), purify.scrubber.value(),
                       purify.scrubber_label.text(), purify.attack_button.isEnabled()),
            "cursors": [(p.cursor.isVisible(), p.cursor.value()) for p in (purify.curves, purify.objective_plot)]}


def test_a_reopened_session_shows_the_attack_and_the_purification_as_they_ended(qtbot, window, fresh, tmp_path):
    label = 7
    open_image(qtbot, window, digit(), "digit", known_class=label)
    attack_and_purify(qtbot, window)
    before, rows = shown(window), csv_rows(window, tmp_path / "before.csv")
    assert before["attack_curves"]["loss"][0] == [1, 2, 3] and len(before["likelihood"]) == 4
    assert f"labelled {label}" in before["verdict"][0]
    kinds = {r["kind"] for r in rows}
    assert {"attack_loss", "attack_succeeded", "defense_probability", "purify_objective", "purify_logit",
            "probability"} <= kinds
    path = tmp_path / "session.json"
    assert window.save_session(str(path))
    results = json.loads(path.read_text())["results"]
    assert results["attack_trace"]["of_input"] and results["purification_trace"]["finished"]

    other = fresh()
    reopen(qtbot, other, path)
    assert shown(other) == before
    assert csv_rows(other, tmp_path / "after.csv") == rows
    assert other.state.attack_is_of_input and other.state.purification_is_of_input
    assert other.state.attack.known_class == label and other.last_outcome.clean_correct is not None
    # the replay shows every step's image, as it did
    for index in (0, 2):
        window.scrubber.setValue(index)
        other.scrubber.setValue(index)
        assert np.array_equal(other.purify_view.image, window.purify_view.image)
        assert other.purify_view.caption.text() == window.purify_view.caption.text()
    # "Purify this" and "Attack this" send what they sent before saving
    for win in (window, other):
        win.scrubber.setValue(2)
    sent = []
    for win in (window, other):  # what the buttons ask for (the window's own runs are not started)
        win.attack_tab.purify_requested.disconnect(win._on_attack_tab_purify_requested)
        win.purify_tab.attack_requested.disconnect(win._on_purify_tab_attack_requested)
        with qtbot.waitSignal(win.attack_tab.purify_requested) as purify_this, \
                qtbot.waitSignal(win.purify_tab.attack_requested) as attack_this:
            win.attack_tab.purify_button.click()
            win.purify_tab.attack_button.click()
        sent.append([purify_this.args, attack_this.args])
    for (a_image, *a_rest), (b_image, *b_rest) in zip(*sent):
        assert np.array_equal(a_image, b_image) and a_rest == b_rest


def test_a_session_reopened_in_the_same_window_shows_its_runs_under_the_new_inputs_id(qtbot, window, tmp_path):
    open_image(qtbot, window, digit(), "digit")
    attack_and_purify(qtbot, window, attack_steps=2, purify_steps=2)
    before, rows = shown(window), csv_rows(window, tmp_path / "before.csv")
    path = tmp_path / "session.json"
    assert window.save_session(str(path))
    open_image(qtbot, window, digit(3), "another")  # the runs stay, of an earlier input
    assert not window.state.attack_is_of_input
    reopen(qtbot, window, path)
    assert window.state.image_id == "#3 digit" and window.state.attack_is_of_input
    assert shown(window) == before
    renamed = [dict(r, image="#1 digit" if r["image"] == "#3 digit" else r["image"])
               for r in csv_rows(window, tmp_path / "after.csv")]
    assert renamed == rows


def test_a_new_run_after_reopening_replaces_the_restored_one(qtbot, window, fresh, tmp_path):
    open_image(qtbot, window, digit(), "digit")
    attack_and_purify(qtbot, window, attack_steps=3, purify_steps=3)
    path = tmp_path / "session.json"
    assert window.save_session(str(path))
    other = fresh()
    reopen(qtbot, other, path)
    restored = other.state.attack
    attack_and_purify(qtbot, other, attack_steps=2, purify_steps=1)
    assert other.state.attack is not restored and other.state.attack.iterations == [1, 2]
    assert other.attack_plot.data["loss"][0] == [1, 2] and len(other.purify_curves.history) == 2
    assert other.scrubber.maximum() == 1 and other.state.attack_is_of_input
    rows = csv_rows(other, tmp_path / "rows.csv")
    assert len([r for r in rows if r["kind"] == "attack_loss"]) == 2
    assert len([r for r in rows if r["kind"] == "purify_objective"]) == 2
    again = tmp_path / "again.json"
    assert other.save_session(str(again))
    assert json.loads(again.read_text())["results"]["attack_trace"]["iterations"] == [1, 2]


def test_stopped_runs_reopen_stopped_with_the_steps_they_made(qtbot, window, fresh, tmp_path):
    open_image(qtbot, window, digit(), "digit")
    window.attack_panel.steps.setValue(500)
    window.run_attack()
    qtbot.waitUntil(lambda: len(window.state.attack.iterations) >= 2, timeout=WAIT_MS)
    window.stop()
    qtbot.waitUntil(lambda: window.runner.running_threads() == 0, timeout=WAIT_MS)
    window.purify_panel.steps.setValue(500)
    window.run_purification()
    qtbot.waitUntil(lambda: len(window.purify_records) >= 2, timeout=WAIT_MS)
    window.stop()
    qtbot.waitUntil(lambda: window.runner.running_threads() == 0, timeout=WAIT_MS)
    before, rows = shown(window), csv_rows(window, tmp_path / "before.csv")
    assert before["verdict"][0].startswith("Stopped after") and before["views"][2][0] is not None
    assert window.purify_view.title.text().startswith("<b>Stopped")
    path = tmp_path / "session.json"
    assert window.save_session(str(path))
    other = fresh()
    reopen(qtbot, other, path)
    assert shown(other) == before and csv_rows(other, tmp_path / "after.csv") == rows
    assert other.state.attack.outcome is None and not other.state.purification.finished


def test_failed_runs_reopen_failed_with_their_error_not_as_stopped(qtbot, window, fresh, tmp_path, monkeypatch):
    import rdc_studio.app.main_window as main_window

    def failing(job, after):
        def run(*args, **kwargs):
            for i, record in enumerate(job(*args, **kwargs)):
                if i == after:
                    raise RuntimeError("CUDA out of memory (on purpose)\nsecond line")
                yield record
        return run

    monkeypatch.setattr(main_window, "attack_job", failing(main_window.attack_job, 2))
    monkeypatch.setattr(main_window, "purify_job", failing(main_window.purify_job, 2))
    open_image(qtbot, window, digit(), "digit")
    window.attack_panel.steps.setValue(5)
    window.purify_panel.steps.setValue(5)
    for run in (window.run_attack, window.run_purification):
        with qtbot.waitSignal(window.runner.failed, timeout=WAIT_MS):
            run()
        qtbot.waitUntil(lambda: window.runner.running_threads() == 0, timeout=WAIT_MS)
    before, rows = shown(window), csv_rows(window, tmp_path / "before.csv")
    assert before["verdict"][0] == "The attack failed with an error: RuntimeError: CUDA out of memory (on purpose)"
    assert window.purify_view.title.text().startswith("<b>Failed")
    assert "(RuntimeError: CUDA out of memory (on purpose))" in window.purify_view.caption.text()
    for label in (window.attack_tab.verdict, window.purify_view.caption):  # the whole error on hover
        assert label.toolTip() == "RuntimeError: CUDA out of memory (on purpose)\nsecond line"
    path = tmp_path / "session.json"
    assert window.save_session(str(path))
    results = json.loads(path.read_text())["results"]
    assert results["attack_trace"]["error"].startswith("RuntimeError: CUDA out of memory")
    other = fresh()
    reopen(qtbot, other, path)
    assert shown(other) == before and csv_rows(other, tmp_path / "after.csv") == rows
    assert other.state.attack.iterations == [1, 2] and not other.state.purification.finished

    session = json.loads(path.read_text())  # contradictions are refused
    session["results"]["purification_trace"]["finished"] = True
    path.write_text(json.dumps(session))
    assert not other.open_session(str(path))
    assert "marked both finished and failed" in other.errors[-1][1]


def test_a_binarised_attack_reopens_with_its_defense_named_and_purifies_the_binarised_image(qtbot, window, fresh,
                                                                                          tmp_path):
    open_image(qtbot, window, digit(), "digit")
    window.attack_panel.binarize.setValue(0.5)
    window.attack_panel.steps.setValue(1)
    window.purify_panel.steps.setValue(1)
    with qtbot.waitSignal(window.attack_finished, timeout=WAIT_MS):
        window.run_attack()
    path = tmp_path / "session.json"
    assert window.save_session(str(path))
    other = fresh()
    reopen(qtbot, other, path)
    assert "binarised at 0.50" in other.attack_verdict.text()
    assert shown(other)["verdict"] == shown(window)["verdict"]
    with qtbot.waitSignal(other.attack_tab.purify_requested) as sent:
        other.attack_tab.purify_button.click()
    image, caption, _ = sent.args
    assert "binarised at 0.50" in caption and set(np.unique(image)) <= {0.0, 1.0}


def test_an_older_session_opens_as_before_with_its_note(qtbot, window, fresh, tmp_path):
    open_image(qtbot, window, digit(), "digit", known_class=3)
    attack_and_purify(qtbot, window, attack_steps=2, purify_steps=1)
    path = tmp_path / "session.json"
    assert window.save_session(str(path))
    session = json.loads(path.read_text())
    for key in ("attack_trace", "purification_trace"):  # what older versions wrote: a summary of the attack only
        del session["results"][key]
    path.write_text(json.dumps(session))
    other = fresh()
    messages = []
    show_status = other.show_status
    other.show_status = lambda text, timeout_ms=5000: (messages.append(text), show_status(text, timeout_ms))
    reopen(qtbot, other, path)
    assert other.state.attack.outcome is None and not other.state.purification.records
    assert other.attack_verdict.text() == "Run an attack to see the verdict" and other.purify_view.image is None
    assert "The session's attack on labelled 3" in messages[-1] and "re-runs it" in messages[-1]
    kinds = {r["kind"] for r in csv_rows(other, tmp_path / "rows.csv")}
    assert "probability" in kinds and not any(k.startswith(("attack_", "purify_")) for k in kinds)


def test_a_session_with_a_malformed_trace_changes_nothing(qtbot, window, tmp_path):
    from rdc_studio.core.session import encode_array

    open_image(qtbot, window, digit(), "digit")
    attack_and_purify(qtbot, window, attack_steps=1, purify_steps=1)
    path = tmp_path / "session.json"
    assert window.save_session(str(path))
    saved = path.read_text()
    open_image(qtbot, window, digit(2), "current")
    attack, purification, before = window.state.attack, window.state.purification, shown(window)
    image_id, steps = window.state.image_id, window.steps_spin.value()
    for change, message in [
        (lambda r: r["attack_trace"]["outcome"].update(labels=[12]), "labels must hold whole numbers in 0-9"),
        (lambda r: r["attack_trace"].update(loss={"dtype": "float32", "shape": [5], "data_b64": "AAAA"}),
         "saved attack's loss is not a valid array"),
        (lambda r: r["purification_trace"]["steps"].update(logits=encode_array(np.zeros((2, 1, 9)))),
         "logits has shape (2, 1, 9), not (2, 1, 10)"),
        (lambda r: r["purification_trace"].update(finished="yes"), "finished must be true or false"),
    ]:
        session = json.loads(saved)
        change(session["results"])
        path.write_text(json.dumps(session))
        assert not window.open_session(str(path))
        title, text = window.errors[-1]
        assert title == "Cannot open session" and str(path) in text and message in text
        assert window.state.attack is attack and window.state.purification is purification
        assert window.state.image_id == image_id and window.steps_spin.value() == steps and shown(window) == before
        assert not window.runner.busy
