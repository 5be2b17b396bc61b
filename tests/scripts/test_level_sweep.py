"""scripts/level_sweep.py: the held-out comparison of per-level weightings and the errors cache."""
import importlib.util
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("level_sweep", ROOT / "scripts" / "level_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_errors(n: int = 400, levels: int = 6, k: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Errors where the true class is lower by 1 at every level, but level 0 carries noise
    of scale 20 and the others of scale 1: equal weights drown in level 0, 1/sd does not."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, k, (n,), generator=gen)
    scale = torch.ones(levels)
    scale[0] = 20.0
    err = 10.0 + torch.randn(n, levels, k, generator=gen) * scale.view(1, -1, 1)
    err[torch.arange(n), :, labels] -= 1.0
    sigmas = torch.logspace(0, 1, levels)
    return err, labels, sigmas


def test_weights_cross_validation_finds_the_noisy_level(sweep):
    err, labels, sigmas = synthetic_errors()
    [row] = sweep.weights_cross_validation(err, labels, sigmas, [(1.0, 10.0)])
    assert row["levels"] == 6 and row["weighting"] == "edm"
    assert row["1/sd"] > row["equal"] + 0.1 and row["fitted"] > row["equal"] + 0.1
    # fitted weights put (almost) nothing on the noisy level
    mask = torch.ones(6, dtype=torch.float64)
    w = sweep.fit_level_weights(err.double(), labels, mask, torch.ones(6, dtype=torch.float64))
    assert w[0] < 0.1 * w[1:].min()
    # a range with fewer than two levels is skipped
    assert sweep.weights_cross_validation(err, labels, sigmas, [(1.0, 1.2)]) == []


def test_errors_cache_is_reused_only_for_the_same_settings(sweep, tmp_path, monkeypatch):
    calls = []

    def fake_dense(net, images, sigmas, seed, batch):
        calls.append(seed)
        return torch.full((images.shape[0], len(sigmas), 10), float(seed))

    monkeypatch.setattr(sweep, "dense_errors", fake_dense)
    model = types.SimpleNamespace(path=Path("m.safetensors"), net=None)
    images, labels, sigmas = torch.zeros(3, 1, 28, 28), torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0])
    args = types.SimpleNamespace(split="val", seed=0, batch=2)
    cache = tmp_path / "cache" / "errors.pt"
    first = sweep.cached_errors(str(cache), model, images, labels, sigmas, args)
    again = sweep.cached_errors(str(cache), model, images, labels, sigmas, args)
    assert calls == [0] and torch.equal(first, again) and cache.exists()
    assert not list(cache.parent.glob("*.tmp"))
    with pytest.raises(SystemExit, match="other settings"):
        sweep.cached_errors(str(cache), model, images, labels, sigmas, types.SimpleNamespace(split="val", seed=1,
                                                                                             batch=2))
    assert sweep.cached_errors(None, model, images, labels, sigmas, args).shape == (3, 2, 10)
