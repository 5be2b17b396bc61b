"""The window's document without Qt, the worker's result protocol, and the set_device race."""
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from rdc_studio.app.session_state import CSV_HEADER, SessionState
from rdc_studio.core.classifier import ClassifyStep


def test_session_state_imports_no_qt():
    code = "import sys, rdc_studio.app.session_state, rdc_studio.app.jobs; print('PySide6' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_session_state_notifies_and_exports():
    state = SessionState(["a", "b"])
    events = []
    state.subscribe(events.append)
    state.set_image(np.zeros((1, 2, 2), np.float32), "zeros", "/tmp/zeros.png")
    logits = np.array([[0.0, -1.0]])
    probs = np.exp(logits) / np.exp(logits).sum()
    step = ClassifyStep(levels_done=2, total_levels=2, sigmas_done=np.ones(2), logits=logits,
                        probabilities=probs, level_errors=np.zeros((1, 2, 2)))
    state.begin_classification()
    state.add_classification([step])
    state.finish_classification(step)
    assert events == ["image", "classification", "classification", "classification"]
    rows = state.csv_rows()
    assert CSV_HEADER == ["image", "kind", "step", "class", "value"]
    # the input's id: its serial and caption
    assert [r[:2] for r in rows] == [["#1 zeros", "probability"]] * 2 + [["#1 zeros", "classify_logit"]] * 2
    assert state.results()["probabilities"] == pytest.approx(list(probs[0]))
    state.set_image(np.ones((1, 2, 2), np.float32), "ones")
    assert state.probabilities is None and state.image_path == ""


def test_session_state_exports_the_objective_estimate_and_the_ood_score():
    from rdc_studio.core.ood import judge
    from rdc_studio.core.purify import PurifyStep

    state = SessionState(["a", "b"])
    state.begin_purification("input")
    one = np.ones(1)
    state.add_purification([PurifyStep(s, 1, np.zeros((1, 1, 2, 2)), one * (5 - s), 0.5, one * 0, one * 0,
                                       np.zeros((1, 2)), one * (4 - s)) for s in (0, 1)])
    rows = state.csv_rows()
    assert [r[2:] for r in rows if r[1] == "purify_objective_estimate"] == [[0, "", 4.0], [1, "", 3.0]]
    assert [r[4] for r in rows if r[1] == "purify_objective"] == [5.0, 4.0]
    assert {r[0] for r in rows} == {"input"}
    score = judge(3.0, {"probabilities": [0.0, 1.0], "quantiles": [1.0, 2.0]})
    state.set_ood(score)
    ood_rows = {r[1]: r[4] for r in state.csv_rows() if r[1].startswith("ood_")}
    assert ood_rows == {"ood_bits_per_dim": 3.0, "ood_percentile": score.percentile}
    assert state.results()["ood"] == score.to_dict() and score.to_dict()["out_of_distribution"] is True
    state.begin_classification()
    assert "ood" not in state.results()  # a new classification forgets the old score


pytest.importorskip("pytestqt")


def test_worker_relays_records_then_the_return_value(qtbot):
    from rdc_studio.app.worker import JobRunner

    runner = JobRunner()
    seen = []
    runner.steps_ready.connect(seen.extend)

    def job(cancelled):
        for i in range(3):
            yield i
        return "result"

    with qtbot.waitSignal(runner.finished, timeout=10000) as blocker:
        runner.start(job)
    assert blocker.args == ["result"] and seen == [0, 1, 2]  # the result is not a record
    with qtbot.waitSignal(runner.finished, timeout=10000) as blocker:
        runner.start(lambda cancelled: 42)  # a plain function: its value is the result
    assert blocker.args == [42]
    qtbot.waitUntil(lambda: runner.running_threads() == 0, timeout=10000)


def test_cancelled_job_never_reports_and_drains(qtbot):
    from rdc_studio.app.worker import JobRunner, live_workers

    runner = JobRunner()
    finished = []
    runner.finished.connect(finished.append)

    def job(cancelled):
        while not cancelled():
            time.sleep(0.01)
            yield None
        return "late"

    runner.start(job)
    qtbot.wait(50)
    with qtbot.waitSignal(runner.drained, timeout=10000):
        assert runner.cancel()
    assert not finished and runner.running_threads() == 0 and live_workers() == 0


def test_a_job_stopped_inside_a_network_pass_ends_quietly(qtbot):
    """The worker runs each job inside a cancellation scope: a pass that only polls the
    scope (as the diffusion classifier does between its network calls) ends on Stop, and
    the job reports neither a result nor an error."""
    from rdc_studio.app.worker import JobRunner
    from rdc_studio.core.runtime import raise_if_cancelled

    runner = JobRunner()
    finished, failed, polls = [], [], []
    runner.finished.connect(finished.append)
    runner.failed.connect(failed.append)

    def one_long_pass(cancelled):  # never checks its ``cancelled`` argument itself
        yield "started"
        for _ in range(100_000):  # a hang detector only: 1000 s
            polls.append(1)
            raise_if_cancelled()
            time.sleep(0.01)
        return "finished"

    runner.start(one_long_pass)
    qtbot.waitUntil(lambda: len(polls) >= 3, timeout=10000)
    with qtbot.waitSignal(runner.drained, timeout=10000):
        assert runner.cancel()
    assert not finished and not failed and len(polls) < 100_000


def test_set_device_never_moves_the_network_under_a_running_job(qtbot, tiny_checkpoint, monkeypatch, tmp_path):
    """The race: a cancelled job may still run when the device changes. The job keeps its
    own network; the window moves to a copy (here to the 'meta' device, which any machine has)."""
    from test_main_window import isolate_settings

    from rdc_studio.app.main_window import MainWindow
    from rdc_studio.core.models import load_checkpoint

    isolate_settings(monkeypatch, tmp_path)
    win = MainWindow(load_checkpoint(tiny_checkpoint), steps=4)
    qtbot.addWidget(win)
    old_net = win.model.net
    devices = []

    def hook(module, inputs, output) -> None:
        devices.append(output.device.type)
        time.sleep(0.02)

    old_net.noise_embedding.register_forward_hook(hook)
    win.steps_spin.setValue(256)
    win.set_image(np.zeros((1, 28, 28), np.float32), "black")
    qtbot.waitUntil(lambda: len(devices) >= 2, timeout=30000)
    win.set_device("meta")
    assert win.device == "meta" and win.model.net is not old_net
    assert next(win.model.net.parameters()).device.type == "meta"
    assert next(old_net.parameters()).device.type == "cpu"  # the old job's network stayed put
    qtbot.waitUntil(lambda: win.runner.running_threads() == 0, timeout=10000)
    assert set(devices) == {"cpu"}
    win.runner.shutdown()


def test_decompression_bomb_is_refused_in_the_projects_words(qtbot, tiny_checkpoint, monkeypatch, tmp_path):
    """A PNG whose header declares 12000x12000 pixels (the file itself is tiny)."""
    from test_main_window import isolate_settings

    from rdc_studio.app.main_window import MainWindow
    from rdc_studio.core.images import MAX_PIXELS
    from rdc_studio.core.models import load_checkpoint

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    isolate_settings(monkeypatch, tmp_path)
    win = MainWindow(load_checkpoint(tiny_checkpoint), steps=4)
    qtbot.addWidget(win)
    errors = []
    win.show_error = lambda title, text: errors.append(text)
    assert not win.open_path(str(bomb))
    assert f"{MAX_PIXELS:,}" in errors[-1] and "bomb.png" in errors[-1]
    assert "DOS" not in errors[-1] and "89478485" not in errors[-1]


def test_long_status_messages_are_elided(qtbot, tiny_checkpoint, monkeypatch, tmp_path):
    from test_main_window import isolate_settings

    from rdc_studio.app.main_window import MainWindow
    from rdc_studio.core.models import load_checkpoint

    isolate_settings(monkeypatch, tmp_path)
    win = MainWindow(load_checkpoint(tiny_checkpoint), steps=4)
    qtbot.addWidget(win)
    win.resize(1024, 700)
    win.show()
    qtbot.wait(50)
    text = "Cannot open image: " + "very long path component/" * 40
    win.show_status(text, 0)
    shown = win.message_label.text()
    assert shown != text and shown.endswith("…") and win.message_label.toolTip() == text
    label_right = win.message_label.geometry().right()
    assert label_right < win.elapsed_label.geometry().left() or not win.elapsed_label.text()


def test_csv_leaves_out_the_estimates_of_eliminated_classes():
    """The plot ends an eliminated class's curve; the export must not report its extrapolation."""
    state = SessionState(["a", "b", "c"])
    state.set_image(np.zeros((1, 2, 2), np.float32), "zeros")
    logits = np.array([[0.0, -1.0, -9.0]])
    step = ClassifyStep(levels_done=2, total_levels=2, sigmas_done=np.ones(2), logits=logits,
                        probabilities=np.exp(logits) / np.exp(logits).sum(), level_errors=np.zeros((1, 2, 3)))
    state.begin_classification()
    state.add_classification([step, step], [np.array([True, True, True]), np.array([True, True, False])])
    rows = [r for r in state.csv_rows() if r[1] == "classify_logit"]
    assert [r[3] for r in rows] == ["a", "b", "c", "a", "b"]


def test_csv_says_which_image_each_result_is_of_and_gives_the_attack_verdict():
    """An attack stays after a new image is opened: its rows name the attacked image, not the new input."""
    from rdc_studio.core.attacks import AttackStep, DefenseOutcome

    state = SessionState(["a", "b"])
    state.set_image(np.zeros((1, 2, 2), np.float32), "first.png")
    state.begin_attack("first.png", of_input=True)
    one = np.ones(1)
    state.add_attack([AttackStep(iteration=1, total_iterations=1, restart=0, loss=one * 2.0, margin=one * -0.5,
                                 prediction=np.array([1]), linf=one * 0.1, l2=one * 0.5,
                                 image=np.zeros((1, 1, 2, 2), np.float32), step_size=one * 0.01)])
    image = np.zeros((1, 1, 2, 2), np.float32)
    state.finish_attack(DefenseOutcome(clean=image, adversarial=image, purified=None, labels=np.array([0]),
                                       attacked_prediction=np.array([1]), defense_probabilities=np.array([[0.3, 0.7]]),
                                       attack_succeeded=np.array([True]), defense_recovered=np.array([False]),
                                       linf=one * 0.1, l2=one * 0.5))
    assert state.attack_is_of_input
    state.set_image(np.ones((1, 2, 2), np.float32), "first.png")  # another image of the same name
    assert not state.attack_is_of_input and state.image_id == "#2 first.png"
    rows = {(r[0], r[1], r[3]): r[4] for r in state.csv_rows()}
    first = "#1 first.png"  # ids tell apart what captions cannot
    assert rows == {(first, "attack_loss", ""): 2.0, (first, "attack_margin", ""): -0.5,
                    (first, "attack_label_known", "a"): 0,
                    (first, "attack_succeeded", "a"): 1, (first, "defense_recovered", "a"): 0,
                    (first, "attack_linf", ""): 0.1, (first, "attack_l2", ""): 0.5,
                    (first, "defense_probability", "a"): 0.3, (first, "defense_probability", "b"): 0.7}
    assert state.results()["attack"]["of_input"] is False and state.results()["attack"]["source"] == "first.png"
