"""benchmarks/ce_saturation.py: the float64 variant is scoped, saturation is found where the
float32 cross-entropy is exactly 0, and the report records what it measured."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rdc_studio.core.data import mnist_available

ROOT = Path(__file__).resolve().parents[2]


BENCHMARK = "ce_saturation"  # loaded by the conftest's bench fixture


def test_the_float64_loss_keeps_a_gradient_where_float32_saturates_and_is_scoped(bench):
    import rdc_studio.core.attacks.apgd as apgd

    shipped = apgd.attack_loss
    logits = torch.tensor([[20.0, 0.0, -1.0]], requires_grad=True)
    y = torch.tensor([0])
    assert float(shipped(logits, y, "ce")[0].detach()) == 0.0  # float32: exactly 0 at a margin of 20
    with bench.float64_cross_entropy():
        loss = apgd.attack_loss(logits, y, "ce")
        assert float(loss[0].detach()) > 0 and loss.dtype == torch.float64
        grad, = torch.autograd.grad(loss.sum(), logits)
        assert grad[0, 0] < 0  # the true class's term is there
        assert torch.equal(apgd.attack_loss(logits, y, "dlr"), shipped(logits, y, "dlr"))
    assert apgd.attack_loss is shipped
    assert torch.equal(F.cross_entropy(logits, y, reduction="none"), shipped(logits, y, "ce"))


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_the_report_holds_margins_trace_and_comparison(bench, tiny_checkpoint, tmp_path):
    out = tmp_path / "ce.json"
    assert bench.main(["--model", str(tiny_checkpoint), "--n", "3", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["clean_margins"]) == 3 and report["n"] == 3
    assert set(report["trace"]) >= {"float32", "float64", "digit", "eps"}
    assert len(report["trace"]["float32"]["steps"]) >= 1
    assert report["comparison"]["digits"] == report["saturated"]
    assert report["command"].startswith("python benchmarks/ce_saturation.py --model")


def test_losses_option_picks_halves_in_order_and_rejects_unknown_names(bench):
    assert bench.loss_list("float64") == ["float64"]
    assert bench.loss_list("float64, float32,float64") == ["float64", "float32"]
    with pytest.raises(Exception, match="float32, float64"):
        bench.loss_list("float16")
    with pytest.raises(Exception):
        bench.loss_list(" , ")


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_one_half_reports_only_that_loss(bench, tiny_checkpoint, tmp_path):
    out = tmp_path / "ce64.json"
    assert bench.main(["--model", str(tiny_checkpoint), "--n", "3", "--steps", "2", "--losses", "float64",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "float64" in report["trace"] and "float32" not in report["trace"]
    assert set(report["comparison"]["broken"]) <= {"float64"}
    assert "--losses float64" in report["command"]
