"""core.evaluate helpers that the CLI tests do not pin down."""
import json

import pytest
import torch

from rdc_studio.core.evaluate import module_device


def test_module_device_looks_at_parameters_when_there_are_no_buffers():
    cnn_like = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, device="meta"), torch.nn.ReLU())
    assert next(cnn_like.buffers(), None) is None and module_device(cnn_like) == torch.device("meta")
    with_buffer = torch.nn.BatchNorm2d(2, device="meta")
    assert module_device(with_buffer) == torch.device("meta")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # nothing to go by


def _report(grad, per_example, eps=0.3, purify_eta=0.3, attack="apgd-ce", model="m"):
    """A minimal rdc eval attack report: [index, label, clean, robust(, broken_by)] rows."""
    return {"model": {"name": model}, "n": len(per_example), "per_example": per_example,
            "settings": {"dataset": "mnist", "split": "test", "defense": "rdc", "classifier": {"steps": 4},
                         "purify": {"eta": purify_eta}, "grad": grad, "attack": attack,
                         "command": f"rdc eval --grad {grad}",
                         "attack_settings": {"method": "apgd", "norm": "linf", "eps": eps}}}


def test_worst_case_counts_an_example_robust_only_if_every_run_left_it_robust():
    from rdc_studio.core.evaluate import worst_case_report

    smooth = _report("smooth", [[0, 7, 1, 0], [1, 2, 1, 1], [2, 1, 1, 1], [3, 0, 0, 0], [4, 4, 1, 1]])
    bpda = _report("bpda", [[0, 7, 1, 1], [1, 2, 1, 0], [2, 1, 1, 1], [3, 0, 0, 0]])  # n = 4: common are 0..3
    w = worst_case_report([smooth, bpda])
    assert w["n"] == 4 and w["clean_acc"] == 0.75 and w["robust_acc"] == 0.25  # only example 2 survives both
    assert [e[3] for e in w["per_example"]] == [0, 0, 1, 0]
    assert w["per_example"][0][4] == ["rdc smooth apgd-ce"] and w["per_example"][3][4] == []  # 3 was never clean
    assert [(r["label"], r["robust_acc_on_common"], r["broke"], r["broke_alone"]) for r in w["runs"]] == [
        ("rdc smooth apgd-ce", 0.5, 1, 1), ("rdc bpda apgd-ce", 0.5, 1, 1)]
    lo, hi = w["robust_ci95"]
    assert lo < 0.25 < hi and (w["norm"], w["eps"]) == ("linf", 0.3)


def test_worst_case_refuses_reports_of_different_models_or_threats():
    import pytest

    from rdc_studio.core.evaluate import worst_case_report

    rows = [[0, 7, 1, 1]]
    with pytest.raises(ValueError, match="threat model"):
        worst_case_report([_report("smooth", rows), _report("bpda", rows, eps=0.2)])
    with pytest.raises(ValueError, match="purify"):
        worst_case_report([_report("smooth", rows), _report("bpda", rows, purify_eta=0.5)])
    with pytest.raises(ValueError, match="model"):
        worst_case_report([_report("smooth", rows), _report("bpda", rows, model="other")])
    with pytest.raises(ValueError, match="share no examples"):
        worst_case_report([_report("smooth", rows), _report("bpda", [[5, 1, 1, 1]])])
    with pytest.raises(ValueError, match="at least two"):
        worst_case_report([_report("smooth", rows)])


def test_rdc_worst_case_command(tmp_path, capsys):
    import json

    import pytest

    from rdc_studio.core.cli import main

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "w.json"
    a.write_text(json.dumps(_report("smooth", [[0, 7, 1, 1], [1, 2, 1, 0]], attack="ensemble")))
    b.write_text(json.dumps(_report("exact", [[0, 7, 1, 0], [1, 2, 1, 1]])))
    assert main(["worst-case", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a.json (rdc smooth ensemble): robust 50.00%" in text and "worst case per example: robust accuracy 0.00%" in text
    w = json.loads(out.read_text())
    assert w["robust_acc"] == 0.0 and w["reports"] == [str(a), str(b)]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json: the attack report is not valid JSON"):
        main(["worst-case", str(a), str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="threat model"):
        b.write_text(json.dumps(_report("exact", [[0, 7, 1, 0]], eps=0.1)))
        main(["worst-case", str(a), str(b)])


def test_reports_are_typed_records_with_the_json_format_unchanged():
    from rdc_studio.core.evaluate import EvalReport, ExampleResult, example_rows, robust_report

    results = [ExampleResult(1, 3, True, False, 0.3, 2.0, 5, "apgd-ce", seconds=0.5),
               ExampleResult(0, 7, True, True, 0.2, 1.0, 9, None, seconds=0.5)]
    report = robust_report(results, 1.0, {"name": "m"}, {"attack": "ensemble"},
                           attacks=[("apgd-ce", "APGD-CE"), ("square", "Square")])
    assert report.robust_acc == 0.5 and report.per_attack[0].success == 1
    assert report.per_attack[1].robust_acc == 0.5
    d = report.to_dict()
    assert d["per_example"] == [[0, 7, 1, 1, None], [1, 3, 1, 0, "apgd-ce"]]
    assert d["per_example_columns"] == ["index", "label", "clean_correct", "robust_correct", "broken_by"]
    assert d["per_attack"][0] == {"attack": "apgd-ce", "label": "APGD-CE", "attacked": 2, "success": 1,
                                  "robust_acc": 0.5, "robust_ci95": report.per_attack[0].robust_ci95}
    again = EvalReport.from_dict(d)
    assert again.to_dict() == d and again.examples[1].broken_by == "apgd-ce"
    assert [r.robust_correct for r in example_rows({"per_example": [[4, 1, 1, 0]]})] == [False]


def test_a_state_file_serves_one_run_at_a_time(tmp_path):
    """A second run on a state in use is refused (it would append the same examples again);
    once the first one closes, the state resumes normally."""
    import pytest

    from rdc_studio.core.evaluate import ResumeState

    path = tmp_path / "run.state.jsonl"
    settings = {"attack": "apgd-ce", "n": 4, "shard": [0, 1]}
    first = ResumeState(path, settings)
    with pytest.raises(ValueError, match="another running evaluation"):
        ResumeState(path, settings)
    first.close()
    second = ResumeState(path, settings)
    assert second.results == {} and path.read_text().count("\n") == 1
    second.close()
    with pytest.raises(ValueError, match="other settings"):  # a refused state leaves no lock behind
        ResumeState(path, settings | {"attack": "pgd"})
    ResumeState(path, settings).close()
    not_a_state = tmp_path / "notes.txt"
    not_a_state.write_text("my notes\n")
    with pytest.raises(ValueError, match="notes.txt: not a state file of rdc eval .its first line is no run header"):
        ResumeState(not_a_state, settings)
    assert not (tmp_path / "notes.txt.lock").exists() and not_a_state.read_text() == "my notes\n"


def test_a_state_file_that_is_empty_binary_or_no_file_gets_a_clear_answer(tmp_path):
    import os

    from rdc_studio.core.evaluate import ResumeState, read_state_file

    settings = {"attack": "apgd-ce", "n": 4, "shard": [0, 1]}
    empty = tmp_path / "empty.jsonl"
    empty.touch()  # made by hand, or a run stopped before its header: a new state
    ResumeState(empty, settings).close()
    assert json.loads(empty.read_text().splitlines()[0])["settings"] == settings
    png = tmp_path / "digit.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ValueError, match="digit.png: not a state file of rdc eval .not text"):
        ResumeState(png, settings)
    with pytest.raises(ValueError, match="not a regular file"):
        ResumeState(tmp_path, settings)
    if os.path.exists("/dev/zero"):  # would be read forever
        (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
        with pytest.raises(ValueError, match="not a regular file"):
            read_state_file(tmp_path / "zero.jsonl")
    assert read_state_file(tmp_path / "missing.jsonl").results == {}


def test_the_state_reader_and_the_resuming_run_read_the_same_examples(tmp_path):
    """``read_state_file`` is what ``ResumeState`` resumes from: cut-off lines are skipped,
    a later line for an index wins, and a missing file reads as empty."""
    import json

    from rdc_studio.core.evaluate import ExampleResult, ResumeState, read_state_file

    path = tmp_path / "run.state.jsonl"
    empty = read_state_file(path)
    assert (empty.header_line, empty.settings, empty.results) == ("", None, {})
    settings = {"attack": "apgd-ce", "n": 4, "shard": [0, 1]}
    state = ResumeState(path, settings)
    state.add([ExampleResult(0, 7, True, True, 0.1, 1.0, 20), ExampleResult(1, 2, True, False, 0.1, 1.2, 9, "apgd-ce")])
    state.close()
    with open(path, "a") as f:  # a re-run of example 0 that broke it, then a line cut off mid-write
        f.write(json.dumps({"index": 0, "label": 7, "clean_correct": True, "robust_correct": False, "linf": 0.1,
                            "l2": 1.1, "queries": 30}) + "\n" + '{"index": 3, "label"')
    read = read_state_file(path)
    assert read.settings == settings and read.header_line == json.dumps({"settings": settings}, sort_keys=True)
    assert sorted(read.results) == [0, 1]
    assert not read.results[0].robust_correct and read.results[1].broken_by == "apgd-ce"
    resumed = ResumeState(path, settings)
    assert resumed.results == read.results
    resumed.close()
    assert path.read_text().endswith("\n")  # the cut-off line is ended before the next append


def test_a_resumed_state_says_which_revision_of_the_attacks_made_each_example(tmp_path):
    """State lines record the attack revision; a state mixing lines of an older revision (or
    lines written before lines recorded it, counted as revision 1) gives a report that claims
    the oldest revision and counts the examples of each."""
    from rdc_studio.core.attacks import ATTACK_REVISION
    from rdc_studio.core.evaluate import ExampleResult, ResumeState, read_state_file, robust_log, robust_report

    path = tmp_path / "run.state.jsonl"
    settings = {"attack": "apgd-ce", "n": 3, "shard": [0, 1]}
    state = ResumeState(path, settings)
    state.add([ExampleResult(0, 7, True, True, 0.1, 1.0, 20),  # as written before revisions were recorded
               ExampleResult(1, 2, True, False, 0.1, 1.2, 9, attack_revision=ATTACK_REVISION)])
    state.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert "attack_revision" not in lines[0] and lines[1]["attack_revision"] == ATTACK_REVISION
    results = read_state_file(path).results
    assert results[0].attack_revision is None and results[1].attack_revision == ATTACK_REVISION
    mixed = robust_report(list(results.values()), 1.0, {"name": "m"}, {"attack": "apgd-ce"}).to_dict()
    assert mixed["attack_revision"] == 1
    assert mixed["examples_per_attack_revision"] == {"1": 1, str(ATTACK_REVISION): 1}
    assert f"attack revision: 1 (the oldest; examples per revision: 1: 1, {ATTACK_REVISION}: 1)" in robust_log(mixed)
    current = robust_report([results[1]], 1.0, {"name": "m"}, {"attack": "apgd-ce"}).to_dict()
    assert current["attack_revision"] == ATTACK_REVISION and "examples_per_attack_revision" not in current
    assert f"attack revision: {ATTACK_REVISION}\n" in robust_log(current)


def test_a_state_resumes_under_another_batch_size_or_device_but_not_other_settings(tmp_path):
    """How the work is scheduled is not what is computed (each example's attack is seeded by
    its index): a CPU state of batch 1 resumes on a GPU in batches of 25, and grows there."""
    from rdc_studio.core.evaluate import ExampleResult, ResumeState

    path = tmp_path / "run.state.jsonl"
    cpu = {"attack": "apgd-ce", "n": 2, "shard": [0, 1], "batch_size": 1, "device": "cpu"}
    state = ResumeState(path, cpu)
    state.add([ExampleResult(0, 7, True, True, 0.1, 1.0, 20)])
    state.close()
    gpu = cpu | {"batch_size": 25, "device": "cuda"}
    resumed = ResumeState(path, gpu)
    assert sorted(resumed.results) == [0]
    resumed.close()
    assert json.loads(path.read_text().splitlines()[0])["settings"] == gpu  # the header says the last run's
    grown = ResumeState(path, gpu | {"n": 4, "batch_size": 50})
    assert sorted(grown.results) == [0]
    grown.close()
    with pytest.raises(ValueError, match="other settings"):
        ResumeState(path, gpu | {"n": 4, "attack": "pgd"})


def test_indices_are_read_and_written_as_lists_and_ranges():
    import pytest

    from rdc_studio.core.evaluate import format_indices, parse_indices

    assert parse_indices("1,13,28-30") == (1, 13, 28, 29, 30)
    assert parse_indices(" 5, 3,3,4 ") == (3, 4, 5)  # sorted, without repeats
    assert format_indices([30, 1, 2, 3, 7, 8, 13]) == "1-3,7,8,13,30"
    for spelled in ("0", "4,9", "0-99", "1,13,28,35", "2-4,6-8,10"):
        assert format_indices(parse_indices(spelled)) == spelled
    for bad, message in (("0-99999999", "more than 10,000,000 examples"), ("", "is not an index"), ("1,,2", "is not an index"), ("-3", "is not an index"),
                         ("4-2", "runs backwards"), ("a", "is not an index"), ("1-", "is not an index")):
        with pytest.raises(ValueError, match=message):
            parse_indices(bad)


def test_a_follow_up_can_only_break_examples_the_report_left_robust():
    import pytest

    from rdc_studio.core.evaluate import wilson_interval, with_follow_up

    base = _report("bpda", [[0, 7, 1, 1, None], [1, 2, 1, 0, "apgd-ce"], [2, 1, 1, 1, None], [3, 0, 0, 0, "clean"],
                            [4, 4, 1, 1, None]])
    base["per_example_columns"] = ["index", "label", "clean_correct", "robust_correct", "broken_by"]
    base["per_attack"] = [{"attack": "apgd-ce"}]
    follow = _report("bpda", [[0, 7, 1, 0], [4, 4, 1, 1]], attack="ensemble")  # the survivors 0, 2, 4 in part
    merged = with_follow_up(base, follow, label="follow-up")
    assert [e[3] for e in merged["per_example"]] == [0, 0, 1, 0, 1]
    assert [e[4] for e in merged["per_example"]] == ["follow-up", "apgd-ce", None, "clean", None]
    assert merged["robust_acc"] == 0.4 and merged["robust_ci95"] == list(wilson_interval(2, 5))
    assert "per_attack" not in merged and merged["n"] == 5 and base["per_example"][0][3] == 1  # base untouched
    assert "attack_revision" not in merged  # neither report recorded one
    # the merged report claims the older revision of the attacks (a report without one is revision 1)
    assert with_follow_up(base | {"attack_revision": 2}, follow | {"attack_revision": 2})["attack_revision"] == 2
    assert with_follow_up(base, follow | {"attack_revision": 2})["attack_revision"] == 1
    assert with_follow_up(base | {"attack_revision": 2, "examples_per_attack_revision": {"1": 1, "2": 4}},
                          follow | {"attack_revision": 1}) == merged | {"attack_revision": 1}
    # a follow-up never makes a broken example robust again
    assert with_follow_up(base, _report("bpda", [[1, 2, 1, 1]]))["robust_acc"] == 0.6
    with pytest.raises(ValueError, match="does not have: 9"):
        with_follow_up(base, _report("bpda", [[9, 1, 1, 0]]))
    # misclassified unperturbed where the follow-up ran (another device, say): broken at distance 0,
    # as rdc worst-case counts it
    merged = with_follow_up(base, _report("bpda", [[2, 1, 0, 0]]), label="follow-up")
    assert merged["robust_acc"] == 0.4 and merged["per_example"][2][3:] == [0, "follow-up"]
    with pytest.raises(ValueError, match="other labels for examples 2"):
        with_follow_up(base, _report("bpda", [[2, 5, 1, 1]]))
    with pytest.raises(ValueError, match="threat model"):
        with_follow_up(base, _report("bpda", [[0, 7, 1, 0]], eps=0.1))


def test_follow_ups_count_where_they_attacked_and_do_not_narrow_the_worst_case(tmp_path, capsys):
    import json

    import pytest

    from rdc_studio.core.cli import main
    from rdc_studio.core.evaluate import worst_case_report

    smooth = _report("smooth", [[0, 7, 1, 1], [1, 2, 1, 1], [2, 1, 1, 0], [3, 0, 1, 1]])
    bpda = _report("bpda", [[0, 7, 1, 1], [1, 2, 1, 1], [2, 1, 1, 1], [3, 0, 1, 0]])
    follow = _report("bpda", [[0, 7, 1, 0], [1, 2, 1, 1]], attack="ensemble")  # the survivors 0 and 1
    w = worst_case_report([smooth, bpda], follow_ups=[follow])
    assert w["n"] == 4 and w["robust_acc"] == 0.25 and [e[3] for e in w["per_example"]] == [0, 1, 0, 0]
    assert w["per_example"][0][4] == ["rdc bpda ensemble (follow-up)"]
    assert w["runs"][2] | {"command": None} == {"label": "rdc bpda ensemble (follow-up)", "command": None, "n": 2,
                                                "robust_acc_on_common": 0.5, "broke": 1, "broke_alone": 1,
                                                "follow_up": True, "attacked": 2}
    # one report and its follow-up is a worst case too; the same answer as merging it into the report
    from rdc_studio.core.evaluate import with_follow_up
    alone = worst_case_report([bpda], follow_ups=[follow])
    assert alone["robust_acc"] == with_follow_up(bpda, follow)["robust_acc"] == 0.5
    with pytest.raises(ValueError, match="at least two"):
        worst_case_report([], follow_ups=[follow, follow])
    with pytest.raises(ValueError, match="threat model"):
        worst_case_report([bpda], follow_ups=[_report("bpda", [[0, 7, 1, 0]], eps=0.1)])
    paired = _report("bpda", [[0, 7, 1, 0]])
    paired["model"]["purifier"] = {"name": "uncond", "sha256": "ab" * 32}
    with pytest.raises(ValueError, match="purified by uncond .sha256 abababab., not by the model itself"):
        worst_case_report([bpda, paired])
    other = _report("bpda", [[0, 7, 1, 0]])
    other["model"]["purifier"] = {"name": "uncond", "sha256": "cd" * 32}
    with pytest.raises(ValueError, match="purified by uncond .sha256 cdcdcdcd., not by uncond .sha256 abababab"):
        worst_case_report([paired, other])
    # the command line
    paths = []
    for name, rep in (("smooth", smooth), ("bpda", bpda), ("follow", follow)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rep))
    out = tmp_path / "w.json"
    assert main(["worst-case", str(paths[0]), str(paths[1]), "--follow-up", str(paths[2]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "follow.json (rdc bpda ensemble, follow-up): robust 50.00% on the 2 of these examples it attacked" in text
    assert "worst case per example: robust accuracy 25.00%" in text
    saved = json.loads(out.read_text())
    assert saved["follow_ups"] == [str(paths[2])] and saved["robust_acc"] == 0.25
    assert main(["worst-case", str(paths[1]), "--follow-up", str(paths[2])]) == 0
    assert "robust accuracy 50.00%" in capsys.readouterr().out
    # a follow-up given as an ordinary report narrows the worst case to its examples: said so
    follow["settings"]["indices"] = "0,1"
    paths[2].write_text(json.dumps(follow))
    assert main(["worst-case", str(paths[1]), str(paths[2])]) == 0
    assert "follow.json attacked chosen examples (--indices), which narrowed the worst case to 2 of 4" in \
        capsys.readouterr().err


@pytest.mark.parametrize("change,message", [
    ({"attack": "foo"}, "attack must be one of none, ensemble"),
    ({"defense": "abs"}, "defense must be one of cnn, dc, rdc"),
    ({"norm": "l1"}, "norm must be one of linf, l2"),
    ({"grad": "exactly"}, "grad must be one of"),
    ({"steps": 0}, "steps must be a whole number"),
    ({"batch_size": 2.5}, "batch_size must be a whole number"),
    ({"n": -1}, "n must be a whole number"),
    ({"attack": "apgd-ce", "eps": float("nan")}, "eps must be a number of at least 0"),
    ({"attack": "apgd-ce", "eps": -0.1}, "eps must be a number of at least 0"),
])
def test_an_unusable_evaluation_config_is_refused_when_made(change, message):
    from rdc_studio.core.evaluate import EvalConfig

    with pytest.raises(ValueError, match=message):
        EvalConfig(**change)


def test_evaluating_a_diffusion_defense_without_its_model_says_so():
    from rdc_studio.core.data import TensorDataset
    from rdc_studio.core.evaluate import EvalConfig, run_evaluation

    ds = TensorDataset(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                       [str(i) for i in range(10)], "mnist", "test")
    with pytest.raises(ValueError, match="the dc defense needs the loaded diffusion model"):
        run_evaluation(EvalConfig(defense="dc", n=1), dataset=ds)


def test_a_state_records_its_weights_and_never_resumes_a_run_on_other_ones(tmp_path):
    """Same settings, same model name or path, other weights (a retrained file, another --cnn):
    the old results must not be reused. States written before weights were recorded still resume,
    and then record them."""
    import json

    from rdc_studio.core.evaluate import ResumeState

    path = tmp_path / "run.state.jsonl"
    settings = {"attack": "apgd-ce", "n": 4, "shard": [0, 1]}
    ResumeState(path, settings, {"model": "a" * 64, "cnn": "c" * 64}).close()
    ResumeState(path, settings, {"model": "a" * 64, "cnn": "c" * 64}).close()
    with pytest.raises(ValueError, match=r"other weights \(model changed since\)"):
        ResumeState(path, settings, {"model": "b" * 64, "cnn": "c" * 64})
    older = tmp_path / "older.state.jsonl"
    older.write_text(json.dumps({"settings": settings}, sort_keys=True) + "\n")
    ResumeState(older, settings, {"model": "a" * 64}).close()
    assert json.loads(older.read_text().splitlines()[0])["weights"] == {"model": "a" * 64}


def test_reports_of_other_weights_are_not_one_measurement():
    from rdc_studio.core.evaluate import with_follow_up

    base = _report("bpda", [[0, 7, 1, 1, None]])
    base["per_example_columns"] = ["index", "label", "clean_correct", "robust_correct", "broken_by"]
    follow = _report("bpda", [[0, 7, 1, 1]], attack="ensemble")
    base["model"]["sha256"], follow["model"]["sha256"] = "a" * 64, "b" * 64
    with pytest.raises(ValueError, match="of other weights"):
        with_follow_up(base, follow)


def test_eval_config_takes_numpy_numbers_and_refuses_bools():
    import numpy as np

    from rdc_studio.core.evaluate import EvalConfig

    config = EvalConfig(n=np.int64(10), steps=np.int64(5), attack="apgd-ce", eps=np.float32(0.3))
    assert (config.n, config.steps, config.eps) == (10, 5, pytest.approx(0.3))
    assert type(config.n) is int and type(config.eps) is float
    with pytest.raises(ValueError, match="steps must be a whole number"):
        EvalConfig(steps=True)


def test_a_run_without_weights_keeps_the_record_of_the_state_it_resumes(tmp_path):
    import json

    from rdc_studio.core.evaluate import ResumeState

    path = tmp_path / "run.state.jsonl"
    settings = {"attack": "apgd-ce", "n": 4, "shard": [0, 1]}
    ResumeState(path, settings, {"model": "a" * 64}).close()
    ResumeState(path, settings, {}).close()
    assert json.loads(path.read_text().splitlines()[0])["weights"] == {"model": "a" * 64}
    with pytest.raises(ValueError, match="other weights"):
        ResumeState(path, settings, {"model": "b" * 64})
