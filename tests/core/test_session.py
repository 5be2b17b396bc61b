import json

import numpy as np
import pytest

from rdc_studio.core.session import SessionError, decode_array, encode_array, load_session, make_session, save_session


def test_array_round_trip_is_exact():
    a = np.random.default_rng(0).random((1, 28, 28)).astype(np.float32)
    assert np.array_equal(decode_array(json.loads(json.dumps(encode_array(a)))), a)


def test_session_round_trip(tmp_path):
    img = np.full((1, 4, 4), 0.25, np.float32)
    s = make_session("m.safetensors", img, "x.png", {"steps": 3}, {"seed": 1}, {"eta": 0.1}, {"probabilities": [1.0]})
    save_session(tmp_path / "s.json", s)
    back = load_session(tmp_path / "s.json")
    assert np.array_equal(back["image_array"], img) and back["classifier"] == {"steps": 3}


@pytest.mark.parametrize("content,match", [("not json", "session file is not valid JSON"), ('{"format": "other"}', "not an RDC"),
                                           ('{"format": "rdc-studio/session", "model": "m"}', "lacks"),
                                           ('{"format": "rdc-studio/session", "model": "m", "classifier": {}, '
                                            '"image": {"dtype": "uint8"}}', "invalid image")])
def test_bad_session_files(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(SessionError, match=match):
        load_session(p)


def _session_file(tmp_path, **changes):
    import json

    img = np.full((1, 2, 2), 0.5, np.float32)
    s = make_session("m.safetensors", img, "x.png", {"steps": 3}, {"seed": 1, "eps": 0.3}, {"eta": 0.1}, {})
    path = tmp_path / "s.json"
    path.write_text(json.dumps(s | changes))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"model": 5}, "'model' must be a model name or path"),
    ({"classifier": [1, 2]}, "'classifier' must be an object"),
    ({"attack": [1]}, "'attack' must be an object"),
    ({"results": [1]}, "'results' must be an object"),
    ({"attack_gradient": 5}, "'attack_gradient' must be a name"),
    ({"attack_binarize": "half"}, "'attack_binarize' must be a number"),
    ({"image": "x"}, "'image' must be an object"),
    ({"image": {"dtype": "float32", "shape": [1, 2, 2], "data_b64": "%%%"}}, "invalid image"),
])
def test_a_session_of_wrong_types_is_refused_when_read(tmp_path, changes, message):
    with pytest.raises(SessionError, match=message):
        load_session(_session_file(tmp_path, **changes))


def test_a_session_image_outside_0_1_or_not_finite_is_refused(tmp_path):
    from rdc_studio.core.session import encode_array

    for bad in (np.full((1, 2, 2), np.nan, np.float32), np.full((1, 2, 2), 5.0, np.float32),
                np.zeros((2, 2), np.float32)):
        with pytest.raises(SessionError, match="values in \\[0, 1\\]"):
            load_session(_session_file(tmp_path, image=dict(encode_array(bad), source="x")))


@pytest.mark.parametrize("changes,message", [
    ({"classifier": {"steps": "abc"}}, "steps must be a whole number"),
    ({"classifier": {"sigma_min": "abc"}}, "sigma_min must be a positive number"),
    ({"classifier": {"preset": ["x"]}}, "preset must be a name"),
    ({"attack": {"eps": "big"}}, "unusable"),
    ({"purify": {"eta": 5}}, "unusable"),
])
def test_unusable_session_settings_are_one_error_and_unknown_keys_are_left_out(tmp_path, changes, message):
    from rdc_studio.core.session import session_settings

    with pytest.raises(SessionError, match=message):
        session_settings(load_session(_session_file(tmp_path, **changes)))
    classifier, attack, purify = session_settings(load_session(_session_file(
        tmp_path, classifier={"steps": 3, "later": 1}, attack={"seed": 1, "later": 1}, purify={"eta": 0.1, "x": 2})))
    assert classifier == {"steps": 3} and attack["seed"] == 1 and "later" not in attack and purify["eta"] == 0.1


def test_a_session_path_that_is_missing_a_folder_or_a_device_is_one_clear_error(tmp_path):
    import os

    with pytest.raises(SessionError, match="no such file"):
        load_session(tmp_path / "none.json")
    with pytest.raises(SessionError, match="not a regular file"):
        load_session(tmp_path)
    if os.path.exists("/dev/zero"):
        (tmp_path / "z.json").symlink_to("/dev/zero")
        with pytest.raises(SessionError, match="not a regular file"):
            load_session(tmp_path / "z.json")


def test_an_array_of_a_negative_or_non_integer_shape_is_refused():
    for shape in ([-1], [1.5, 2], "4", None):
        with pytest.raises(ValueError, match="shape must be a list of whole numbers"):
            decode_array({"dtype": "float32", "shape": shape, "data_b64": encode_array(np.zeros(4))["data_b64"]})


def test_a_defense_outcome_and_purify_steps_round_trip_exactly_and_are_checked():
    import dataclasses

    from rdc_studio.core.attacks import DefenseOutcome
    from rdc_studio.core.purify import PurifyStep
    from rdc_studio.core.session import (SessionError, decode_outcome, decode_purify_steps, encode_outcome,
                                         encode_purify_steps)

    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 4, 4), dtype=np.float32)
    probs = np.array([[0.2, 0.7, 0.1]], np.float32)
    outcome = DefenseOutcome(clean=image, adversarial=image[:, ::-1].copy(), purified=None, labels=np.array([1]),
                             attacked_prediction=np.array([2]), defense_probabilities=probs,
                             attack_succeeded=np.array([True]), defense_recovered=np.array([True]),
                             linf=np.array([0.25], np.float32), l2=np.array([1.5], np.float32))
    back = decode_outcome(json.loads(json.dumps(encode_outcome(outcome))), 3, (3, 4, 4))
    assert type(back) is DefenseOutcome
    for field in dataclasses.fields(DefenseOutcome):
        a, b = getattr(outcome, field.name), getattr(back, field.name)
        assert (a is None and b is None) or (a.dtype == b.dtype and a.tobytes() == b.tobytes()), field.name
    with pytest.raises(SessionError, match="probabilities has shape \\(1, 3\\), not \\(1, 10\\)"):
        decode_outcome(encode_outcome(outcome), 10, (3, 4, 4))
    records = [PurifyStep(s, 2, rng.random((1, 3, 4, 4), dtype=np.float32), rng.random(1, dtype=np.float32),
                          float(np.float32(0.45)), rng.random(1, dtype=np.float32), rng.random(1, dtype=np.float32),
                          rng.standard_normal((1, 3), dtype=np.float32), rng.random(1, dtype=np.float32))
               for s in range(3)]
    steps = decode_purify_steps(json.loads(json.dumps(encode_purify_steps(records))), 3, (3, 4, 4))
    for a, b in zip(records, steps, strict=True):
        for field in dataclasses.fields(PurifyStep):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert (x.dtype == y.dtype and x.tobytes() == y.tobytes()) if isinstance(x, np.ndarray) else x == y
    with pytest.raises(ValueError, match="logits and objective estimate"):
        encode_purify_steps([dataclasses.replace(records[0], logits=None)])
    with pytest.raises(SessionError, match="images has shape"):
        decode_purify_steps(encode_purify_steps(records), 3, (1, 4, 4))


def test_a_session_with_an_empty_image_is_refused_as_a_session_error(tmp_path):
    import json

    import numpy as np
    import pytest

    from rdc_studio.core.session import SessionError, encode_array, load_session, make_session

    session = make_session("m", np.zeros((1, 4, 4), np.float32), "x", {}, {}, {}, {})
    session["image"] |= encode_array(np.zeros((1, 0, 4), np.float32))
    (tmp_path / "s.json").write_text(json.dumps(session))
    with pytest.raises(SessionError, match="non-empty"):
        load_session(tmp_path / "s.json")
