"""benchmarks/sample_agreement.py on a tiny model: every sample judged, written, and the gallery holds agreed ones."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdc_studio.core.baseline import SmallCNN, load_cnn, save_cnn
from rdc_studio.core.sample import parse_sample_filename

ROOT = Path(__file__).resolve().parents[2]


BENCHMARK = "sample_agreement"  # loaded by the conftest's bench fixture


@pytest.fixture
def judge(tmp_path):
    torch.manual_seed(0)
    return save_cnn(tmp_path / "judge.safetensors", SmallCNN().eval(), {"name": "judge", "dataset": "mnist"})


def test_agreement_counts_files_and_gallery(bench, tiny_checkpoint, judge, tmp_path):
    out_dir, gallery = tmp_path / "samples", tmp_path / "gallery"
    result = bench.sample_agreement(str(tiny_checkpoint), str(judge), n=3, sampler_steps=2, seed=5,
                                    out_dir=out_dir, gallery=gallery, gallery_n=1)
    assert result["total"] == 30 and result["n_per_class"] == 3 and result["sampler_steps"] == 2
    files = sorted(out_dir.glob("*.png"))
    assert sorted(parse_sample_filename(f.stem) for f in files) == [(y, i) for y in range(10) for i in range(3)]
    # the judge's verdicts, recomputed from the written 8-bit PNGs
    cnn, _ = load_cnn(str(judge))
    agreed = {}
    for f in files:
        label, index = parse_sample_filename(f.stem)
        pixels = np.asarray(Image.open(f), dtype=np.float32)[None, None] / 255
        with torch.no_grad():
            agreed[label, index] = int(cnn(torch.from_numpy(pixels)).argmax(1)) == label
    assert result["correct"] == sum(agreed.values())
    assert 0 < result["correct"] < 30  # the random judge agrees with some samples only: the gallery is a real choice
    assert result["agreement"] == pytest.approx(result["correct"] / 30)
    for y in range(10):
        assert result["per_class"][str(y)] == pytest.approx(sum(agreed[y, i] for i in range(3)) / 3)
    # the gallery: the first sample of each class the judge agrees with, under its own index
    expected = sorted(min(i for i in range(3) if agreed[y, i]) for y in range(10) if any(agreed[y, i] for i in range(3)))
    shown = [parse_sample_filename(f.stem) for f in gallery.glob("*.png")]
    assert sorted(i for _, i in shown) == expected and all(agreed[key] for key in shown)
    for label, index in shown:
        assert (gallery / f"{label}-{index:03d}.png").read_bytes() == (out_dir / f"{label}-{index:03d}.png").read_bytes()


def test_regenerated_gallery_drops_the_earlier_runs_samples(bench, tiny_checkpoint, judge, tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    (gallery / "7-019.png").write_bytes(b"an earlier model's sample")  # a name this run (n = 3) never writes
    (gallery / "README.txt").write_text("not a sample")
    (gallery / "notes-a.png").write_bytes(b"not a sample name either")
    bench.sample_agreement(str(tiny_checkpoint), str(judge), n=3, sampler_steps=2, seed=5, gallery=gallery,
                           gallery_n=1)
    assert not (gallery / "7-019.png").exists()
    assert (gallery / "README.txt").exists() and (gallery / "notes-a.png").exists()
    shown = [parse_sample_filename(f.stem) for f in gallery.glob("*.png") if f.name != "notes-a.png"]
    assert shown and all(index < 3 for _, index in shown)


def test_same_seed_same_samples(bench, tiny_checkpoint, judge, tmp_path):
    runs = [bench.sample_agreement(str(tiny_checkpoint), str(judge), n=2, sampler_steps=2, seed=1,
                                   out_dir=tmp_path / f"run{i}") for i in range(2)]
    assert runs[0]["per_class"] == runs[1]["per_class"]
    for f in sorted((tmp_path / "run0").glob("*.png")):
        assert f.read_bytes() == (tmp_path / "run1" / f.name).read_bytes()


def test_unavailable_device_is_a_clear_error(bench, tiny_checkpoint, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setattr(sys, "argv", ["sample_agreement.py", "--model", str(tiny_checkpoint), "--device", "cuda"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and "--device cuda" in capsys.readouterr().err


def test_ood_flags_counted_and_kept_out_of_the_gallery(bench, tiny_checkpoint, judge, tmp_path):
    from rdc_studio.core.models import load_checkpoint, update_card
    from rdc_studio.core.ood import CARD_KEY, OodScorer, OodSettings, make_reference

    out_dir = tmp_path / "samples"
    plain = bench.sample_agreement(str(tiny_checkpoint), str(judge), n=3, sampler_steps=2, seed=5, out_dir=out_dir)
    assert plain["ood_flagged"] is None and plain["ood_median_bits_per_dim"] is None  # no reference in the card
    # score the written samples as the app would, and put the reference's top between them
    files = sorted(out_dir.glob("*.png"))
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(f), dtype=np.float32)[None] / 255 for f in files]))
    scores = OodScorer(load_checkpoint(str(tiny_checkpoint)).net).bits_per_dim(pixels).numpy()
    cut = float(np.median(scores))
    update_card(tiny_checkpoint, CARD_KEY, make_reference(np.linspace(cut - 1, cut, 1001), OodSettings(), "mnist", "val"))
    flagged = {parse_sample_filename(f.stem) for f, s in zip(files, scores) if s > cut}
    assert 0 < len(flagged) < 30

    gallery = tmp_path / "gallery"
    result = bench.sample_agreement(str(tiny_checkpoint), str(judge), n=3, sampler_steps=2, seed=5,
                                    gallery=gallery, gallery_n=3)
    assert result["ood_flagged"] == len(flagged)
    assert result["ood_median_bits_per_dim"] == pytest.approx(cut, abs=1e-4)
    assert result["correct"] == plain["correct"]  # same samples, same verdicts
    shown = {parse_sample_filename(f.stem) for f in gallery.glob("*.png")}
    assert shown and not shown & flagged


def test_churn_is_recorded_and_changes_the_samples(bench, tiny_checkpoint, judge, tmp_path):
    runs = {c: bench.sample_agreement(str(tiny_checkpoint), str(judge), n=2, sampler_steps=4, seed=1, churn=c,
                                      out_dir=tmp_path / f"churn{c}") for c in (0.0, 40.0)}
    assert runs[0.0]["churn"] == 0.0 and runs[40.0]["churn"] == 40.0
    differ = [f.name for f in (tmp_path / "churn0.0").glob("*.png")
              if f.read_bytes() != (tmp_path / "churn40.0" / f.name).read_bytes()]
    assert differ
