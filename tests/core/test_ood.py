import json
import math

import numpy as np
import pytest
import torch

from rdc_studio.core import models
from rdc_studio.core.cli import main
from rdc_studio.core.data import mnist_available
from rdc_studio.core.diffusion import to_model_space
from rdc_studio.core.models import load_checkpoint, update_card
from rdc_studio.core.ood import (CARD_KEY, NO_REFERENCE, OodScorer, OodSettings, auroc, check_reference, judge,
                                 log_sigma_grid, make_reference, percentile, score_images)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=g)
    x[1] = 0.0  # blank
    x[2, :, 5:23, 12:16] = 1.0
    return x


def fake_reference(low: float, high: float, settings: OodSettings | None = None) -> dict:
    """A reference whose validation scores rise evenly from ``low`` to ``high``."""
    return make_reference(np.linspace(low, high, 1001), settings or OodSettings(), "mnist", "val", command="test")


def test_score_is_deterministic_and_per_image(tiny_net, images):
    a = OodScorer(tiny_net, OodSettings(levels=6)).bits_per_dim(images)
    b = OodScorer(tiny_net, OodSettings(levels=6)).bits_per_dim(images)  # a new scorer: the same bank
    assert a.shape == (3,) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 3
    alone = OodScorer(tiny_net, OodSettings(levels=6)).bits_per_dim(images[2:3])
    assert alone[0].item() == pytest.approx(a[2].item(), rel=1e-5)  # not influenced by the rest of the batch
    chunked = OodScorer(tiny_net, OodSettings(levels=6)).bits_per_dim(images, levels_per_pass=4)
    assert torch.allclose(chunked, a, rtol=1e-6)
    other_seed = OodScorer(tiny_net, OodSettings(levels=6, noise_seed=1)).bits_per_dim(images)
    assert not torch.equal(other_seed, a)


def test_score_passes_follow_the_call_limit_and_stop_in_a_scope(tiny_net, images, monkeypatch):
    """By default a call holds as many (level, image) inputs as the network's call limit
    allows (fewer for a costly network), and a stop request ends the score between two calls."""
    import rdc_studio.core.classifier as classifier_module
    from rdc_studio.core.runtime import OperationCancelled, cancellation_scope

    macs = classifier_module.count_macs_per_input(tiny_net)  # (counted with a pass of its own, once)
    calls: list[int] = []
    hook = tiny_net.conv_in.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        scorer = OodScorer(tiny_net, OodSettings(levels=6))
        whole = scorer.bits_per_dim(images)
        assert calls == [18]  # 3 images x 6 levels in one call
        # a network 40 times as costly as the reference: calls of 160 / 40 = 4 (level, image) inputs
        monkeypatch.setattr(classifier_module, "REFERENCE_MACS_PER_INPUT", macs / 40)
        calls.clear()
        assert torch.allclose(scorer.bits_per_dim(images), whole, rtol=1e-6) and calls == [4, 4, 4, 4, 2]
        calls.clear()
        with cancellation_scope(lambda: len(calls) >= 2), pytest.raises(OperationCancelled):
            scorer.bits_per_dim(images)
        assert len(calls) == 2
    finally:
        hook.remove()


def test_score_is_the_truncated_elbo_in_bits_per_dim(tiny_net, images):
    """Level by level: decoder + weighted denoising errors + prior, per dimension, in bits of 8-bit bins."""
    settings = OodSettings(levels=5, sigma_min=0.01, sigma_max=20.0)
    scorer = OodScorer(tiny_net, settings)
    sigmas, weights = log_sigma_grid(settings)
    step = math.log(20.0 / 0.01) / 5
    assert torch.allclose(sigmas.log(), torch.tensor([math.log(0.01) + step * (i + 0.5) for i in range(5)]).float())
    assert torch.allclose(weights, step / sigmas ** 2, rtol=1e-5)
    x0 = to_model_space(images)
    d = x0[0].numel()
    nats = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for s, w, n in zip(sigmas, weights, scorer.noise_bank):
            sig = s.expand(3)
            den = tiny_net.denoise(x0 + s * n, sig, heads=[10])[:, 0]
            nats += float(w) * (den - x0).pow(2).flatten(1).sum(1).double()
    nats += d * 0.5 * math.log(2 * math.pi * math.e * 0.01 ** 2) + x0.pow(2).flatten(1).sum(1).double() / (2 * 400.0)
    expected = (nats / d + math.log(127.5)) / math.log(2)
    assert torch.allclose(scorer.bits_per_dim(images), expected, rtol=1e-5)


def test_percentile_and_warnings_from_a_fake_reference():
    ref = {"probabilities": [0.0, 0.5, 1.0], "quantiles": [1.0, 2.0, 3.0], "settings": {}, "dataset": "mnist",
           "split": "val"}
    assert percentile(1.5, ref) == pytest.approx(25.0)
    assert percentile(2.0, ref) == pytest.approx(50.0)
    assert percentile(2.9, ref) == pytest.approx(95.0)
    assert percentile(0.5, ref) == 0.0 and percentile(7.0, ref) == 100.0
    inside = judge(2.0, ref)
    assert inside.out_of_distribution is False and inside.warning is None and inside.percentile == 50.0
    high, low = judge(5.0, ref), judge(0.1, ref)
    assert high.out_of_distribution and "less likely than 99.9%" in high.warning and "mnist val" in high.warning
    assert low.out_of_distribution and "more likely than 99.9%" in low.warning
    ref = fake_reference(1.0, 2.0)  # evenly spread: the 99.9th percentile is at 1.999
    assert judge(1.9985, ref).out_of_distribution is False and judge(1.9995, ref).out_of_distribution
    assert judge(1.0015, ref).out_of_distribution is False and judge(1.0005, ref).out_of_distribution
    none = judge(1.5, None)
    assert none.percentile is None and none.out_of_distribution is None and none.note == NO_REFERENCE


def test_reference_holds_quantiles_n_levels_and_command():
    scores = np.arange(1, 501, dtype=float)
    ref = make_reference(scores, OodSettings(levels=8), "mnist", "val", command="rdc ood-calibrate --n 500")
    check_reference(ref)
    q = dict(zip(ref["probabilities"], ref["quantiles"]))
    assert ref["n"] == 500 and q[0.0] == 1 and q[1.0] == 500 and q[0.5] == pytest.approx(250.5)
    assert ref["settings"]["levels"] == 8 and ref["command"] == "rdc ood-calibrate --n 500"
    assert percentile(250.5, ref) == pytest.approx(50.0)
    json.dumps(ref)  # a model card entry
    with pytest.raises(ValueError, match=CARD_KEY):
        check_reference(dict(ref, quantiles=ref["quantiles"][::-1]))
    with pytest.raises(ValueError, match=CARD_KEY):
        check_reference({"quantiles": [1.0]})


def test_score_images_streams_batches_and_cancels(tiny_net, images):
    scorer = OodScorer(tiny_net, OodSettings(levels=4))
    uint8 = (images * 255).round().to(torch.uint8)
    gen = score_images(scorer, uint8, batch_size=2)
    records = []
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            scores = stop.value
            break
    assert [r.done for r in records] == [2, 3] and scores.shape == (3,)
    assert np.allclose(scores, scorer.bits_per_dim(uint8.float() / 255).numpy())
    cancelled = score_images(scorer, uint8, batch_size=1, cancelled=lambda: True)
    with pytest.raises(StopIteration) as stop:
        next(cancelled)
    assert stop.value.value is None


def test_card_write_is_atomic_and_keeps_the_card(tiny_checkpoint, monkeypatch):
    card_path = tiny_checkpoint.with_suffix(".json")
    before = card_path.read_text()
    ref = fake_reference(1.0, 2.0)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(models.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        update_card(tiny_checkpoint, CARD_KEY, ref)
    assert card_path.read_text() == before  # the old card, whole
    assert [p.name for p in card_path.parent.iterdir() if p.name.endswith(".part")] == []
    monkeypatch.undo()
    assert update_card(tiny_checkpoint, CARD_KEY, ref) == card_path
    card = json.loads(card_path.read_text())
    assert card[CARD_KEY] == ref and card["name"] == "tiny" and card["classes"] == json.loads(before)["classes"]
    model = load_checkpoint(tiny_checkpoint)
    scorer = OodScorer.for_model(model)
    assert scorer.reference == ref and scorer.settings == OodSettings()


def test_classify_json_has_ood_and_text_warns(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    noise = tmp_path / "noise.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(noise)
    assert main(["classify", str(noise), "--model", str(tiny_checkpoint), "--levels", "2", "--json"]) == 0
    ood = json.loads(capsys.readouterr().out)["results"][0]["ood"]
    assert ood["percentile"] is None and ood["note"] == NO_REFERENCE and ood["bits_per_dim"] > 0
    assert main(["classify", str(noise), "--model", str(tiny_checkpoint), "--levels", "2"]) == 0
    assert NO_REFERENCE in capsys.readouterr().out
    bpd = ood["bits_per_dim"]
    update_card(tiny_checkpoint, CARD_KEY, fake_reference(bpd - 2.0, bpd - 1.0))  # the noise is far above
    assert main(["classify", str(noise), "--model", str(tiny_checkpoint), "--levels", "2", "--json"]) == 0
    ood = json.loads(capsys.readouterr().out)["results"][0]["ood"]
    assert ood["bits_per_dim"] == pytest.approx(bpd) and ood["percentile"] == 100.0
    assert ood["out_of_distribution"] is True and "out of distribution" in ood["warning"]
    assert main(["classify", str(noise), "--model", str(tiny_checkpoint), "--levels", "2"]) == 0
    out = capsys.readouterr().out
    assert "noise.png: warning: out of distribution" in out and NO_REFERENCE not in out
    update_card(tiny_checkpoint, CARD_KEY, fake_reference(bpd - 1.0, bpd + 1.0))  # the noise is typical
    assert main(["classify", str(noise), "--model", str(tiny_checkpoint), "--levels", "2", "--json"]) == 0
    ood = json.loads(capsys.readouterr().out)["results"][0]["ood"]
    assert ood["out_of_distribution"] is False and ood["percentile"] == pytest.approx(50.0, abs=0.5)


@pytest.mark.skipif(not mnist_available(), reason="MNIST not found")
def test_ood_calibrate_stores_the_reference(tiny_checkpoint, capsys):
    before = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    assert main(["ood-calibrate", "--model", str(tiny_checkpoint), "--n", "12", "--levels", "4", "--batch-size", "5",
                 "--threads", "1", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "wrote ood_reference" in captured.out
    assert "12 images cannot pin down the 0.1% and 99.9% quantiles" in captured.err  # a rough reference says so
    card = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    ref = card[CARD_KEY]
    check_reference(ref)
    assert ref["n"] == 12 and ref["split"] == "val" and ref["dataset"] == "mnist"
    assert ref["settings"]["levels"] == 4 and "ood-calibrate" in ref["command"]
    assert {k: v for k, v in card.items() if k != CARD_KEY} == before
    from rdc_studio.core.data import load_dataset

    val = load_dataset("mnist", "val")
    scores = OodScorer(load_checkpoint(tiny_checkpoint).net, OodSettings(levels=4)).bits_per_dim(
        val.float_images(slice(0, 12))).numpy()
    assert ref["quantiles"][0] == pytest.approx(scores.min()) and ref["quantiles"][-1] == pytest.approx(scores.max())


def test_auroc():
    assert auroc([1, 2, 3], [4, 5]) == 1.0 and auroc([4, 5], [1, 2, 3]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    assert auroc([1, 3], [2]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1])
