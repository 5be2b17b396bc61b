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


@pytest.mark.parametrize("label", [11, 10, -1])  # 10 = K is the null label's index: not a class
def test_sampler_rejects_bad_label(tiny_net, label):
    assert tiny_net.config.num_classes == 10
    with pytest.raises(ValueError, match="0..9"):
        list(sample(tiny_net, label))


def test_sample_file_names_round_trip():
    from rdc_studio.core.sample import parse_sample_filename, sample_filename

    assert sample_filename(3, 7) == "3-007.png" and sample_filename(None, 12) == "uncond-012.png"
    assert parse_sample_filename("3-007") == (3, 7) and parse_sample_filename(sample_filename(9, 123)[:-4]) == (9, 123)
    assert parse_sample_filename("uncond-012") is None and parse_sample_filename("digit") is None


def test_churn_gamma_is_capped():
    from rdc_studio.core.sample import churn_gamma

    assert churn_gamma(0, 18) == 0 and churn_gamma(1.8, 18) == pytest.approx(0.1)
    assert churn_gamma(40, 18) == pytest.approx(2 ** 0.5 - 1)  # EDM's cap: sigma grows at most by sqrt(2)


def test_churn_is_seeded_and_only_acts_inside_its_range(tiny_net):
    def final(**kw):
        return list(sample(tiny_net, 3, n=2, steps=5, seed=1, **kw))[-1].image

    plain = final()
    assert np.array_equal(final(churn=0.0), plain)  # churn 0 is the deterministic sampler, draw for draw
    churned = final(churn=10.0, churn_range=(0.0, 100.0))
    assert not np.array_equal(churned, plain)
    assert np.array_equal(final(churn=10.0, churn_range=(0.0, 100.0)), churned)  # a seed is still one sample
    assert np.array_equal(final(churn=10.0, churn_range=(200.0, 300.0)), plain)  # no level in range: no churn
    # sigma levels of 5 steps: 80, ~9.7, ~0.9, ~0.04, 0.002; churning the lowest ones only changes the end
    assert not np.array_equal(final(churn=10.0, churn_range=(0.001, 0.05)), plain)


def test_churn_rejects_bad_values(tiny_net):
    with pytest.raises(ValueError):
        list(sample(tiny_net, 3, churn=-1.0))
    with pytest.raises(ValueError):
        list(sample(tiny_net, 3, churn=1.0, churn_range=(1.0, 0.5)))


def test_the_sampler_keeps_to_the_noise_levels_the_network_was_trained_for(tiny_net, monkeypatch):
    """As EDM's sampler: an imported VE network (sigma 0.02-100) is never asked below 0.02."""
    seen = []
    original = tiny_net.denoise

    def recording(x, sigma, heads=None):
        seen.append(float(sigma.flatten()[0]))
        return original(x, sigma, heads=heads)

    monkeypatch.setattr(tiny_net, "denoise", recording)
    list(sample(tiny_net, 3, n=1, steps=6))
    assert min(seen) == pytest.approx(0.002, rel=1e-4) and max(seen) == pytest.approx(80.0)
    seen.clear()
    monkeypatch.setattr(tiny_net, "sigma_min", 0.02, raising=False)  # what the importer records
    monkeypatch.setattr(tiny_net, "sigma_max", 50.0, raising=False)
    list(sample(tiny_net, 3, n=1, steps=6))
    assert min(seen) == pytest.approx(0.02, rel=1e-4) and max(seen) == pytest.approx(50.0)
