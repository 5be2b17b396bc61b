"""The bundled default model: present, documented by its card, and accurate on MNIST."""
import pytest
import torch

from rdc_studio.core.classifier import build_classifier
from rdc_studio.core.data import load_dataset, mnist_available
from rdc_studio.core.models import DEFAULT_MODEL, list_bundled_models, load_checkpoint


@pytest.fixture(scope="module")
def default_model():
    return load_checkpoint()


def test_default_model_is_bundled_and_small():
    from rdc_studio.core.models import BUNDLED_DIR

    assert DEFAULT_MODEL in list_bundled_models()
    for suffix in (".safetensors", ".json"):
        assert (BUNDLED_DIR / f"{DEFAULT_MODEL}{suffix}").stat().st_size < 25 * 2**20


def test_model_card_records_how_it_was_made_and_measured(default_model):
    card = default_model.card
    assert card["name"] == DEFAULT_MODEL and card["dataset"] == "mnist" and len(card["classes"]) == 10
    assert card["training_command"].startswith("rdc train ")
    training = card["training"]
    assert isinstance(training["seed"], int) and training["wall_seconds"] > 0 and training["hardware"]
    assert card["training_command"] in card.get("training_commands", [card["training_command"]])
    test = card["metrics"]["test"]
    lo, hi = test["ci95"]
    assert test["n"] >= 1000 and lo <= test["accuracy"] <= hi
    assert card["metrics"]["measured_by"].startswith("python scripts/bundle_model.py")
    assert card["classifier"]["steps"] >= 1


def test_default_model_is_purely_generative_and_class_conditional(default_model):
    """The class conditions every block (label embedding), and the loss was the denoising loss alone."""
    card = default_model.card
    assert card["net"]["architecture"] == "embedding"
    assert card["training"]["ce_weight"] == 0
    agreement = card["metrics"]["sample_agreement"]
    assert agreement["total"] == 200 and agreement["correct"] / agreement["total"] >= 0.9


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_default_settings_classify_test_digits(default_model):
    """The first 100 test digits with the card's settings: the accuracy the card claims, within noise."""
    clf = build_classifier(default_model)
    data = load_dataset("mnist", "test")
    with torch.no_grad():
        pred = clf(data.float_images(slice(0, 100))).argmax(1)
    accuracy = float((pred == data.labels[:100]).float().mean())
    assert accuracy >= default_model.card["metrics"]["test"]["accuracy"] - 0.05


def test_bundled_models_are_the_diffusion_models_unless_asked_for_all():
    assert "mnist-cnn" not in list_bundled_models()  # the app's Model menu: diffusion models only
    assert {"mnist-cnn", DEFAULT_MODEL} <= set(list_bundled_models(diffusion_only=False))
