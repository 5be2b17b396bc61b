"""core.defense: the one place a defense is assembled."""
import copy

import pytest
import torch

from rdc_studio.core.classifier import build_classifier
from rdc_studio.core.defense import (DeviceUnavailableError, InputBinarization, build_defense, gradient_warning,
                                     parse_fraction, purify_settings, resolve_device, setup_threads, unwrap_defense)
from rdc_studio.core.models import load_checkpoint
from rdc_studio.core.purify import PurifySettings
from rdc_studio.core.rdc import RobustDiffusionClassifier


def test_parse_fraction():
    assert parse_fraction("8/255") == 8 / 255 and parse_fraction("0.3") == 0.3 and parse_fraction(0.5) == 0.5
    with pytest.raises(ValueError, match="8/255"):
        parse_fraction("a lot")


def test_resolve_device_speaks_engine_terms(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device() == "cpu"
    with pytest.raises(DeviceUnavailableError) as info:
        resolve_device("cuda")
    assert "CUDA" in str(info.value) and "--" not in str(info.value)


def test_setup_threads_returns_the_count():
    before = torch.get_num_threads()
    try:
        assert setup_threads(1) == 1 == torch.get_num_threads()
        assert setup_threads(0) >= 1
    finally:
        torch.set_num_threads(before)


def test_build_each_defense(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    clf = build_classifier(model, "cpu", steps=2)
    assert build_defense("dc", model, clf) is clf
    p = purify_settings(model, eta="8/255", steps=2, optimizer=None)
    assert p.eta == 8 / 255 and p.steps == 2 and p.optimizer == PurifySettings().optimizer
    rdc = build_defense("rdc", model, clf, purify=p)
    assert isinstance(rdc, RobustDiffusionClassifier) and rdc.grad_mode == "smooth"  # auto, sign steps
    assert rdc.classifier.settings == clf.settings and rdc.maximizer.settings == p
    assert gradient_warning(rdc) is None and gradient_warning(clf) is None
    exact = build_defense("rdc", model, clf, purify=p, grad_mode="exact")
    assert "smooth" in gradient_warning(exact) and "--" not in gradient_warning(exact)
    adam = build_defense("rdc", model, clf, purify=purify_settings(model, steps=2, optimizer="adam"))
    assert adam.grad_mode == "exact"
    cnn = torch.nn.Linear(2, 2)
    assert build_defense("cnn", None, None, cnn=cnn) is cnn
    with pytest.raises(ValueError, match="defense"):
        build_defense("vit", model, clf)


def test_the_rdc_classifies_with_the_classifier_it_is_given_prior_and_call_limit_included(tiny_checkpoint):
    from rdc_studio.core.classifier import DiffusionClassifier

    model = load_checkpoint(tiny_checkpoint)
    prior = torch.full((10,), -30.0)
    prior[4] = 0.0  # a prior that decides alone
    clf = DiffusionClassifier(model.net, build_classifier(model, "cpu", steps=2).settings, log_prior=prior,
                              max_network_inputs=3)
    p = purify_settings(model, steps=1)
    rdc = build_defense("rdc", model, clf, purify=p)
    assert rdc.classifier is clf and rdc.classifier.max_network_inputs == 3
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert rdc(x).argmax(1).tolist() == [4, 4] == clf(x).argmax(1).tolist()
    other = copy.deepcopy(model.net)
    with pytest.raises(ValueError, match="loaded model's network"):
        build_defense("rdc", model, DiffusionClassifier(other, clf.settings), purify=p)


def test_binarized_defense_sees_a_thresholded_image_and_passes_gradients_straight_through(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    clf = build_classifier(model, "cpu", steps=2)
    binary = build_defense("dc", model, clf, binarize=0.5)
    assert isinstance(binary, InputBinarization) and binary.defense is clf and unwrap_defense(binary) is clf
    cfg = model.net.config
    x = torch.rand(3, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    hard = (x > 0.5).float()
    with torch.no_grad():
        assert torch.equal(binary(x), clf(hard))
        # a perturbation that keeps every pixel on its side of the threshold changes nothing
        nudged = torch.where(x > 0.5, (x + 0.05).clamp(max=1), (x - 0.05).clamp(min=0))
        assert torch.equal(binary(nudged), binary(x))
    # the straight-through gradient is the classifier's gradient at the binarised image
    x_in, hard_in = x.clone().requires_grad_(True), hard.clone().requires_grad_(True)
    binary(x_in)[:, 1].sum().backward()
    clf(hard_in)[:, 1].sum().backward()
    assert x_in.grad.abs().sum() > 0 and torch.allclose(x_in.grad, hard_in.grad)
    # the wrapper answers for the defense inside: an RDC's gradient mode, settings and warning
    p = purify_settings(model, steps=2)
    rdc = build_defense("rdc", model, clf, purify=p, grad_mode="exact", binarize=0.3)
    assert isinstance(unwrap_defense(rdc), RobustDiffusionClassifier) and rdc.threshold == 0.3
    assert rdc.grad_mode == "exact" and rdc.maximizer.settings == p
    assert gradient_warning(rdc) == gradient_warning(unwrap_defense(rdc)) is not None
    copied = copy.deepcopy(binary)
    with torch.no_grad():
        assert torch.equal(copied(x), binary(x))
    with pytest.raises(AttributeError):
        binary.no_such_attribute
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            build_defense("dc", model, clf, binarize=bad)
