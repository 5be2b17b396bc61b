import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdc_studio.core.cli import main
from rdc_studio.core.data import mnist_available


def test_classify_json(tiny_checkpoint, digit_png, capsys):
    rc = main(["classify", str(digit_png), "--model", str(tiny_checkpoint), "--levels", "3", "--json",
               "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    res = out["results"][0]
    assert res["image"] == str(digit_png)
    assert 0 <= res["predicted"] < 10 and res["class"] == str(res["predicted"])
    probs = list(res["probabilities"].values())
    assert abs(sum(probs) - 1) < 1e-5 and max(probs) == pytest.approx(res["confidence"])
    assert out["settings"]["steps"] == 3


def test_classify_a_binarized_input(tiny_checkpoint, tmp_path, capsys):
    """--binarize classifies the thresholded image: a grey digit gives the logits of its
    black-and-white version (pixels above the threshold white), and the settings say so."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 60, (28, 28)).astype(np.uint8)  # dark background, a bright stroke of grey levels
    grey[4:24, 10:18] = rng.integers(100, 256, (20, 8))
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.where(grey > 0.6 * 255, 255, 0).astype(np.uint8)).save(tmp_path / "hard.png")
    common = ["--model", str(tiny_checkpoint), "--levels", "3", "--json", "--device", "cpu"]
    outputs = []
    for args in ([str(tmp_path / "grey.png"), "--binarize", "0.6"], [str(tmp_path / "hard.png")],
                 [str(tmp_path / "grey.png")]):
        assert main(["classify", *args, *common]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    binarized, hard, grey_out = outputs
    assert binarized["settings"]["binarize"] == 0.6 and "binarize" not in hard["settings"]
    assert binarized["results"][0]["logits"] == pytest.approx(hard["results"][0]["logits"], abs=1e-5)
    assert binarized["results"][0]["logits"] != pytest.approx(grey_out["results"][0]["logits"], abs=1e-5)


def test_classify_text_and_bad_file(tiny_checkpoint, digit_png, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rc = main(["classify", str(digit_png), str(bad), "--model", str(tiny_checkpoint), "--steps", "2"])  # old name
    captured = capsys.readouterr()
    assert rc == 1
    assert "digit.png:" in captured.out and "ms" in captured.out
    assert "broken.png" in captured.err


def test_bad_checkpoint_is_a_clear_error(tmp_path, digit_png):
    bad = tmp_path / "x.safetensors"
    bad.write_text("nope")
    with pytest.raises(SystemExit, match="x.safetensors"):
        main(["classify", str(digit_png), "--model", str(bad)])


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device_is_a_usage_error(tiny_checkpoint, digit_png, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["classify", str(digit_png), "--model", str(tiny_checkpoint), "--device", "cuda"])
    err = capsys.readouterr().err
    assert exc.value.code == 2  # argparse's status for a bad argument value
    assert err.startswith("rdc: error: --device cuda:") and "use --device cpu or auto" in err


def test_eval_writes_report(tiny_checkpoint, tmp_path):
    out = tmp_path / "results.json"
    rc = main(["eval", "--dataset", "mnist", "--split", "test", "--n", "12", "--defense", "dc", "--attack", "none",
               "--model", str(tiny_checkpoint), "--levels", "2", "--batch-size", "5", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["n"] == 12 and 0 <= report["clean_acc"] <= 1
    lo, hi = report["ci95"]
    assert lo <= report["clean_acc"] <= hi
    assert report["seconds"] > 0 and report["seconds_per_image"] == pytest.approx(report["seconds"] / 12)
    assert report["settings"]["classifier"]["steps"] == 2 and report["model"]["name"] == "tiny"


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
@pytest.mark.parametrize("defense", ["rdc", "cnn"])
def test_clean_eval_of_any_defense_runs_no_attack(tiny_checkpoint, tiny_cnn, tmp_path, defense):
    """--attack none measures clean accuracy with forward passes only, for the RDC and the
    CNN as for the DC; it equals the clean accuracy an attack's report gives."""
    args = ["eval", "--dataset", "mnist", "--split", "test", "--n", "6", "--defense", defense,
            "--model", str(tiny_checkpoint), "--cnn", str(tiny_cnn), "--levels", "2", "--batch-size", "3"]
    assert main(args + ["--attack", "none", "--out", str(tmp_path / "clean.json")]) == 0
    assert main(args + ["--attack", "apgd-ce", "--eps", "0.1", "--steps", "1", "--out", str(tmp_path / "a.json")]) == 0
    clean, attacked = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("clean", "a"))
    assert clean["n"] == 6 and "attack_settings" not in clean["settings"] and clean.get("robust_acc") is None
    assert clean["clean_acc"] == attacked["clean_acc"]
    assert ("purify" in clean["settings"]) == (defense == "rdc")


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_and_attack_of_a_binarized_defense(tiny_checkpoint, digit_png, tmp_path, capsys):
    """--binarize puts the threshold in front of the defense: reports record it, a run
    without it is another measurement, and a perturbation too small to cross the threshold
    anywhere changes no prediction (the attacks see a straight-through gradient)."""
    from rdc_studio.core.evaluate import worst_case_report

    args = ["eval", "--dataset", "mnist", "--n", "4", "--defense", "dc", "--attack", "apgd-ce", "--norm", "linf",
            "--steps", "2", "--levels", "2", "--batch-size", "2", "--model", str(tiny_checkpoint)]
    # 8-bit pixels lie at least 0.5/255 from 0.5: an l-inf ball of 0.001 cannot cross it
    assert main(args + ["--eps", "0.001", "--binarize", "0.5", "--out", str(tmp_path / "b.json")]) == 0
    assert main(args + ["--eps", "0.001", "--out", str(tmp_path / "plain.json")]) == 0
    binary, plain = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("b", "plain"))
    assert binary["settings"]["binarize"] == 0.5 and "binarize" not in plain["settings"]
    with pytest.raises(ValueError, match="binarize"):
        worst_case_report([binary, plain])
    assert binary["robust_acc"] == binary["clean_acc"] and all(r[2] == r[3] for r in binary["per_example"])
    out = tmp_path / "adv.png"
    assert main(["attack", str(digit_png), "--defense", "dc", "--binarize", "0.5", "--eps", "0.3", "--steps", "2",
                 "--model", str(tiny_checkpoint), "--levels", "2", "--out", str(out), "--report",
                 str(tmp_path / "r.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["binarize"] == 0.5
    for bad in ("1", "0", "half"):
        with pytest.raises(SystemExit):
            main(args + ["--binarize", bad])
        assert "--binarize" in capsys.readouterr().err


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_flip_attack_needs_a_binarized_defense(tiny_checkpoint, digit_png, tmp_path, capsys):
    """`--attack flip` attacks the threshold the defense binarises at (recorded in the
    report); without --binarize it is a clear error."""
    args = ["eval", "--dataset", "mnist", "--n", "2", "--defense", "dc", "--attack", "flip", "--norm", "linf",
            "--eps", "0.3", "--steps", "2", "--levels", "2", "--batch-size", "2", "--model", str(tiny_checkpoint)]
    with pytest.raises(SystemExit, match="binarise"):
        main(args + ["--out", str(tmp_path / "plain.json")])
    assert not (tmp_path / "plain.json").exists()
    assert main(args + ["--binarize", "0.4", "--out", str(tmp_path / "flip.json")]) == 0
    report = json.loads((tmp_path / "flip.json").read_text())
    assert report["settings"]["attack_settings"]["threshold"] == 0.4 and report["settings"]["binarize"] == 0.4
    assert report["settings"]["attack_settings"]["method"] == "flip" and report["n"] == 2
    assert main(["attack", str(digit_png), "--attack", "flip", "--defense", "dc", "--binarize", "0.5", "--eps", "0.3",
                 "--steps", "2", "--model", str(tiny_checkpoint), "--levels", "2", "--report",
                 str(tmp_path / "r.json"), "--quiet"]) == 0
    attacked = json.loads((tmp_path / "r.json").read_text())
    assert attacked["settings"]["method"] == "flip" and attacked["linf"] <= 0.3 + 1e-6
    # the flip attack may stop early: time per iteration it ran, not per --steps
    assert 0 <= attacked["iterations"] <= 2
    assert attacked["seconds_per_iteration"] == pytest.approx(attacked["seconds"] / max(1, attacked["iterations"]))
    with pytest.raises(SystemExit, match="binarise"):
        main(["attack", str(digit_png), "--attack", "flip", "--defense", "dc", "--model", str(tiny_checkpoint),
              "--levels", "2", "--quiet"])


def test_wilson_interval_known_values():
    from rdc_studio.core.evaluate import wilson_interval

    lo, hi = wilson_interval(985, 1000)
    assert lo == pytest.approx(0.9754, abs=5e-4) and hi == pytest.approx(0.9910, abs=5e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)


def test_sample_grid(tiny_checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_checkpoint), "--n", "2", "--sampler-steps", "3", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert Image.open(out).size == (28 * 10, 28 * 2)


def test_sample_out_dir_writes_one_png_per_sample(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tiny_checkpoint), "--label", "all", "--n", "2", "--sampler-steps", "2",
                 "--out-dir", str(out), "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(f"{y}-{i:03d}.png" for y in range(10) for i in range(2))
    assert Image.open(out / "7-001.png").size == (28, 28)
    assert main(["sample", "--model", str(tiny_checkpoint), "--label", "uncond", "--n", "1", "--sampler-steps", "2",
                 "--out-dir", str(out / "u"), "--device", "cpu"]) == 0
    assert [p.name for p in (out / "u").glob("*.png")] == ["uncond-000.png"]
    with pytest.raises(SystemExit, match="--out-dir"):
        main(["sample", "--model", str(tiny_checkpoint)])


def test_sample_with_churn_is_reproducible_and_rejects_negative_churn(tiny_checkpoint, tmp_path, capsys):
    args = ["sample", "--model", str(tiny_checkpoint), "--label", "3", "--n", "2", "--sampler-steps", "3",
            "--device", "cpu"]
    for run in ("a", "b", "plain"):
        churn = [] if run == "plain" else ["--churn", "20"]
        assert main(args + churn + ["--out-dir", str(tmp_path / run), "--out", str(tmp_path / f"{run}.png")]) == 0
    assert "churn 20" in capsys.readouterr().out
    first = (tmp_path / "a" / "3-000.png").read_bytes()
    assert first == (tmp_path / "b" / "3-000.png").read_bytes() != (tmp_path / "plain" / "3-000.png").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(args + ["--churn", "-1", "--out-dir", str(tmp_path / "bad")])
    assert exc.value.code == 2 and "--churn: must be a finite number in [0, inf)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_classify_with_the_cnn_baseline(digit_png, capsys):
    """``--model mnist-cnn`` classifies with the bundled discriminative baseline."""
    assert main(["classify", str(digit_png), "--model", "mnist-cnn", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "mnist-cnn" and out["settings"] is None
    res = out["results"][0]
    assert res["class"] == "1"  # the fixture is a vertical stroke
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_purify_writes_png_and_never_touches_input(tiny_checkpoint, digit_png, tmp_path, capsys):
    before = digit_png.read_bytes()
    out = tmp_path / "purified.png"
    assert main(["purify", str(digit_png), "--model", str(tiny_checkpoint), "--levels", "2", "--eta", "8/255",
                 "--lm-steps", "3", "--out", str(out), "--json", "--device", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in rep["steps"]] == [0, 1, 2, 3]
    assert max(s["linf"] for s in rep["steps"]) <= 8 / 255 + 1e-6
    assert Image.open(out).size == (28, 28) and digit_png.read_bytes() == before
    with pytest.raises(SystemExit, match="--out .* is an input of this command"):  # refused before the work
        main(["purify", str(digit_png), "--model", str(tiny_checkpoint), "--levels", "2", "--out", str(digit_png)])


@pytest.mark.parametrize("defense,grad", [("dc", "exact"), ("rdc", "exact"), ("rdc", "bpda")])
def test_attack_writes_valid_example_and_report(tiny_checkpoint, digit_png, tmp_path, defense, grad):
    out, rep = tmp_path / "adv.png", tmp_path / "report.json"
    assert main(["attack", str(digit_png), "--model", str(tiny_checkpoint), "--defense", defense, "--grad", grad,
                 "--steps", "2", "--levels", "2", "--lm-steps", "2", "--eta", "0.1", "--eps", "0.3", "--out", str(out),
                 "--report", str(rep), "--device", "cpu", "--quiet"]) == 0
    report = json.loads(rep.read_text())
    assert all(report["checks"].values()) and report["linf"] <= 0.3 + 1e-6
    adv = np.asarray(Image.open(out), dtype=np.float64) / 255
    orig = np.asarray(Image.open(digit_png), dtype=np.float64) / 255
    assert np.abs(adv - orig).max() <= 0.3 + 1e-6
    assert report["iterations"] == 2  # APGD runs every step
    assert report["seconds_per_iteration"] == pytest.approx(report["seconds"] / 2) and report["peak_rss_mb"] > 0


def test_attack_on_the_cnn_loads_no_diffusion_model(tiny_cnn, digit_png, tmp_path):
    rep = tmp_path / "report.json"
    missing = tmp_path / "no-such-model.safetensors"  # would fail if the diffusion model were loaded
    assert main(["attack", str(digit_png), "--model", str(missing), "--defense", "cnn", "--cnn", str(tiny_cnn),
                 "--steps", "2", "--eps", "0.3", "--report", str(rep), "--device", "cpu", "--quiet"]) == 0
    report = json.loads(rep.read_text())
    assert report["defense"] == "cnn" and report["classifier"] is None and report["purify"] is None
    assert report["model"] == "cnn" and report["label_name"] == str(report["label"])
    assert report["linf"] <= 0.3 + 1e-6 and report["iterations"] == 2


@pytest.mark.parametrize("change,message", [
    ({"num_classes": "ten"}, "lacks or mangles its shape"),
    ({"classes": ["a", "b"]}, "names 2 classes for 10 outputs"),
    ({"format": "rdc-studio/diffusion"}, "not a CNN checkpoint"),
    ({"image_size": 40000}, "lacks or mangles its shape"),
    ({"classes": 10}, "classes must be a list of names"),
])
def test_a_mangled_cnn_card_is_a_one_line_error(tiny_cnn, digit_png, change, message):
    card_path = tiny_cnn.with_suffix(".json")
    card_path.write_text(json.dumps(json.loads(card_path.read_text()) | change))
    with pytest.raises(SystemExit, match=message):
        main(["attack", str(digit_png), "--defense", "cnn", "--cnn", str(tiny_cnn), "--steps", "1", "--quiet"])


def test_a_cnn_card_that_is_no_json_object_is_a_one_line_error(tiny_cnn, digit_png):
    tiny_cnn.with_suffix(".json").write_text("[1]")
    with pytest.raises(SystemExit, match="CNN's model card is a JSON list, not an object"):
        main(["attack", str(digit_png), "--defense", "cnn", "--cnn", str(tiny_cnn), "--steps", "1", "--quiet"])


def test_a_cnn_with_nan_weights_is_refused(tmp_path, digit_png):
    import torch

    from rdc_studio.core.baseline import SmallCNN, save_cnn

    cnn = SmallCNN().eval()
    with torch.no_grad():
        cnn.head[-1].bias[0] = float("nan")
    path = save_cnn(tmp_path / "nan-cnn.safetensors", cnn, {"name": "nan-cnn"})
    with pytest.raises(SystemExit, match="head.3.bias' is not finite"):
        main(["classify", "--model", str(path), str(digit_png)])


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_with_attack_on_rdc(tiny_checkpoint, tmp_path):
    out = tmp_path / "robust.json"
    assert main(["eval", "--dataset", "mnist", "--n", "4", "--defense", "rdc", "--attack", "apgd-ce",
                 "--eps", "0.3", "--steps", "2", "--levels", "2", "--lm-steps", "1", "--batch-size", "2",
                 "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 4 and 0 <= rep["robust_acc"] <= rep["clean_acc"] <= 1
    # the default --grad auto resolves to smooth for sign-step purification, and the
    # report records the mode actually used
    assert rep["max_linf"] <= 0.3 + 1e-6 and rep["settings"]["grad"] == "smooth"
    assert rep["forward_backward_passes_per_image"] >= 3


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_resumes_from_state(tiny_checkpoint, tmp_path):
    args = ["eval", "--dataset", "mnist", "--n", "6", "--defense", "dc", "--attack", "apgd-ce", "--eps", "0.3",
            "--steps", "2", "--levels", "2", "--batch-size", "2", "--model", str(tiny_checkpoint), "--device", "cpu"]
    state = tmp_path / "state.jsonl"
    assert main(args + ["--state", str(state), "--out", str(tmp_path / "a.json")]) == 0
    lines = state.read_text().splitlines()
    assert len(lines) == 7  # header + one line per example
    # an interruption after two examples, in the middle of writing the third line
    state.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    assert main(args + ["--state", str(state), "--out", str(tmp_path / "b.json")]) == 0
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a["per_example"] == b["per_example"] and a["robust_acc"] == b["robust_acc"]
    # resuming a finished run recomputes nothing and reports the same
    before = state.read_text()
    assert main(args + ["--state", str(state), "--out", str(tmp_path / "c.json")]) == 0
    assert state.read_text() == before
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["per_example"] == a["per_example"]
    # its time per image still covers every example (the state keeps per-example seconds)
    rows = {}
    for line in before.splitlines()[1:]:
        if line.endswith("}"):  # not the line cut off above
            rows[json.loads(line)["index"]] = json.loads(line)
    per_example_seconds = [row["seconds"] for row in rows.values()]
    assert len(per_example_seconds) == 6 and all(t > 0 for t in per_example_seconds)
    assert c["seconds_per_image"] == pytest.approx(sum(per_example_seconds) / 6)
    assert c["timing"]["examples_timed"] == 6 and c["seconds"] < sum(per_example_seconds)
    # a state written before per-example timings: those lines are left out of the average
    old_format = [before.splitlines()[0]] + [json.dumps({k: v for k, v in rows[i].items() if k != "seconds"})
                                             for i in range(3)]
    state.write_text("\n".join(old_format) + "\n")
    assert main(args + ["--state", str(state), "--out", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["per_example"] == a["per_example"] and d["timing"]["examples_timed"] == 3
    with pytest.raises(SystemExit, match="other settings"):
        main(args + ["--state", str(state), "--eps", "0.1"])


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_refuses_to_resume_a_state_made_on_other_data(tiny_checkpoint, tmp_path):
    """Each state line records its example's label and image digest: a state resumed with
    another --data-root (other images or labels at the same indices) is refused, not mixed."""
    from rdc_studio.core.data import load_dataset
    from rdc_studio.core.evaluate import example_image_sha256

    args = ["eval", "--dataset", "mnist", "--n", "3", "--defense", "dc", "--attack", "apgd-ce", "--eps", "0.3",
            "--steps", "1", "--levels", "2", "--batch-size", "3", "--model", str(tiny_checkpoint), "--device", "cpu"]
    state = tmp_path / "state.jsonl"
    assert main(args + ["--state", str(state)]) == 0
    header, *lines = state.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    test = load_dataset("mnist", "test")
    assert [r["image_sha256"] for r in rows] == [example_image_sha256(test, i) for i in range(3)]
    # (the second refusal also shows that the first released the state's lock)
    for change, message in ((dict(image_sha256="0" * 64), "its example 1 is another image than this data's"),
                            (dict(label=(rows[1]["label"] + 1) % 10), "its example 1 is labelled")):
        state.write_text("\n".join([header, lines[0], json.dumps(rows[1] | change), lines[2]]) + "\n")
        with pytest.raises(SystemExit, match=f"state of a run on other data \\({message}"):
            main(args + ["--state", str(state)])
    older = {k: v for k, v in rows[1].items() if k != "image_sha256"}  # a line written before the digest
    state.write_text("\n".join([header, lines[0], json.dumps(older), lines[2]]) + "\n")
    assert main(args + ["--state", str(state)]) == 0


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_report_names_every_machine_of_a_resumed_state(tiny_checkpoint, tmp_path):
    """Each state line records the machine and device that attacked its example, so a report
    over a state resumed elsewhere names both machines with their counts and seconds, not only
    the last run's; lines written before they recorded it count as "not recorded"."""
    from rdc_studio.core.evaluate import hardware_description, robust_log

    args = ["eval", "--dataset", "mnist", "--n", "3", "--defense", "dc", "--attack", "apgd-ce", "--eps", "0.3",
            "--steps", "1", "--levels", "2", "--batch-size", "3", "--model", str(tiny_checkpoint), "--device", "cpu"]
    state, out = tmp_path / "state.jsonl", tmp_path / "out.json"
    assert main(args + ["--state", str(state), "--out", str(out)]) == 0
    here = hardware_description("cpu")
    header, *lines = state.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["hardware"] for r in rows] == [here] * 3 and here.endswith(", device cpu")
    report = json.loads(out.read_text())
    assert report["hardware"] == here and report["examples_per_hardware"] == {here: 3}
    assert "seconds_per_image_per_hardware" not in report["timing"]

    gpu = "Some CPU, 16 logical CPUs, torch 2.14.1, 16 threads, GPU NVIDIA H200, device cuda:0"
    older = {k: v for k, v in rows[2].items() if k != "hardware"}  # a line written before the machine
    state.write_text("\n".join([header, lines[0], json.dumps(rows[1] | {"hardware": gpu, "seconds": 0.5}),
                                json.dumps(older)]) + "\n")
    assert main(args + ["--state", str(state), "--out", str(out)]) == 0  # nothing left to attack
    report = json.loads(out.read_text())
    assert report["examples_per_hardware"] == {gpu: 1, here: 1, "not recorded": 1}
    machines = sorted([gpu, here]) + ["not recorded"]  # most examples first, then by name; unrecorded last
    assert report["hardware"] == "mixed: " + "; ".join(f"{h} (1 example)" for h in machines)
    per_machine = report["timing"]["seconds_per_image_per_hardware"]
    assert per_machine[gpu] == 0.5 and per_machine[here] == rows[0]["seconds"]
    assert f"hardware: {report['hardware']}\n" in robust_log(report)


def test_eval_grows_a_smaller_runs_state(tiny_checkpoint, tmp_path):
    """A finished run's state serves a run over more examples: the examples it holds are
    not attacked again and the report equals an uninterrupted run over all of them."""
    args = ["eval", "--dataset", "mnist", "--defense", "dc", "--attack", "apgd-ce", "--eps", "0.3",
            "--steps", "2", "--levels", "2", "--batch-size", "2", "--model", str(tiny_checkpoint), "--device", "cpu"]
    small, whole = tmp_path / "small.jsonl", tmp_path / "whole.jsonl"
    assert main(args + ["--n", "4", "--state", str(small), "--out", str(tmp_path / "small.json")]) == 0
    assert main(args + ["--n", "6", "--state", str(whole), "--out", str(tmp_path / "whole.json")]) == 0
    kept = small.read_text().splitlines()[1:]
    assert main(args + ["--n", "6", "--state", str(small), "--out", str(tmp_path / "grown.json")]) == 0
    lines = small.read_text().splitlines()
    assert json.loads(lines[0])["settings"]["n"] == 6 and lines[1:5] == kept and len(lines) == 7
    grown, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("grown", "whole"))
    assert grown["n"] == 6 and grown["per_example"] == ref["per_example"]
    # a state never shrinks, and growing keeps every other setting fixed
    with pytest.raises(SystemExit, match="other settings"):
        main(args + ["--n", "4", "--state", str(small)])
    with pytest.raises(SystemExit, match="other settings"):
        main(args + ["--n", "8", "--state", str(small), "--eps", "0.1"])
    assert json.loads(small.read_text().splitlines()[0])["settings"]["n"] == 6
    # chosen indices grow to a superset of them (a row's survivors after the row grew), never otherwise
    picked, every = tmp_path / "picked.jsonl", tmp_path / "every.jsonl"
    assert main(args + ["--indices", "1,3", "--state", str(picked), "--out", str(tmp_path / "picked.json")]) == 0
    kept = picked.read_text().splitlines()[1:]
    assert main(args + ["--indices", "1-3,5", "--state", str(picked), "--out", str(tmp_path / "more.json")]) == 0
    assert main(args + ["--indices", "1-3,5", "--state", str(every), "--out", str(tmp_path / "every.json")]) == 0
    lines = picked.read_text().splitlines()
    assert json.loads(lines[0])["settings"]["indices"] == "1-3,5" and lines[1:3] == kept and len(lines) == 5
    more, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("more", "every"))
    assert more["per_example"] == ref["per_example"] and [e[0] for e in more["per_example"]] == [1, 2, 3, 5]
    # not a superset, a subset, and a run over the first n
    for choice in (["--indices", "2,4,6,7,8"], ["--indices", "1-3"], ["--n", "8"]):
        with pytest.raises(SystemExit, match="other settings"):
            main(args + choice + ["--state", str(picked)])


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_sharded_eval_matches_single_process(tiny_checkpoint, tmp_path):
    """``torchrun --nproc-per-node 2`` (gloo on CPU) gathers the same report as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # torchrun's own parser would take "--n" for an abbreviation of its options
    args = ["eval", "--dataset", "mnist", "--num-examples", "6", "--defense", "dc", "--attack", "apgd-ce",
            "--eps", "0.3", "--steps", "2", "--levels", "2", "--batch-size", "2", "--model", str(tiny_checkpoint),
            "--device", "cpu", "--threads", "1"]
    assert main(args + ["--out", str(tmp_path / "single.json")]) == 0
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # and "--log" for one of its --log-* options: the log is spelled --log-file there
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "rdc_studio.core.cli"] + args + ["--out", str(tmp_path / "sharded.json"),
                                                           "--log-file", str(tmp_path / "sharded.log")],
                   check=True, cwd=root, env=env, timeout=300, capture_output=True)
    assert "clean accuracy" in (tmp_path / "sharded.log").read_text()
    single = json.loads((tmp_path / "single.json").read_text())
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert sharded["settings"]["shards"] == 2
    for key in ("n", "clean_acc", "robust_acc", "ci95", "robust_ci95", "per_example", "max_linf",
                "forward_backward_passes_per_image"):
        assert sharded[key] == single[key], key


@pytest.fixture
def tiny_cnn(tmp_path):
    """An untrained CNN checkpoint: the transfer attack's source."""
    import torch

    from rdc_studio.core.baseline import SmallCNN, save_cnn

    torch.manual_seed(0)
    return save_cnn(tmp_path / "cnn.safetensors", SmallCNN().eval(), {"name": "cnn", "dataset": "mnist"})


def _ensemble_args(checkpoint, cnn, eps="0.3"):
    # the tiny random model classifies example 6 of the first 8 correctly
    return ["eval", "--dataset", "mnist", "--num-examples", "8", "--defense", "dc", "--attack", "ensemble",
            "--eps", eps, "--steps", "2", "--square-queries", "4", "--targets", "2", "--levels", "2",
            "--batch-size", "3", "--model", str(checkpoint), "--cnn", str(cnn), "--device", "cpu"]


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_ensemble_report_log_and_resume(tiny_checkpoint, tiny_cnn, tmp_path):
    args = _ensemble_args(tiny_checkpoint, tiny_cnn)
    state, log = tmp_path / "state.jsonl", tmp_path / "eval.log"
    assert main(args + ["--state", str(state), "--out", str(tmp_path / "a.json"), "--log", str(log)]) == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    order = ["apgd-ce", "apgd-dlr", "apgd-t", "square", "transfer"]
    assert [row["attack"] for row in rep["per_attack"]] == order == rep["settings"]["ensemble"]["order"]
    accs = [rep["clean_acc"]] + [row["robust_acc"] for row in rep["per_attack"]]
    assert all(a >= b for a, b in zip(accs, accs[1:])) and accs[-1] == rep["robust_acc"]
    n_clean = round(rep["clean_acc"] * rep["n"])
    assert n_clean >= 1 and n_clean - sum(row["success"] for row in rep["per_attack"]) == round(rep["robust_acc"] * 8)
    for row in rep["per_attack"]:
        lo, hi = row["robust_ci95"]
        assert lo <= row["robust_acc"] <= hi
    for index, label, clean, robust, broken_by in rep["per_example"]:
        assert (broken_by is None) == bool(robust) and (broken_by == "clean") == (not clean)
    assert rep["seeds"]["attack_seed"] == 0 and rep["settings"]["attack_settings"]["square"]["steps"] == 4
    assert rep["settings"]["attack_settings"]["square"]["method"] == "square"
    assert rep["max_linf"] <= 0.3 + 1e-6 and rep["seconds_per_image"] > 0
    assert rep["forward_backward_passes_per_image"] > 1 and set(rep["attack_forward_passes_this_run"]) == set(order)
    text = log.read_text()
    assert f"clean accuracy: {100 * rep['clean_acc']:.2f}%" in text
    assert f"robust accuracy after APGD-CE: {100 * rep['per_attack'][0]['robust_acc']:.2f}%" in text
    assert "robust accuracy after Square:" in text and f"robust accuracy: {100 * rep['robust_acc']:.2f}%" in text
    assert "seeds:" in text and "per image" in text and not list(tmp_path.glob("*.part"))
    # resumable: an interruption after two examples, mid-line; the report comes out the same
    lines = state.read_text().splitlines()
    assert len(lines) == 9 and any('"broken_by"' in line for line in lines[1:])
    state.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    assert main(args + ["--state", str(state), "--out", str(tmp_path / "b.json")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["per_example"] == rep["per_example"] and again["per_attack"] == rep["per_attack"]


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_ensemble_runs_every_attack_on_the_unbroken(tiny_checkpoint, tiny_cnn, tmp_path):
    """At eps 0 nothing can be broken: each attack runs on every clean-correct example."""
    out = tmp_path / "r.json"
    assert main(_ensemble_args(tiny_checkpoint, tiny_cnn, eps="0") + ["--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["robust_acc"] == rep["clean_acc"] > 0
    assert all(row["success"] == 0 and row["attacked"] == round(rep["clean_acc"] * 8) for row in rep["per_attack"])
    assert all(q > 0 for q in rep["attack_forward_passes_this_run"].values())
    assert rep["max_linf"] == 0.0


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_ensemble_results_do_not_depend_on_shards_or_batches(tiny_checkpoint):
    """What torchrun shards (indices rank::world) and batch sizes change must not change an
    example's ensemble result (per-example seeds)."""
    import torch
    from torch import nn

    from rdc_studio.core.attacks import standard_ensemble
    from rdc_studio.core.classifier import build_classifier
    from rdc_studio.core.data import load_dataset
    from rdc_studio.core.evaluate import evaluate_ensemble
    from rdc_studio.core.models import load_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    clf = build_classifier(model, "cpu", steps=2)
    ds = load_dataset("mnist", "test")
    torch.manual_seed(0)
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    members = standard_ensemble("linf", 0.1, steps=2, targets=2, square_queries=4)

    def run(indices, batch_size):
        return {r.index: r for rec in evaluate_ensemble(clf, ds, members, indices, batch_size, surrogate=surrogate)
                for r in rec.results}

    whole = run(list(range(8)), 8)
    shards = run(list(range(8))[0::2], 3) | run(list(range(8))[1::2], 2)
    assert whole == shards and any(r.broken_by not in (None, "clean") for r in whole.values())


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_transfer_attack_alone(tiny_checkpoint, tiny_cnn, tmp_path):
    """``--attack transfer``: the ensemble's transfer attack on its own (the masking checks compare it)."""
    args = [a if a != "ensemble" else "transfer" for a in _ensemble_args(tiny_checkpoint, tiny_cnn)]
    out, log = tmp_path / "t.json", tmp_path / "t.log"
    assert main(args + ["--out", str(out), "--log", str(log)]) == 0
    rep = json.loads(out.read_text())
    assert [row["attack"] for row in rep["per_attack"]] == ["transfer"] == rep["settings"]["ensemble"]["order"]
    assert rep["settings"]["attack"] == "transfer" and "targets" not in rep["settings"]["ensemble"]
    assert list(rep["settings"]["attack_settings"]) == ["transfer"] and rep["max_linf"] <= 0.3 + 1e-6
    assert rep["per_attack"][-1]["robust_acc"] == rep["robust_acc"] <= rep["clean_acc"]
    assert "robust accuracy after transfer (APGD-CE on the CNN)" in log.read_text()


def test_help_is_fast_documents_every_option_and_names_noise_levels_levels():
    """``rdc --help`` imports no torch; every option has help text; --levels means noise levels everywhere."""
    import argparse
    import subprocess
    import sys

    code = ("import sys; from rdc_studio.core.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    from rdc_studio.core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"rdc {name} {action.option_strings or action.dest}: no help text"
        flags = {f for action in parser._actions for f in action.option_strings}
        if "--weighting" in flags:  # the classifier options
            assert "--levels" in flags, name
    help_text = sub.choices["eval"].format_help()
    assert "(default: 100)" in help_text and "--levels T" in help_text
    assert "--steps" not in sub.choices["classify"].format_help()  # the old name still parses, unlisted


def test_python_dash_m_runs_the_command_line():
    """``python -m rdc_studio.core`` is the ``rdc`` program (what the robustness table spawns)."""
    out = subprocess.run([sys.executable, "-m", "rdc_studio.core", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: rdc ")


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_of_chosen_indices_attacks_them_as_a_run_over_the_first_n_does(tmp_path, capsys):
    """--indices picks examples by index (the survivors of an earlier run); each example's attack
    is seeded by its index alone, so its result is the one a run over the first n gives."""
    common = ["eval", "--dataset", "mnist", "--split", "test", "--defense", "cnn", "--attack", "ensemble",
              "--norm", "linf", "--eps", "0.12", "--steps", "3", "--targets", "1", "--square-queries", "3",
              "--threads", "1", "--batch-size", "2"]
    assert main(common + ["--n", "8", "--out", str(tmp_path / "first.json")]) == 0
    state = tmp_path / "picked.state.jsonl"
    picked = common + ["--indices", "6,2,5-7", "--state", str(state)]
    assert main(picked + ["--out", str(tmp_path / "picked.json"), "--batch-size", "3"]) == 0
    first, chosen = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "picked"))
    assert chosen["n"] == 4 and chosen["settings"]["indices"] == "2,5-7"
    assert chosen["per_example"] == [row for row in first["per_example"] if row[0] in (2, 5, 6, 7)]
    # a state belongs to its indices: other examples are another run
    with pytest.raises(SystemExit, match="other settings"):
        main(common + ["--indices", "2,5", "--state", str(state)])
    # clean accuracy of chosen examples, and indices outside the split
    assert main(common[:7] + ["--attack", "none", "--indices", "0-3", "--out", str(tmp_path / "clean.json")]) == 0
    assert json.loads((tmp_path / "clean.json").read_text())["n"] == 4
    with pytest.raises(SystemExit, match="within 0-9999"):
        main(common + ["--indices", "10000"])
    with pytest.raises(SystemExit, match="runs backwards"):
        main(common + ["--indices", "7-5"])


HANG_S = 300  # only a hang detector: nothing here depends on how fast the machine is


def _start_cli(args: list[str]) -> subprocess.Popen:
    """``rdc ARGS`` in a child process (its own Ctrl+C handling, unlike ``main`` in-process)."""
    import os

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "rdc_studio.core.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_ctrl_c_stops_an_eval_cleanly_with_its_state_saved(tiny_checkpoint, tmp_path):
    import signal
    import time

    from rdc_studio.core.evaluate import read_state_file

    state, out = tmp_path / "run.state.jsonl", tmp_path / "run.json"
    proc = _start_cli(["eval", "--dataset", "mnist", "--split", "test", "--n", "500", "--defense", "dc",
                       "--attack", "apgd-ce", "--eps", "0.3", "--steps", "50", "--levels", "4", "--batch-size", "1",
                       "--model", str(tiny_checkpoint), "--device", "cpu", "--threads", "1",
                       "--state", str(state), "--out", str(out)])
    try:
        deadline = time.monotonic() + HANG_S
        while not (state.exists() and len(state.read_text().splitlines()) >= 3):  # two examples done
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"rdc: stopped; the examples finished are in {state}" in err
    assert not out.exists()  # no report of a run that did not finish
    saved = read_state_file(state)
    assert 2 <= len(saved.results) < 500 and len(state.read_text().splitlines()) == len(saved.results) + 1


def test_ctrl_c_stops_an_attack_cleanly(tiny_checkpoint, digit_png, tmp_path):
    import signal

    report = tmp_path / "attack.json"
    proc = _start_cli(["attack", str(digit_png), "--defense", "dc", "--attack", "apgd-ce", "--eps", "0.3",
                       "--steps", "10", "--eot", "300", "--levels", "2", "--model", str(tiny_checkpoint),
                       "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "adv.png"),
                       "--report", str(report)])
    try:
        first = proc.stderr.readline()
        while first and not first.startswith("iter"):  # the first progress line: iteration 1 of 10
            first = proc.stderr.readline()
        assert first.startswith("iter"), proc.communicate(timeout=HANG_S)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rdc: stopped after" in err and "nothing written" in err
    assert not report.exists() and not (tmp_path / "adv.png").exists()


def test_ctrl_c_stops_sampling_cleanly(tiny_checkpoint, tmp_path):
    import signal
    import time

    out_dir, grid = tmp_path / "samples", tmp_path / "grid.png"
    proc = _start_cli(["sample", "--model", str(tiny_checkpoint), "--label", "all", "--n", "10",
                       "--sampler-steps", "300", "--out-dir", str(out_dir), "--out", str(grid), "--threads", "1"])
    try:
        deadline = time.monotonic() + HANG_S
        while len(list(out_dir.glob("0-*.png"))) < 10:  # the first class is written
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    import re

    kept = re.search(r"rdc: stopped; ([0-9]+) PNGs of the classes before it are in", err)
    assert "Traceback" not in err and kept, err
    assert not grid.exists() and int(kept[1]) == len(list(out_dir.glob("*.png"))) < 100


def test_ctrl_c_stops_classifying_many_images_cleanly(tiny_checkpoint, digit_png):
    import signal

    images = [str(digit_png)] * 5000
    proc = _start_cli(["classify", *images, "--model", str(tiny_checkpoint), "--levels", "8", "--device", "cpu",
                       "--threads", "1"])
    try:
        first = proc.stdout.readline()  # the first image is classified
        assert first.startswith(str(digit_png)), proc.communicate(timeout=HANG_S)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    import re

    done = re.search(r"rdc: stopped after ([0-9]+) of 5000 images", err)
    assert "Traceback" not in err and done, err
    assert 1 <= int(done[1]) < 5000 and len((first + out).splitlines()) == int(done[1])


def test_ctrl_c_stops_a_purification_cleanly(tiny_checkpoint, digit_png, tmp_path):
    import signal

    purified = tmp_path / "purified.png"
    proc = _start_cli(["purify", str(digit_png), "--model", str(tiny_checkpoint), "--lm-steps", "5000",
                       "--levels", "2", "--device", "cpu", "--threads", "1", "--out", str(purified)])
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("step   1"):  # the first step is made
            line = proc.stdout.readline()
        assert line.startswith("step   1"), proc.communicate(timeout=HANG_S)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rdc: stopped after" in err and "of 5000 steps; nothing written" in err
    assert not purified.exists()


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_ctrl_c_stops_an_ood_calibration_without_touching_the_card(tiny_checkpoint):
    import re
    import signal

    card = tiny_checkpoint.with_suffix(".json")
    before = card.read_bytes()
    proc = _start_cli(["ood-calibrate", "--model", str(tiny_checkpoint), "--n", "0", "--levels", "8",
                       "--batch-size", "2", "--device", "cpu", "--threads", "1"])
    try:
        seen = ""
        while not re.search(r"\| *[1-9][0-9]*/[0-9]+ ", seen):  # the progress bar counts a first batch
            char = proc.stderr.read(1)
            assert char, seen + proc.communicate(timeout=HANG_S)[1]
            seen += char
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rdc: stopped; the model card of" in err and "was not changed" in err
    assert card.read_bytes() == before


def test_a_command_leaves_the_signal_handlers_as_it_found_them(tiny_checkpoint, digit_png, tmp_path):
    """rdc attack installs its Ctrl-C handling for its own run only (main may run in-process)."""
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["attack", str(digit_png), "--defense", "dc", "--attack", "apgd-ce", "--eps", "0.3", "--steps", "1",
                 "--levels", "2", "--model", str(tiny_checkpoint), "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "adv.png")]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_stop_scope_ends_its_block_on_its_own_stop_only():
    """Ctrl-C's scope swallows the stop it asked for, never a cancellation of an enclosing scope."""
    import signal

    from rdc_studio.core.cli import _StopOnSignals
    from rdc_studio.core.runtime import OperationCancelled, cancellation_scope, raise_if_cancelled

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = _StopOnSignals()
        reached = []
        with stop.scope():
            raise_if_cancelled()  # nothing asked yet: runs on
            reached.append("before")
        with pytest.raises(OperationCancelled), cancellation_scope(lambda: True), stop.scope():
            raise_if_cancelled(lambda: True)  # someone else's stop passes through
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C asks; it does not interrupt
        assert stop()
        with stop.scope():
            raise_if_cancelled()  # the network call's poll inside the scope sees it
            reached.append("after")
        assert reached == ["before"]
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


@pytest.mark.parametrize("argv, message", [
    (["purify", "{img}", "--out", "{img}"], "is an input of this command"),
    (["attack", "{img}", "--defense", "dc", "--steps", "1", "--out", "{img}"], "is an input of this command"),
    (["attack", "{img}", "--defense", "dc", "--steps", "1", "--label", "11"], "--label 11 is not a class"),
    (["attack", "{img}", "--defense", "dc", "--attack", "apgd-t", "--steps", "1", "--target", "-1"],
     "--target -1 is not a class"),
    (["sample", "--label", "10", "--out", "{tmp}/s.png"], r"--label 10 is not a class of this model \(0..9\)"),
    (["sample", "--label", "-1", "--out", "{tmp}/s.png"], "--label -1 is not a class"),
    (["purify", "{img}", "--out", "{tmp}"], "is a folder"),
    (["attack", "{img}", "--defense", "dc", "--steps", "1", "--out", "{tmp}/adv.jpg"], "name a .png file"),
    (["attack", "{img}", "--defense", "dc", "--steps", "1", "--report", "{tmp}/"], "--report .* is a folder"),
    (["eval", "--n", "1", "--attack", "apgd-ce", "--steps", "1", "--state", "{tmp}"], "--state .* is a folder"),
    (["sample", "--label", "3", "--out-dir", "{img}"], "--out-dir .* is a file"),
    (["train-cnn", "--out", "{tmp}/"], "is a folder"),
    (["train", "--out", "{img}"], "is a file; give a run directory"),
    (["train", "--out", "{tmp}/run", "--channels", "8,x"], "comma-separated whole numbers"),
    (["train", "--out", "{tmp}/run", "--epochs", "0"], "--epochs 0 trains nothing"),
    (["attack", "{img}", "--defense", "dc", "--attack", "apgd-ce", "--target", "3"], "--target applies to"),
    (["attack", "{img}", "--defense", "dc", "--attack", "apgd-t", "--label", "1", "--target", "1"], "true class"),
    (["purify", "{img}", "--eta", "nan"], None),
    (["attack", "{img}", "--defense", "dc", "--eps", "inf", "--norm", "l2"], None),
    (["attack", "{img}", "--defense", "dc", "--attack", "pgd", "--step-size", "-1"], None),
    (["classify", "{img}", "--device", "tpu"], None),
    (["sample", "--label", "3", "--out-dir", "{tmp}/g", "--out", "{tmp}/g/3-000.png"],
     "named like one of the samples --out-dir writes"),
    (["sample", "--label", "3", "--seed", "18446744073709551616", "--out", "{tmp}/s.png"], None),
    (["train", "--out", "{tmp}/run", "--seed", "99999999999999999999"], None),
    (["train", "--out", "{tmp}/run", "--emb-dim", "17", "--limit", "8"], "emb_dim must be even"),
])
def test_mistakes_are_refused_with_a_message_before_any_work(tiny_checkpoint, digit_png, tmp_path, argv, message):
    """Refused up front (before, a whole attack ran and then ended in a traceback)."""
    argv = [a.format(img=digit_png, tmp=tmp_path) for a in argv]
    before = digit_png.read_bytes()
    if "--device" not in argv and argv[0] != "train-cnn":
        argv += ["--device", "cpu"]
    if argv[0] not in ("train", "train-cnn"):
        argv += ["--model", str(tiny_checkpoint)]
    if message is None:  # a usage error (exit status 2, the message on stderr)
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    else:
        with pytest.raises(SystemExit, match=message):
            main(argv)
    assert digit_png.read_bytes() == before and not (tmp_path / "s.png").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--n", "-5"], "--n/--num-examples: must be at least 0, not -5"),
    (["sample", "--label", "3", "--n", "0", "--out", "s.png"], "--n: must be at least 1, not 0"),
    (["eval", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["sample", "--sampler-steps", "0", "--out", "s.png"], "--sampler-steps: must be at least 1"),
    (["train", "--out", "run", "--epochs", "-1"], r"--epochs: must be a finite number in \[0, inf\)"),
    (["train", "--out", "run", "--ema-decay", "2"], r"in \[0, 1\)"),
    (["sample", "--churn", "nan", "--out", "s.png"], "--churn: must be a finite number"),
    (["classify", "x.png", "--threads", "-1"], "--threads: must be at least 0"),
    (["eval", "--attack", "ensemble", "--square-queries", "0"], "--square-queries: must be at least 1"),
    (["attack", "x.png", "--p-init", "0"], r"--p-init: must be a finite number in \(0, 1\]"),
])
def test_option_values_out_of_range_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_cnn_baseline_given_as_a_diffusion_model_is_named_as_such(capsys):
    with pytest.raises(SystemExit, match="the CNN baseline .*not a diffusion model"):
        main(["sample", "--model", "mnist-cnn", "--label", "3", "--out", "unused.png"])


def test_a_resumed_training_run_keeps_its_batches_and_says_what_changes(tmp_path, capsys):
    base = ["train", "--out", str(tmp_path / "run"), "--limit", "64", "--channels", "8,16", "--head-channels",
            "4,4", "--emb-dim", "16", "--threads", "1", "--log-every", "1", "--device", "cpu",
            "--log", str(tmp_path / "log.jsonl"), "--batch-size", "32"]
    assert main(base + ["--epochs", "1"]) == 0
    state = (tmp_path / "run" / "state.json").read_bytes()
    with pytest.raises(SystemExit, match="batch size: 32 -> 16"):
        main(base[:-1] + ["16", "--epochs", "2"])
    assert (tmp_path / "run" / "state.json").read_bytes() == state  # refused before any step
    capsys.readouterr()
    assert main(base + ["--epochs", "2", "--lr", "5e-4"]) == 0
    err = capsys.readouterr().err
    assert "changed schedule" in err and "epochs: 1.0 -> 2.0; lr: 0.001 -> 0.0005" in err
    for line in (tmp_path / "log.jsonl").read_text().splitlines():  # strict JSON: no NaN for "not measured"
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the training log"))
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["training"]["lr"] == 5e-4 and card["training"]["epochs"] == 2


def test_a_clean_evaluation_says_that_state_files_keep_attacked_runs_only(tiny_checkpoint, tmp_path, capsys):
    if not mnist_available():
        pytest.skip("MNIST not available")
    assert main(["eval", "--n", "2", "--levels", "2", "--screen-levels", "0", "--model", str(tiny_checkpoint),
                 "--device", "cpu", "--threads", "1", "--state", str(tmp_path / "s.jsonl")]) == 0
    assert "--state keeps attacked runs only" in capsys.readouterr().err


def test_worst_case_refuses_one_report_given_twice(tmp_path):
    report = tmp_path / "a.json"
    report.write_text("{}")
    with pytest.raises(SystemExit, match="given twice"):
        main(["worst-case", str(report), str(tmp_path / "." / "a.json")])


def test_worst_case_names_an_unusable_report_in_one_line(tmp_path):
    import os

    bad = {"list.json": "[1]", "latin.json": b'{"a": "\xff"}', "other.json": '{"a": 1}'}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    messages = {"list.json": "a JSON list, not an object", "latin.json": "not valid JSON",
                "other.json": "not an rdc eval attack report"}
    if os.path.exists("/dev/zero"):  # would be read forever
        (tmp_path / "zero.json").symlink_to("/dev/zero")
        messages["zero.json"] = "not a regular file"
    for name, message in messages.items():
        with pytest.raises(SystemExit, match=message):
            main(["worst-case", str(tmp_path / name), str(tmp_path / "b.json")])


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_refuses_more_target_classes_than_the_model_has(tiny_checkpoint, tiny_cnn, tmp_path):
    """Ten classes leave 9 targets: a report saying 20 would misstate what ran."""
    args = _ensemble_args(tiny_checkpoint, tiny_cnn)
    args[args.index("--targets") + 1] = "20"
    with pytest.raises(SystemExit, match="1 to 9 target classes on mnist, not 20"):
        main(args + ["--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_outputs_never_overwrite_an_input_or_each_other_and_are_checked_before_any_work(tiny_cnn, digit_png,
                                                                                      tmp_path):
    original = digit_png.read_bytes()
    attack = ["attack", str(digit_png), "--defense", "cnn", "--cnn", str(tiny_cnn), "--steps", "1", "--quiet"]
    with pytest.raises(SystemExit, match="--report .* is an input of this command"):
        main(attack + ["--report", str(digit_png)])
    with pytest.raises(SystemExit, match="--out and --report name one file"):
        main(attack + ["--out", str(tmp_path / "same.png"), "--report", str(tmp_path / "." / "same.png")])
    with pytest.raises(SystemExit, match=f"{digit_png} is a file, not a folder"):
        main(attack + ["--out", str(digit_png / "adv.png")])
    assert digit_png.read_bytes() == original and not (tmp_path / "same.png").exists()
    with pytest.raises(SystemExit, match="--out and --state name one file"):
        main(["eval", "--defense", "cnn", "--n", "2", "--out", str(tmp_path / "s.json"),
              "--state", str(tmp_path / "s.json")])
    with pytest.raises(SystemExit, match="--out and --log name one file"):
        main(["eval", "--defense", "cnn", "--n", "2", "--out", str(tmp_path / "s.json"),
              "--log", str(tmp_path / "s.json")])
    report = tmp_path / "a.json"
    report.write_text("{}")
    with pytest.raises(SystemExit, match="--out .*a.json is an input of this command"):
        main(["worst-case", str(report), str(tmp_path / "b.json"), "--out", str(report)])
    assert report.read_text() == "{}"
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        main(["train", "--out", str(tmp_path / "run"), "--log", str(report / "log.jsonl")])


def test_an_os_error_while_writing_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    from rdc_studio.core import cli

    def fails(args):
        raise OSError(28, "No space left on device", str(tmp_path / "r.json"))

    monkeypatch.setattr(cli, "cmd_worst_case", fails)
    assert main(["worst-case", str(tmp_path / "a.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rdc: error: [Errno 28] No space left on device") and err.count("\n") == 1


def test_attack_says_when_the_file_was_converted_for_the_model(tiny_cnn, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    stroke = np.zeros((28, 28), np.uint8)
    stroke[4:24, 12:16] = 255
    exact, inverted, large = tmp_path / "exact.png", tmp_path / "inverted.png", tmp_path / "large.png"
    Image.fromarray(stroke).save(exact)
    Image.fromarray(255 - stroke).save(inverted)
    Image.fromarray(np.kron(stroke, np.ones((2, 2), np.uint8))).save(large)
    expected = {exact: [], inverted: ["inverted (a dark digit on a light background)"],
                large: ["56x56 cropped/resized to 28x28"]}
    for image, changes in expected.items():
        rep = tmp_path / f"{image.stem}.json"
        assert main(["attack", str(image), "--defense", "cnn", "--cnn", str(tiny_cnn), "--steps", "1", "--quiet",
                     "--report", str(rep)]) == 0
        assert json.loads(rep.read_text())["input_conversion"] == changes
        err = capsys.readouterr().err
        assert ("was converted for the model" in err) == bool(changes)


def test_options_that_do_not_apply_are_named_in_a_warning(tiny_cnn, digit_png, capsys):
    base = ["attack", str(digit_png), "--cnn", str(tiny_cnn), "--steps", "1", "--quiet"]
    assert main(base + ["--defense", "cnn", "--levels", "3", "--eta", "8/255", "--grad", "bpda"]) == 0
    err = capsys.readouterr().err
    assert "--levels, --eta do not apply to --defense cnn" in err and "--grad bpda does not apply" in err
    assert main(base + ["--defense", "cnn", "--attack", "square", "--step-size", "0.01"]) == 0
    assert "--step-size is PGD's; square sets its own steps" in capsys.readouterr().err
    assert main(base + ["--defense", "cnn"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("--eps", "-0.1", "--eps: must be at least 0, not -0.1"), ("--eps", "1/0", "--eps: not a number or a fraction"),
    ("--eta", "3", "--eta: must be at most 1 .* e.g. 3/255"), ("--step-size", "0", "--step-size: must be above 0"),
    ("--eps", "inf", "--eps: not a finite number"), ("--eta", "nan", "--eta: not a finite number"),
])
def test_distances_out_of_range_are_usage_errors(digit_png, capsys, option, value, message):
    with pytest.raises(SystemExit) as info:
        main(["attack", str(digit_png), "--defense", "cnn", "--attack", "pgd", option, value])
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_default_threads_follow_omp_num_threads_and_the_usable_cores(monkeypatch):
    import os

    from rdc_studio.core.defense import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert default_threads() == 1


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_apgd_t_tries_every_target_class_it_is_given(tiny_cnn, tmp_path):
    """Before, --attack apgd-t ran the runner-up class only, whatever --targets said."""
    reports = {}
    for targets in (1, 3):
        out = tmp_path / f"t{targets}.json"
        assert main(["eval", "--defense", "cnn", "--cnn", str(tiny_cnn), "--attack", "apgd-t", "--targets",
                     str(targets), "--eps", "0.05", "--steps", "2", "--n", "4", "--threads", "1", "--device", "cpu",
                     "--out", str(out)]) == 0
        reports[targets] = json.loads(out.read_text())
    assert reports[3]["settings"]["ensemble"] == {"order": ["apgd-t"], "targets": 3}
    assert reports[3]["attack_revision"] == 2  # reports say which revision of the attacks made them
    passes = {t: r["forward_backward_passes_per_image"] for t, r in reports.items()}
    survivors = sum(1 for row in reports[1]["per_example"] if row[3])
    assert reports[3]["robust_acc"] <= reports[1]["robust_acc"]
    assert survivors == 0 or passes[3] > passes[1]  # the survivors of the first target got two more


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_eval_warns_about_targets_only_when_they_are_given_to_an_attack_without_targets(tiny_cnn, tmp_path, capsys):
    base = ["eval", "--defense", "cnn", "--cnn", str(tiny_cnn), "--eps", "0.05", "--steps", "1", "--n", "2",
            "--threads", "1", "--device", "cpu"]
    assert main(base + ["--attack", "apgd-ce", "--targ", "3", "--out", str(tmp_path / "a.json")]) == 0
    assert "--targets applies to the ensemble and apgd-t, not apgd-ce; ignored" in capsys.readouterr().err
    assert main(base + ["--attack", "apgd-ce", "--out", str(tmp_path / "b.json")]) == 0
    assert "--targets" not in capsys.readouterr().err
    assert main(base + ["--attack", "apgd-t", "--out", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["ensemble"]["targets"] == 9  # the default


def test_train_on_a_missing_device_is_a_usage_error_before_the_run_folder_is_made(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), "--device", "cuda", "--limit", "8"])
    assert exc.value.code == 2 and "--device cuda" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sample_all_of_a_model_without_classes_draws_unconditional_samples(tmp_path, capsys):
    """Before, ``--label all`` (the default) of an unconditional model drew nothing and then
    failed on the empty grid with a traceback."""
    from rdc_studio.core.models import save_checkpoint
    from rdc_studio.core.nets import NetConfig, build_denoiser

    net = build_denoiser(NetConfig(channels=(8, 16), head_channels=(4,), emb_dim=32, num_classes=0))
    model = save_checkpoint(tmp_path / "uncond.safetensors", net, {"name": "u", "dataset": "mnist", "classes": []})
    assert main(["sample", "--model", str(model), "--n", "2", "--sampler-steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["uncond-000.png", "uncond-001.png"]
    assert Image.open(tmp_path / "grid.png").size == (28, 56)


def test_sample_warns_about_samples_of_an_earlier_run_in_its_folder(tiny_checkpoint, tmp_path, capsys):
    common = ["sample", "--model", str(tiny_checkpoint), "--sampler-steps", "1", "--device", "cpu",
              "--out-dir", str(tmp_path / "s")]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.png").write_bytes(b"not a sample")  # the user's file: neither touched nor counted
    assert main(common + ["--label", "all", "--n", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(common + ["--label", "3", "--n", "2"]) == 0
    err = capsys.readouterr().err
    assert "also holds 9 sample(s) of an earlier run (0-000.png, 1-000.png, 2-000.png, ...)" in err
    assert len(list((tmp_path / "s").glob("*.png"))) == 12  # nothing deleted


@pytest.mark.skipif(not (Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "edm").exists(),
                    reason="needs ../shared/fixtures/edm")
def test_ood_calibrate_refuses_a_snapshot_before_scoring(monkeypatch):
    """Its reference goes into a checkpoint's card: a .pkl was scored in full, then refused."""
    import rdc_studio.core.ood as ood

    snapshot = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "edm" / "vp-ddpmpp-cond.pkl"
    monkeypatch.setattr(ood, "score_images", lambda *a, **k: pytest.fail("scored before the check"))
    with pytest.raises(SystemExit, match="convert the snapshot first .rdc import-edm"):
        main(["ood-calibrate", "--model", str(snapshot), "--device", "cpu", "--n", "10"])


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_a_stop_during_the_last_training_step_reports_the_finished_model(tmp_path, monkeypatch, capsys):
    """Before, a Ctrl-C that came during the last step (the model written) said "stopped;
    re-run the same command to resume" with exit 130."""
    import os
    import signal

    import rdc_studio.core.train as train_module

    def finishing_with_a_stop(*args, **kwargs):
        yield train_module.TrainStep(1, 2, 0.5, 1.0, 10.0, 1e-3, 0.1)
        os.kill(os.getpid(), signal.SIGINT)  # arrives during the last step
        yield train_module.TrainStep(2, 2, 1.0, 1.0, 10.0, 1e-3, 0.2)

    monkeypatch.setattr(train_module, "train", finishing_with_a_stop)
    assert main(["train", "--out", str(tmp_path / "run"), "--limit", "8", "--device", "cpu"]) == 0
    assert f"wrote {tmp_path / 'run' / 'model.safetensors'}" in capsys.readouterr().out


def test_classify_reads_an_image_as_attack_and_purify_do(tiny_checkpoint, tmp_path, capsys):
    """A converted image is classified on the 8-bit grid (as a PNG of it holds it, and as rdc
    attack and rdc purify read it), so the three commands never give a borderline image two answers."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (56, 56)).astype(np.uint8)).save(tmp_path / "big.png")
    from rdc_studio.core.images import load_for_model

    converted = load_for_model(tmp_path / "big.png", 28, 1)
    assert not np.array_equal(np.round(converted * 255) / 255, converted)  # the resize left the grid
    Image.fromarray(np.round(converted[0] * 255).astype(np.uint8)).save(tmp_path / "small.png")
    logits = []
    for name in ("big.png", "small.png"):
        assert main(["classify", str(tmp_path / name), "--model", str(tiny_checkpoint), "--levels", "2", "--json",
                     "--device", "cpu"]) == 0
        logits.append(json.loads(capsys.readouterr().out)["results"][0]["logits"])
    assert logits[0] == pytest.approx(logits[1], abs=1e-6)
