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


def test_sweep_reports_each_level_alone(tiny_checkpoint, tmp_path):
    from rdc_studio.core.data import mnist_available

    if not mnist_available():
        pytest.skip("MNIST not available")
    import json

    sweep = _load_script()
    out = tmp_path / "sweep.json"
    assert sweep.main(["--model", str(tiny_checkpoint), "--n", "6", "--levels", "3", "--grid", "log",
                       "--sigma-min", "0.2", "--sigma-max", "10", "--screen", "1", "--keep", "2",
                       "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["screen_levels"], r["keep_classes"]) for r in report["results"]] == [(0, 0), (1, 2)]
    levels = report["results"][0]["per_level"]
    sigmas = [lv["sigma"] for lv in levels]
    assert len(sigmas) == 3 and 0.2 <= sigmas[0] < sigmas[1] < sigmas[2] <= 10
    assert all(lv["accuracy"] * 6 == pytest.approx(round(lv["accuracy"] * 6)) for lv in levels)  # k of 6 digits


def test_sweep_device_option(tiny_checkpoint, tmp_path, capsys):
    from rdc_studio.core.data import mnist_available

    if not mnist_available():
        pytest.skip("MNIST not available")
    import json

    sweep = _load_script()
    common = ["--model", str(tiny_checkpoint), "--n", "4", "--levels", "2", "--grid", "log", "--sigma-min", "1",
              "--sigma-max", "10", "--screen", "1", "--keep", "2", "--threads", "1"]
    reports = []
    for device in ("cpu", "auto"):
        out = tmp_path / f"{device}.json"
        assert sweep.main(common + ["--device", device, "--json", str(out)]) == 0
        reports.append([(r["accuracy"], r["per_level"]) for r in json.loads(out.read_text())["results"]])
    if not torch.cuda.is_available():
        assert reports[0] == reports[1]  # auto is the CPU here
        with pytest.raises(SystemExit) as exc:
            sweep.main(common + ["--device", "cuda"])
        assert exc.value.code == 2 and "--device cuda" in capsys.readouterr().err
