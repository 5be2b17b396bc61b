"""benchmarks/bench_attack_step.py on a tiny model: timings and operator counts per gradient mode."""
import json
from pathlib import Path

import pytest

from rdc_studio.core.data import mnist_available

ROOT = Path(__file__).resolve().parents[2]


BENCHMARK = "bench_attack_step"  # loaded by the conftest's bench fixture


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_rows_per_mode_batch_and_gradient(bench, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--modes", "bpda,smooth",
                       "--batch-sizes", "1,2", "--repeats", "1", "--threads", "1", "--count-ops",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["mode"], r["batch"], r["grad"]) for r in rows] == [
        (m, b, g) for m in ("bpda", "smooth") for b in (1, 2) for g in (True, False)]
    assert all(r["ms_per_iteration"] > 0 and r["ms_per_image"] == pytest.approx(r["ms_per_iteration"] / r["batch"])
               for r in rows)
    ops = {(r["mode"], r["batch"], r["grad"]): r["aten_ops"] for r in rows}
    # differentiating through the purification (smooth) dispatches far more than BPDA's shortcut
    assert ops[("smooth", 1, True)] > 2 * ops[("bpda", 1, True)] > 0
    # without the input gradient both modes run the same purification and classifier
    assert ops[("smooth", 1, False)] == ops[("bpda", 1, False)]
    assert result["device"] == "cpu" and result["hardware"] and "ATen ops" in capsys.readouterr().out
