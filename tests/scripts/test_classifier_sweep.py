"""scripts/classifier_sweep.py replays the deployed classifier's elimination exactly."""
import importlib.util
from pathlib import Path

import pytest
import torch

from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("classifier_sweep", ROOT / "scripts" / "classifier_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("screen,keep", [(0, 0), (2, 3), (3, 1), (5, 9)])
def test_replay_matches_the_classifier(tiny_net, screen, keep):
    sweep = _load_script()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    settings = ClassifierSettings(steps=6, noise_seed=3, screen_levels=screen, keep_classes=keep)
    clf = DiffusionClassifier(tiny_net, settings)
    with torch.no_grad():
        deployed = clf(x)
        err = clf.level_errors(x, range(6), clf.noise_bank)
    replayed = sweep.replay_elimination(err, clf.weights, screen, keep)
    assert torch.allclose(replayed, deployed, rtol=1e-5, atol=1e-3)
