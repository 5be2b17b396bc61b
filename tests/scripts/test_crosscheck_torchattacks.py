"""scripts/crosscheck_torchattacks.py: our APGD-CE and torchattacks' APGD on the same RDC module."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rdc_studio.core.data import mnist_available

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("torchattacks")


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_crosscheck_writes_both_accuracies(tiny_checkpoint, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("crosscheck", ROOT / "scripts" / "crosscheck_torchattacks.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up
    spec.loader.exec_module(script)
    out = tmp_path / "crosscheck.json"
    assert script.main(["--model", str(tiny_checkpoint), "--n", "2", "--steps", "2", "--levels", "2",
                        "--threads", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 2 and rep["steps"] == 2 and rep["eps"] == 0.3 and rep["grad"] == "smooth"  # auto, sign-step LM
    assert rep["classifier"]["mode"] == rep["purify"]["mode"] == "deterministic" and rep["classifier"]["steps"] == 2
    for side in (rep["ours"], rep["torchattacks"], rep["torchattacks"]["float"]):
        lo, hi = side["robust_ci95"]
        assert 0 <= lo <= side["robust_acc"] <= hi <= 1 and side["robust_acc"] <= rep["clean_acc"]
    assert all(rep["torchattacks"]["checks"].values())
    assert isinstance(rep["agree"], bool) and rep["command"].startswith("python scripts/crosscheck_torchattacks.py")
    printed = capsys.readouterr().out
    assert "ours" in printed and "torchattacks" in printed and ("agree" in printed or "DISAGREE" in printed)
