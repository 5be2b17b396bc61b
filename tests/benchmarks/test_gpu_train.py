"""benchmarks/gpu_train.sh, run on the CPU at a toy size: every stage runs, the epochs follow
from the timing run, and each candidate is trained as its options say and then judged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rdc_studio.core.data import mnist_available

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_train.sh"


def run_script(out: Path, minutes: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(SCRIPT), str(out), minutes], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=900)


def test_unknown_candidate_is_refused_before_any_training(tmp_path):
    done = run_script(tmp_path / "out", "0.1", CANDIDATES="tune nonesuch")
    assert done.returncode == 2
    assert "unknown candidate 'nonesuch'" in done.stderr and "tune-big" in done.stderr
    assert not list((tmp_path / "out").glob("*/train.jsonl"))


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_fine_tune_candidate_trains_from_the_bundled_model_and_is_judged(tmp_path):
    out = tmp_path / "out"
    done = run_script(out, "0.05", CANDIDATES="tune", DEVICE="cpu", BF16="", BATCH="8", PROBE_STEPS="30",
                      N_VAL="4", N_SAMPLES="1", THREADS="1")
    assert done.returncode == 0, done.stderr[-2000:]
    # the epochs come from the timing run's slowest interval after the first, into 90% of the time
    probe = [json.loads(line) for line in (out / "probe-tune" / "train.jsonl").read_text().splitlines()]
    rate = min(r["images_per_second"] for r in probe[1:] or probe)
    epochs = float((out / "tune" / "epochs").read_text())
    assert epochs == pytest.approx(round(0.9 * rate * 0.05 * 60 / 55000, 3))
    # the candidate's own options came last and won over the common ones
    card = json.loads((out / "tune" / "model.json").read_text())
    training = card["training"]
    assert training["init_from"] == "mnist-embedding" and training["lr"] == pytest.approx(7e-4)
    assert training["ce_weight"] == 0.0 and training["p_mean"] == pytest.approx(-0.2)
    assert training["epochs"] == pytest.approx(epochs) and training["batch_size"] == 8
    # judged: the shipped grid on N_VAL validation digits, N_SAMPLES conditional samples per class
    sweep = json.loads((out / "tune" / "sweep.json").read_text())
    assert sweep["split"] == "val" and sweep["n"] == 4
    assert {(r["screen_levels"], r["keep_classes"]) for r in sweep["results"]} == {(0, 0), (6, 2), (6, 3)}
    agreement = json.loads((out / "tune" / "agreement.json").read_text())
    assert agreement["total"] == 10 and len(list((out / "tune" / "samples").glob("*.png"))) == 10
    assert "== tune" in done.stdout and "screen  6 keep 2" in done.stdout
