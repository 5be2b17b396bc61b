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


@pytest.mark.parametrize("content,match", [("not json", "cannot read"), ('{"format": "other"}', "not an RDC"),
                                           ('{"format": "rdc-studio/session", "model": "m"}', "lacks"),
                                           ('{"format": "rdc-studio/session", "model": "m", "classifier": {}, '
                                            '"image": {"dtype": "uint8"}}', "invalid image")])
def test_bad_session_files(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(SessionError, match=match):
        load_session(p)
