"""The window's document without Qt, the worker's result protocol, and the set_device race."""
import struct
import subprocess
import sys
import threading
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


def test_an_error_summary_is_its_first_line_shortened_to_about_two_lines_of_a_verdict():
    long = "CUDA out of memory. Tried to allocate 2.00 GiB " + "x" * 300 + "\nTraceback..."
    summary = SessionState.error_summary(long)
    assert len(summary) == 120 and summary.endswith("\u2026") and summary.startswith("CUDA out of memory.")
    assert SessionState.error_summary("  short\nsecond") == "short"
    assert SessionState.error_summary("") == "" and SessionState.error_summary("\n \n") == ""


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


# -- the attack and the purification in a session file -------------------------------------------------------
CLASSES = [str(i) for i in range(10)]
SHAPE = (1, 4, 4)


def _purify_records(steps: int = 3, finished: bool = True):
    from rdc_studio.core.purify import PurifyStep

    rng = np.random.default_rng(1)
    done = steps if finished else steps - 1
    return [PurifyStep(s, steps, rng.random((1, *SHAPE), dtype=np.float32), rng.random(1, dtype=np.float32),
                       float(np.float32(0.4 + 0.01 * s)), rng.random(1, dtype=np.float32),
                       rng.random(1, dtype=np.float32), rng.standard_normal((1, 10), dtype=np.float32),
                       rng.random(1, dtype=np.float32)) for s in range(done + 1)]


def _outcome(label: int = 3, prediction: int = 5, clean_correct: bool | None = True):
    from rdc_studio.app.jobs import AttackOutcome

    rng = np.random.default_rng(2)
    probs = rng.random((1, 10), dtype=np.float32)
    probs /= probs.sum()
    clean = np.round(rng.random((1, *SHAPE), dtype=np.float32) * 255) / 255
    return AttackOutcome(clean=clean, adversarial=np.clip(clean + 1 / 255, 0, 1), purified=rng.random(
        (1, *SHAPE), dtype=np.float32), labels=np.array([label]), attacked_prediction=np.array([prediction]),
        defense_probabilities=probs, attack_succeeded=np.array([prediction != label]),
        defense_recovered=np.array([int(np.argmax(probs)) == label]), linf=np.array([1 / 255], np.float32),
        l2=np.array([0.0157], np.float32), clean_correct=None if clean_correct is None else np.array([clean_correct]))


def _attack_steps(n: int = 3):
    from rdc_studio.core.attacks import AttackStep

    rng = np.random.default_rng(3)
    return [AttackStep(restart=0, iteration=i, total_iterations=n, loss=rng.standard_normal(1, dtype=np.float32),
                       margin=rng.standard_normal(1, dtype=np.float32), prediction=np.array([i % 10]),
                       linf=np.ones(1, np.float32), l2=np.ones(1, np.float32),
                       image=rng.random((1, *SHAPE), dtype=np.float32), step_size=np.ones(1, np.float32))
            for i in range(1, n + 1)]


def _run_settings(binarize: float | None = None) -> dict:
    from rdc_studio.core.attacks import AttackSettings
    from rdc_studio.core.purify import PurifySettings

    return {"attack": AttackSettings(steps=3, seed=7).to_dict(), "attack_gradient": "smooth",
            "attack_binarize": binarize, "purify": PurifySettings(steps=3).to_dict()}


def _state_with_traces(finished: bool = True, known_class: int | None = 3) -> SessionState:
    """An input attacked and purified (``finished``: both ran to the end)."""
    from rdc_studio.core.purify import PurifySettings

    state = SessionState(CLASSES)
    state.set_image(np.full(SHAPE, 0.5, np.float32), "digit.png", known_class=known_class)
    outcome = _outcome(label=3 if known_class is None else known_class)
    state.begin_attack("digit.png", _run_settings(0.5), known_class, of_input=True, image=outcome.clean[0])
    state.add_attack(_attack_steps())
    if finished:
        state.finish_attack(outcome)
    state.begin_purification("digit.png", PurifySettings(steps=3).to_dict(), known_class, of_input=True)
    state.add_purification(_purify_records(finished=finished))
    if finished:
        state.finish_purification()
    return state


def _equal(a, b) -> bool:
    """Dataclasses, lists and arrays equal field by field, arrays bit for bit with their dtype."""
    import dataclasses

    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_equal(getattr(a, f.name), getattr(b, f.name))
                                           for f in dataclasses.fields(a))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _reopened(state: SessionState, results: dict | None = None) -> SessionState:
    """``state``'s results through JSON into a fresh state of the same image (as a window reopens a session)."""
    import json

    from rdc_studio.app.session_state import saved_results

    saved = saved_results(json.loads(json.dumps(results if results is not None else state.results())), CLASSES, SHAPE)
    other = SessionState(CLASSES)
    other.set_image(state.image, state.image_source, known_class=state.image_known_class)
    other.restore(saved)
    return other


@pytest.mark.parametrize("finished", [True, False])
def test_attack_and_purification_round_trip_through_a_session_exactly(finished):
    state = _state_with_traces(finished)
    other = _reopened(state)
    assert _equal(other.attack, state.attack) and _equal(other.purification, state.purification)
    assert other.attack_is_of_input and other.purification_is_of_input
    assert other.csv_rows() == state.csv_rows()
    assert other.results() == state.results()  # saved again, the same session
    assert (other.attack.outcome is None) == (not finished) and other.purification.finished == finished
    if not finished:  # a stopped attack keeps its attacked image and its latest iterate
        assert other.attack.latest is not None and other.attack.image is not None
    else:
        from rdc_studio.app.jobs import AttackOutcome

        assert isinstance(other.attack.outcome, AttackOutcome) and other.attack.latest is None
        assert other.results()["attack"] == state.results()["attack"]


def test_restoring_notifies_once_and_counts_the_traces_of_the_sessions_image_as_of_this_input():
    import json

    from rdc_studio.app.session_state import saved_results

    state = _state_with_traces()
    results = json.loads(json.dumps(state.results()))
    other = SessionState(CLASSES)
    other.set_image(np.zeros(SHAPE, np.float32), "earlier")
    other.set_image(state.image, "digit.png")  # the window's second input: another id than in the saving window
    events = []
    other.subscribe(events.append)
    other.restore(saved_results(results, CLASSES, SHAPE))
    assert events == ["restored"]
    assert other.attack.image_id == other.purification.image_id == "#2 digit.png" == other.image_id
    assert other.attack_is_of_input and other.purification_is_of_input
    assert {r[0] for r in other.csv_rows()} == {"#2 digit.png"}
    other.set_image(np.ones(SHAPE, np.float32), "next")  # a new input: the restored results are of an earlier one
    assert not other.attack_is_of_input and not other.purification_is_of_input
    # a session without traces (an older one) changes nothing and says nothing
    events.clear()
    kept = other.attack
    other.restore(saved_results({"probabilities": [0.1] * 10, "attack": results["attack"]}, CLASSES, SHAPE))
    assert events == [] and other.attack is kept


def test_a_restored_trace_of_another_image_keeps_its_id_unless_this_window_gave_it_to_its_input():
    state = _state_with_traces()
    state.set_image(np.zeros(SHAPE, np.float32), "digit.png")  # "#2 digit.png": the traces are of "#1 digit.png"
    results = state.results()
    assert results["attack_trace"]["of_input"] is False and results["attack"]["of_input"] is False
    other = _reopened(state)  # the fresh state's input is "#1 digit.png" too
    assert not other.attack_is_of_input and not other.purification_is_of_input
    assert other.attack.image_id == other.purification.image_id == "#1 digit.png (from the session)"
    assert other.image_id == "#1 digit.png"
    third = SessionState(CLASSES)
    third.set_image(np.zeros(SHAPE, np.float32), "a")
    third.set_image(np.zeros(SHAPE, np.float32), "b")
    from rdc_studio.app.session_state import saved_results

    third.restore(saved_results(results, CLASSES, SHAPE))
    assert third.attack.image_id == "#1 digit.png" and third.attack.path == ""


def _bad(results: dict, path: list, value) -> dict:
    import copy

    bad = copy.deepcopy(results)
    target = bad
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return bad


def _array(shape, fill: float = 0.5) -> dict:
    from rdc_studio.core.session import encode_array

    return encode_array(np.full(shape, fill, np.float32))


@pytest.mark.parametrize("path,value,message", [
    (["attack_trace"], [1], "saved attack must be an object"),
    (["attack_trace", "iterations"], "1,2,3", "iterations must be a list"),
    (["attack_trace", "iterations"], [1, 1.5, 3], "whole numbers"),
    (["attack_trace", "iterations"], [3, 2, 1], "iterations must increase"),
    (["attack_trace", "loss"], _array((2,)), "loss has shape \\(2,\\), not \\(3,\\)"),
    (["attack_trace", "margin"], _array((4,)), "margin has shape \\(4,\\), not \\(3,\\)"),
    (["attack_trace", "margin"], {"dtype": "float32", "shape": [-1], "data_b64": ""}, "shape must be a list"),
    (["attack_trace", "loss"], {"dtype": "float64", "shape": [3], "data_b64": ""}, "only float32"),
    (["attack_trace", "outcome", "adversarial"], _array((1, 1, 5, 5)), "adversarial image has shape"),
    (["attack_trace", "outcome", "clean"], _array((1, *SHAPE), 2.0), "clean image must lie in \\[0, 1\\]"),
    (["attack_trace", "outcome", "purified"], _array((1, *SHAPE), np.inf), "purified image holds values"),
    (["attack_trace", "outcome", "defense_probabilities"], _array((1, 3), 1 / 3), "probabilities has shape"),
    (["attack_trace", "outcome", "defense_probabilities"], _array((1, 10), 0.5), "do not sum to 1"),
    (["attack_trace", "outcome", "labels"], [10], "labels must hold whole numbers in 0-9"),
    (["attack_trace", "outcome", "labels"], [True], "labels must hold whole numbers"),
    (["attack_trace", "outcome", "attacked_prediction"], [3, 4], "must be a list of 1"),
    (["attack_trace", "outcome", "attack_succeeded"], ["yes"], "true/false"),
    (["attack_trace", "outcome", "attack_succeeded"], [False], "contradicts"),
    (["attack_trace", "outcome", "linf"], _array((1,), -1.0), "linf distance must lie in"),
    (["attack_trace", "outcome", "labels"], KeyError, "verdict lacks 'labels'"),
    (["attack_trace", "outcome"], "verdict", "verdict must be an object"),
    (["attack_trace", "known_class"], 4, "label 3 is not its known class 4"),
    (["attack_trace", "known_class"], 12, "known_class must be a class index in 0-9"),
    (["attack_trace", "source"], 5, "source must be text"),
    (["attack_trace", "image_id"], "x" * 5000, "image_id must be text of at most"),
    (["attack_trace", "of_input"], "yes", "of_input must be true or false"),
    (["attack_trace", "error"], "RuntimeError: boom", "has both a verdict and an error"),
    (["attack_trace", "error"], ["boom"], "error must be text"),
    (["purification_trace", "error"], "RuntimeError: boom", "marked both finished and failed"),
    (["attack_trace", "settings", "attack", "eps"], "big", "settings are unusable"),
    (["attack_trace", "settings", "attack_gradient"], "magic", "attack_gradient must be one of"),
    (["attack_trace", "settings", "attack_binarize"], 2.0, "settings are unusable"),
    (["attack_trace", "settings", "purify"], None, "purification settings must be an object"),
    (["purification_trace"], "steps", "saved purification must be an object"),
    (["purification_trace", "steps", "image"], _array((4, 1, 1, 5, 5)), "images has shape"),
    (["purification_trace", "steps", "image"], _array((4, 1, *SHAPE), -0.5), "images must lie in"),
    (["purification_trace", "steps", "logits"], _array((4, 1, 9)),
     "logits has shape \\(4, 1, 9\\), not \\(4, 1, 10\\)"),
    (["purification_trace", "steps", "objective"], _array((4, 2)), "objective has shape"),
    (["purification_trace", "steps", "logits"], None, "logits must be an array object"),
    (["purification_trace", "steps", "step"], [0, 2, 1, 3], "must increase"),
    (["purification_trace", "steps", "step"], [], "holds no step"),
    (["purification_trace", "steps", "total_steps"], [3, 3, 3, 2], "must increase, within one total"),
    (["purification_trace", "steps", "sigma"], KeyError, "steps lack 'sigma'"),
    (["purification_trace", "finished"], 1, "finished must be true or false"),
    (["purification_trace", "settings", "steps"], 5, "settings say 5 steps, its records 3"),
    (["purification_trace", "settings", "eta"], "wide", "purification settings are unusable"),
    (["purification_trace", "known_class"], -1, "known_class must be a class index"),
])
def test_a_malformed_saved_trace_is_one_clear_error(path, value, message):
    from rdc_studio.app.session_state import saved_results
    from rdc_studio.core.session import SessionError

    results = _state_with_traces().results()
    with pytest.raises(SessionError, match=message):
        saved_results(_bad(results, path, value), CLASSES, SHAPE)


def test_curves_that_were_drawn_reopen_even_if_not_finite():
    """A loss, margin, objective or logit that was inf or NaN was drawn when the run made it: the
    session that saved it must open again (images, distances and probabilities stay checked)."""
    from rdc_studio.app.session_state import saved_results

    results = _state_with_traces().results()
    for path in (["attack_trace", "margin"], ["attack_trace", "loss"]):
        results = _bad(results, path, _array((3,), np.nan))
    for path, shape in ((["purification_trace", "steps", "objective"], (4, 1)),
                        (["purification_trace", "steps", "logits"], (4, 1, 10))):
        results = _bad(results, path, _array(shape, -np.inf))
    saved = saved_results(results, CLASSES, SHAPE)
    assert np.isnan(saved.attack.margin).all() and np.isnan(saved.attack.loss).all()
    assert np.isneginf(saved.purification.records[0].logits).all()


def test_a_saved_trace_of_another_model_or_of_too_many_steps_is_refused(monkeypatch):
    import rdc_studio.core.session as session_module
    from rdc_studio.app.session_state import saved_results
    from rdc_studio.core.session import SessionError

    results = _state_with_traces().results()
    with pytest.raises(SessionError, match="probabilities has shape \\(1, 10\\), not \\(1, 2\\)"):
        saved_results(results, ["a", "b"], SHAPE)  # another model's classes
    with pytest.raises(SessionError, match="has shape \\(1, 1, 4, 4\\), not \\(1, 3, 4, 4\\)"):
        saved_results(results, CLASSES, (3, 4, 4))  # another model's input
    monkeypatch.setattr(session_module, "MAX_TRACE_LENGTH", 2)
    with pytest.raises(SessionError, match="holds 3 entries, more than the 2 allowed"):
        saved_results(results, CLASSES, SHAPE)
    with pytest.raises(SessionError, match="results must be an object"):
        saved_results([1], CLASSES, SHAPE)


def test_a_stopped_attack_without_iterations_or_a_purification_without_logits_is_not_saved():
    from rdc_studio.core.purify import PurifyStep

    state = SessionState(CLASSES)
    state.set_image(np.zeros(SHAPE, np.float32), "x")
    state.begin_attack("x", of_input=True)
    state.begin_purification("x", of_input=True)
    state.add_purification([PurifyStep(0, 1, np.zeros((1, *SHAPE), np.float32), np.ones(1, np.float32), 0.5,
                                       np.zeros(1, np.float32), np.zeros(1, np.float32))])
    assert "attack_trace" not in state.results() and "purification_trace" not in state.results()



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


def test_garbage_collection_stays_on_the_gui_thread_while_a_worker_runs(qtbot):
    # A collection started by a worker thread can free a closed window's Qt objects off
    # the GUI thread and deadlock PySide; while a worker runs, the GUI thread collects.
    import gc

    from rdc_studio.app.worker import JobRunner, wait_for_workers

    assert wait_for_workers(10000) and gc.isenabled()  # no worker of an earlier test left running
    runner = JobRunner()
    release = threading.Event()
    seen_in_worker = []

    def job(cancelled):
        seen_in_worker.append(gc.isenabled())
        release.wait(10)
        yield None
        return "done"

    with qtbot.waitSignal(runner.drained, timeout=10000):
        runner.start(job)
        qtbot.waitUntil(lambda: bool(seen_in_worker), timeout=10000)
        assert not gc.isenabled()
        collected_before = gc.get_stats()[0]["collections"]
        kept = [[] for _ in range(gc.get_threshold()[0] + 10)]  # past the collection threshold
        qtbot.waitUntil(lambda: gc.get_stats()[0]["collections"] > collected_before, timeout=10000)
        del kept
        release.set()
    assert seen_in_worker == [False] and gc.isenabled()

    runner.start(lambda cancelled: release.wait(10))  # shutdown also turns it back on
    assert not gc.isenabled()
    assert runner.shutdown(10000)
    assert gc.isenabled()


def test_garbage_collection_comes_back_on_without_a_finished_slot(qtbot):
    """A runner deleted before its thread's queued ``finished`` arrived never reports the end:
    the GUI thread's collection timer then turns automatic collection back on by itself."""
    import gc

    from rdc_studio.app.worker import _COLLECTION, live_workers, wait_for_workers

    assert wait_for_workers(10000) and live_workers() == 0
    _COLLECTION.workers_started()  # as if a worker had started and its end was never reported
    assert not gc.isenabled()
    qtbot.waitUntil(gc.isenabled, timeout=10000)


def test_a_finished_thread_of_a_deleted_runner_is_forgotten(qtbot):
    """A runner deleted before its thread's queued ``finished`` arrived never discards the
    thread from the live set; the next look at the live workers does."""
    from shiboken6 import isValid as shiboken_valid

    from rdc_studio.app import worker

    assert worker.wait_for_workers(10000) and worker.live_workers() == 0
    runner = worker.JobRunner()
    release = threading.Event()
    runner.start(lambda cancelled: release.wait(10))
    (thread,) = runner._threads.values()
    with worker._LIVE_LOCK:
        assert thread in worker._LIVE
    runner.deleteLater()
    qtbot.waitUntil(lambda: not shiboken_valid(runner), timeout=10000)  # the runner is gone
    release.set()
    assert thread.wait(10000)
    assert worker.live_workers() == 0
    with worker._LIVE_LOCK:
        assert thread not in worker._LIVE


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
