"""benchmarks/ood_auroc.py on a tiny model: every set scored, AUROCs, and no image in both the reference and the test."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rdc_studio.core.data import data_root_candidates, mnist_available
from rdc_studio.core.models import update_card
from rdc_studio.core.ood import CARD_KEY, OodSettings, make_reference

ROOT = Path(__file__).resolve().parents[2]
CIFAR = any((root / "cifar10-jpeg.tar.gz").exists() for root in data_root_candidates())


BENCHMARK = "ood_auroc"  # loaded by the conftest's bench fixture


def test_image_zoo(bench):
    digits = torch.zeros(5, 1, 28, 28)
    digits[:, :, 5:23, 12:16] = 1.0
    zoo = bench.image_zoo(digits, seed=0)
    assert all(v.shape == digits.shape for v in zoo.values())
    assert torch.equal(zoo["inverted digits"], 1 - digits)
    assert float(zoo["digits at 30% opacity"].max()) == pytest.approx(0.3)
    blank = zoo["blank (grey levels 0..1)"]
    assert [float(b.min()) for b in blank] == [float(b.max()) for b in blank] == pytest.approx([0, .25, .5, .75, 1])


@pytest.mark.skipif(not (mnist_available() and CIFAR), reason="needs ../shared/data MNIST and CIFAR-10")
def test_every_set_is_scored_after_the_reference(bench, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "ood.json"
    assert bench.main(["--model", str(tiny_checkpoint), "--n", "6", "--batch-size", "4", "--threads", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["validation_images"] == [6, 12] and "card has none" in result["reference"]
    sets = result["sets"]
    assert {"uniform noise", "CIFAR-10 test, grayscale 28x28", "zoo: inverted digits", "zoo: all"} <= set(sets)
    for name, row in sets.items():
        if name != "validation (in distribution)":
            assert 0 <= row["auroc"] <= 1 and 0 <= row["auroc_two_sided"] <= 1 and 0 <= row["flagged"] <= 1
    assert sets["zoo: all"]["n"] == 5 * 6 and "uniform noise" in capsys.readouterr().out
    ref = make_reference(np.linspace(0, 1, 9), OodSettings(), "mnist", "val")  # n = 9 images
    update_card(tiny_checkpoint, CARD_KEY, ref)
    assert bench.main(["--model", str(tiny_checkpoint), "--n", "3", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["validation_images"] == [9, 12] and CARD_KEY in result["reference"]
