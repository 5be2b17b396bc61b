import numpy as np
import pytest
import torch

from rdc_studio.core.sample import karras_sigmas, sample


def test_karras_sigmas():
    s = karras_sigmas(18)
    assert s.shape == (19,) and s[-1] == 0
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002, rel=1e-4)
    assert torch.all(s[:-1] > s[1:])


def test_sampler_records_and_determinism(tiny_net):
    recs = list(sample(tiny_net, 3, n=2, steps=5, seed=1))
    assert [r.step for r in recs] == [1, 2, 3, 4, 5]
    final = recs[-1].image
    assert final.shape == (2, 1, 28, 28) and final.min() >= 0 and final.max() <= 1
    again = list(sample(tiny_net, 3, n=2, steps=5, seed=1))[-1].image
    assert np.array_equal(final, again)
    other = list(sample(tiny_net, 4, n=2, steps=5, seed=1))[-1].image
    assert not np.array_equal(final, other)  # another head, another sample
    assert len(list(sample(tiny_net, None, n=1, steps=3))) == 3


def test_sampler_rejects_bad_label(tiny_net):
    with pytest.raises(ValueError):
        list(sample(tiny_net, 11))


def test_sample_file_names_round_trip():
    from rdc_studio.core.sample import parse_sample_filename, sample_filename

    assert sample_filename(3, 7) == "3-007.png" and sample_filename(None, 12) == "uncond-012.png"
    assert parse_sample_filename("3-007") == (3, 7) and parse_sample_filename(sample_filename(9, 123)[:-4]) == (9, 123)
    assert parse_sample_filename("uncond-012") is None and parse_sample_filename("digit") is None
