"""The named presets (the RDC paper's settings, the released code's, a fast one): their
values, the quadrature and purification pieces they need, and that every front end applies
and records them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rdc_studio.core.choices import PRESETS as PRESET_NAMES
from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier, build_classifier, classifier_settings
from rdc_studio.core.defense import purify_settings
from rdc_studio.core.diffusion import P_MEAN, P_STD, SIGMA_DATA, noise_grid, uniform_grid
from rdc_studio.core.models import load_checkpoint
from rdc_studio.core.presets import PRESETS, get_preset
from rdc_studio.core.purify import LikelihoodMaximizer, PurifySettings


# -- the values, pinned ------------------------------------------------------------------

def test_preset_names_agree_with_the_torch_free_choices() -> None:
    assert tuple(PRESETS) == PRESET_NAMES == ("paper", "paper-code", "fast")


def test_paper_preset_values() -> None:
    p = get_preset("paper")
    assert p.classifier == {"steps": 125, "grid": "quantile", "weighting": "edm", "sigma_min": 0.002,
                            "sigma_max": 80.0, "reduction": "sum", "mode": "deterministic",
                            "screen_levels": 0, "keep_classes": 0}
    assert p.purify == {"eta": 8 / 255, "steps": 5, "step_size": 0.05, "optimizer": "sign", "momentum": 1.0,
                        "sigma_lo": 0.4, "sigma_hi": 0.6, "score": "uncond", "mode": "deterministic"}
    assert "ICML 2024" in p.source and "Algorithm 1" in p.source


def test_paper_code_preset_values() -> None:
    p = get_preset("paper-code")
    assert p.classifier == {"steps": 125, "grid": "uniform", "weighting": "edm", "sigma_min": 1e-4,
                            "sigma_max": 3.0, "reduction": "mean", "mode": "deterministic",
                            "screen_levels": 0, "keep_classes": 0}
    # Adam, lr 0.1 in the network's [-1, 1] units = 0.05 in pixel units; the never-binding
    # l2 clamp replaced by the method's l-inf ball of 8/255
    assert p.purify == {"eta": 8 / 255, "steps": 5, "step_size": 0.05, "optimizer": "adam", "momentum": 0.0,
                        "sigma_lo": 0.4, "sigma_hi": 0.6, "score": "uncond", "mode": "deterministic"}
    for cited in ("huanranchen/DiffusionClassifier", "EDMDC.py", "EDMLM.py", "RDCN+TK.py"):
        assert cited in p.source


def test_fast_preset_is_the_paper_preset_with_sixteen_levels() -> None:
    fast, paper = get_preset("fast"), get_preset("paper")
    assert fast.classifier == {**paper.classifier, "steps": 16}
    assert fast.purify == paper.purify


def test_every_preset_builds_valid_settings() -> None:
    for p in PRESETS.values():
        assert ClassifierSettings.from_dict(p.classifier).steps == p.classifier["steps"]
        assert PurifySettings(**p.purify).eta == pytest.approx(8 / 255)


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown preset 'papr'; known presets: paper, paper-code, fast"):
        get_preset("papr")


# -- the quadrature of the released code, with its density fixed ----------------------------

def test_uniform_grid_is_the_released_codes_euler_sum_with_the_correct_density() -> None:
    grid = uniform_grid(125, "edm", 1e-4, 3.0)
    edges = np.linspace(1e-4, 3.0, 126)  # torch.linspace(1e-4, 3, 126) in the released code
    assert np.allclose(grid.sigmas.numpy(), edges[:-1], rtol=1e-6)
    s = edges[:-1]
    lam = (s ** 2 + SIGMA_DATA ** 2) / (s * SIGMA_DATA) ** 2
    density = np.exp(-(np.log(s) - P_MEAN) ** 2 / (2 * P_STD ** 2)) / (s * P_STD * math.sqrt(2 * math.pi))
    expected = lam * density * np.diff(edges)
    assert np.allclose(grid.weights.numpy(), expected, rtol=1e-9)
    # the released code's density multiplies by P_std^2 (operator precedence): not copied
    buggy = np.exp(-(np.log(s) - P_MEAN) ** 2 / 2 * P_STD ** 2) / (s * P_STD * math.sqrt(2 * math.pi))
    assert not np.allclose(grid.weights.numpy(), lam * buggy * np.diff(edges), rtol=1e-2)
    assert grid.weights.numpy().argmax() == 1  # the corrected weighting peaks near sigma = 0.017


def test_noise_grid_dispatches_and_refuses_unknown_kinds() -> None:
    assert torch.equal(noise_grid("uniform", 5, "edm", 0.1, 1.0).sigmas, uniform_grid(5, "edm", 0.1, 1.0).sigmas)
    q = noise_grid("quantile", 5, "elbo", 0.1, 1.0)
    assert torch.allclose(q.weights, q.weights[0].expand(5))
    with pytest.raises(ValueError, match="unknown noise grid"):
        noise_grid("gauss", 5)
    with pytest.raises(ValueError, match="grid must be one of"):
        ClassifierSettings(grid="gauss")


def test_mean_reduction_divides_the_logits_by_the_pixel_count(tiny_net) -> None:
    x = torch.rand(2, 1, 28, 28)
    summed = DiffusionClassifier(tiny_net, ClassifierSettings(steps=3, grid="uniform", sigma_min=0.1,
                                                              sigma_max=2.0))(x)
    mean = DiffusionClassifier(tiny_net, ClassifierSettings(steps=3, grid="uniform", sigma_min=0.1, sigma_max=2.0,
                                                            reduction="mean"))(x)
    assert torch.allclose(mean, summed / (28 * 28), rtol=1e-5)


# -- Algorithm 1's momentum ---------------------------------------------------------------

def test_sign_steps_with_momentum_follow_algorithm_1(tiny_net) -> None:
    x = torch.rand(2, 1, 28, 28) * 0.8 + 0.1
    settings = PurifySettings(eta=0.2, steps=2, step_size=0.01, optimizer="sign", momentum=1.0)
    lm = LikelihoodMaximizer(tiny_net, settings)
    sigmas, noises = lm.draws()

    def grad(z: torch.Tensor, i: int) -> torch.Tensor:
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(lm.objective(z, sigmas[i], noises[i]).sum(), z)[0]

    g0 = grad(x, 0)
    m0 = g0 / g0.abs().flatten(1).sum(1).view(-1, 1, 1, 1)
    x1 = (x - 0.01 * m0.sign()).clamp(0, 1)
    g1 = grad(x1, 1)
    m1 = m0 + g1 / g1.abs().flatten(1).sum(1).view(-1, 1, 1, 1)
    x2 = (x1 - 0.01 * m1.sign()).clamp(0, 1)
    out, moments = x, None
    for i in range(2):
        out, _, moments = lm.step(out, x, i, sigmas[i], noises[i], moments)
    assert torch.allclose(out, x2, atol=1e-6)
    # without momentum the second step follows its own gradient alone
    plain = LikelihoodMaximizer(tiny_net, PurifySettings(eta=0.2, steps=2, step_size=0.01, optimizer="sign"))
    out0, moments = x, None
    for i in range(2):
        out0, _, moments = plain.step(out0, x, i, sigmas[i], noises[i], moments)
    assert torch.allclose(out0, (x1 - 0.01 * g1.sign()).clamp(0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        PurifySettings(momentum=-1.0)


# -- layering: card < preset < options, and the name is recorded -------------------------

def test_settings_layer_card_then_preset_then_options(tiny_checkpoint) -> None:
    model = load_checkpoint(tiny_checkpoint)
    model.card["classifier"] = {"steps": 7, "sigma_max": 5.0, "noise_seed": 3}
    s = classifier_settings(model, "paper-code", steps=2)
    assert (s.steps, s.grid, s.sigma_min, s.sigma_max, s.reduction) == (2, "uniform", 1e-4, 3.0, "mean")
    assert s.noise_seed == 3 and s.preset == "paper-code"  # what the preset leaves alone stays the card's
    assert classifier_settings(model).preset == "" and classifier_settings(model).steps == 7
    p = purify_settings(model, "paper", eta="4/255")
    assert (p.optimizer, p.momentum, p.eta, p.preset) == ("sign", 1.0, 4 / 255, "paper")
    model.card["preset"] = "fast"  # a card may name its default preset
    assert classifier_settings(model).steps == 16 and purify_settings(model).preset == "fast"
    assert classifier_settings(model, "paper").steps == 125
    with pytest.raises(ValueError, match="unknown preset"):
        classifier_settings(model, "nope")
    # a misspelt override (the command line's --levels is the field steps) is an error, not ignored
    with pytest.raises(ValueError, match="unknown classifier setting levels .*'steps'"):
        classifier_settings(model, levels=4)
    with pytest.raises(ValueError, match="unknown classifier settings T, sigma"):
        build_classifier(model, T=4, sigma=1.0)


# -- the command line applies them and records them --------------------------------------

@pytest.fixture
def digit(tmp_path):
    from PIL import Image

    arr = np.zeros((28, 28), np.uint8)
    arr[5:23, 12:16] = 255
    path = tmp_path / "digit.png"
    Image.fromarray(arr).save(path)
    return path


def test_cli_classify_applies_the_preset(tiny_checkpoint, digit, capsys) -> None:
    from rdc_studio.core.cli import main

    assert main(["classify", str(digit), "--model", str(tiny_checkpoint), "--preset", "paper-code", "--levels",
                 "2", "--threads", "1", "--device", "cpu", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["preset"] == "paper-code" and settings["steps"] == 2
    assert (settings["grid"], settings["sigma_min"], settings["sigma_max"], settings["reduction"]) == \
        ("uniform", 1e-4, 3.0, "mean")


def test_cli_purify_applies_the_preset(tiny_checkpoint, digit, capsys) -> None:
    from rdc_studio.core.cli import main

    assert main(["purify", str(digit), "--model", str(tiny_checkpoint), "--preset", "paper", "--levels", "2",
                 "--lm-steps", "2", "--threads", "1", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    lm = report["settings"]
    assert (lm["preset"], lm["optimizer"], lm["momentum"], lm["steps"], lm["step_size"]) == \
        ("paper", "sign", 1.0, 2, 0.05)
    assert lm["eta"] == pytest.approx(8 / 255) and report["classifier"]["preset"] == "paper"
    assert max(step["linf"] for step in report["steps"]) <= 8 / 255 + 1e-6


def test_cli_attack_records_the_preset(tiny_checkpoint, digit, tmp_path, capsys) -> None:
    from rdc_studio.core.cli import main

    out = tmp_path / "report.json"
    assert main(["attack", str(digit), "--model", str(tiny_checkpoint), "--defense", "rdc", "--preset", "paper-code",
                 "--levels", "2", "--lm-steps", "1", "--steps", "1", "--eps", "8/255", "--threads", "1",
                 "--device", "cpu", "--quiet", "--report", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["purify"]["preset"] == "paper-code" and report["purify"]["optimizer"] == "adam"
    assert report["purify"]["steps"] == 1 and report["classifier"]["grid"] == "uniform"
    assert report["grad"] == "exact"  # auto: Adam steps are differentiable


def test_cli_eval_records_the_preset(tiny_checkpoint, tmp_path) -> None:
    from rdc_studio.core.data import mnist_available

    if not mnist_available():
        pytest.skip("needs ../shared/data MNIST")
    from rdc_studio.core.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--dataset", "mnist", "--n", "2", "--defense", "dc", "--model", str(tiny_checkpoint),
                 "--preset", "fast", "--levels", "2", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]["classifier"]
    assert settings["preset"] == "fast" and settings["steps"] == 2 and settings["sigma_max"] == 80.0


def test_cli_rejects_an_unknown_preset(tiny_checkpoint, digit, capsys) -> None:
    from rdc_studio.core.cli import main

    with pytest.raises(SystemExit):
        main(["classify", str(digit), "--model", str(tiny_checkpoint), "--preset", "papr"])
    assert "invalid choice: 'papr'" in capsys.readouterr().err
