"""The checks of numeric settings shared by every settings record."""
import math

import numpy as np
import pytest

from rdc_studio.core.attacks import AttackSettings
from rdc_studio.core.choices import real_number, whole_number
from rdc_studio.core.purify import PurifySettings


def test_whole_number_takes_plain_and_numpy_integers_and_returns_plain_ints():
    assert whole_number("k", 3, 1, 5) == 3
    value = whole_number("k", np.int64(4), 1, 5)
    assert value == 4 and type(value) is int
    assert whole_number("k", 10**12, 0) == 10**12


@pytest.mark.parametrize("value,message", [
    (True, "k must be a whole number in 1-5, not True"), (2.0, "not 2.0"), ("3", "not '3'"), (None, "not None"),
    (0, "in 1-5, not 0"), (6, "in 1-5, not 6"), (np.float32(2), "not"),
])
def test_whole_number_refuses_bools_floats_strings_and_out_of_range_values(value, message):
    with pytest.raises(ValueError, match=message):
        whole_number("k", value, 1, 5)
    with pytest.raises(ValueError, match="of at least 7"):
        whole_number("k", 6, 7)


def test_real_number_bounds_and_messages():
    assert real_number("x", np.float32(0.5), 0, 1) == 0.5 and type(real_number("x", 1, 0)) is float
    assert real_number("x", 0, 0) == 0.0
    for value in (0, -1, math.inf, math.nan, True, "1", None):
        with pytest.raises(ValueError, match="x must be a positive number"):
            real_number("x", value, above=True)
    with pytest.raises(ValueError, match="x must be a number of at least 0, not -0.1"):
        real_number("x", -0.1, 0)
    with pytest.raises(ValueError, match="x must be a number from 0 to 1, not 1.5"):
        real_number("x", 1.5, 0, 1)
    with pytest.raises(ValueError, match="x must be a number above 0 and at most 1, not 0"):
        real_number("x", 0, 0, 1, above=True)


@pytest.mark.parametrize("change,message", [
    ({"steps": 2.5}, "steps must be a whole number"), ({"steps": "5"}, "steps must be a whole number"),
    ({"steps": True}, "steps must be a whole number"), ({"eta": "8/255"}, "eta must be a number of at least 0"),
    ({"step_size": math.nan}, "step_size must be a number"), ({"sigma_lo": 0}, "sigma_lo must be a positive number"),
    ({"sigma_lo": 0.7, "sigma_hi": 0.5}, "need sigma_lo <= sigma_hi, not 0.7 > 0.5"),
    ({"momentum": -1}, "momentum must be a number of at least 0"), ({"noise_seed": -1}, "noise_seed"),
    ({"eta": 8}, "write grey levels as a fraction"),
])
def test_purify_settings_refuse_values_of_the_wrong_kind(change, message):
    with pytest.raises(ValueError, match=message):
        PurifySettings(**change)


def test_settings_keep_plain_numbers_for_json():
    s = PurifySettings(steps=np.int64(3), eta=np.float32(0.25))
    assert type(s.steps) is int and type(s.eta) is float
    a = AttackSettings(steps=np.int32(7), eps=np.float64(0.1), target=np.int64(2))
    assert type(a.steps) is int and type(a.eps) is float and type(a.target) is int


@pytest.mark.parametrize("change,message", [
    ({"steps": 0}, "steps must be a whole number in 1-"), ({"restarts": 1.5}, "restarts must be a whole number"),
    ({"eot": "2"}, "eot must be a whole number"), ({"eps": "0.3"}, "eps must be a number of at least 0"),
    ({"eps": -0.1}, "eps must be a number"), ({"step_size": 0}, "the step size must be a positive number"),
    ({"p_init": 0}, "p_init must be a number above 0 and at most 1"), ({"target_rank": 0}, "target_rank"),
    ({"target": -1}, "target must be a whole number"), ({"seed": "abc"}, "seed must be a whole number"),
    ({"eps": 2}, "exceeds the whole pixel range"),
])
def test_attack_settings_refuse_values_of_the_wrong_kind(change, message):
    with pytest.raises(ValueError, match=message):
        AttackSettings(**change)
