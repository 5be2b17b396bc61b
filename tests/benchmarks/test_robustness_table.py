"""benchmarks/robustness_table.py: one rdc eval command per row, the table and the checks on a tiny model."""
import hashlib
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from rdc_studio.core.cli import build_parser
from rdc_studio.core.data import mnist_available
from rdc_studio.core.evaluate import parse_indices, wilson_interval
from rdc_studio.core.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]
DEFENSES = [("cnn", None), ("dc", None), ("rdc", "exact"), ("rdc", "smooth"), ("rdc", "bpda")]
THREATS = [("linf", "0.1"), ("linf", "0.3"), ("l2", "1.5")]  # the default --threats
ROWS = [(d, g, norm, eps) for d, g in DEFENSES for norm, eps in THREATS]
TINY_THREATS = [("linf", "0.3"), ("l2", "1.5")]  # the tiny-model runs: two threat models keep them short
TINY_ROWS = [(d, g, norm) for d, g in DEFENSES for norm, _ in TINY_THREATS]


BENCHMARK = "robustness_table"  # loaded by the conftest's bench fixture


@pytest.fixture(scope="module")
def table(bench):
    return bench


@pytest.fixture
def tiny_cnn(tmp_path):
    """An untrained CNN checkpoint: the CNN row and the transfer source."""
    import torch

    from rdc_studio.core.baseline import SmallCNN, save_cnn

    torch.manual_seed(0)
    return save_cnn(tmp_path / "cnn.safetensors", SmallCNN().eval(), {"name": "cnn", "dataset": "mnist"})


def test_dry_run_prints_one_rdc_eval_command_per_row(table, tmp_path, capsys):
    out_dir = tmp_path / "table"
    assert table.main(["--dry-run", "--no-checks", "--out-dir", str(out_dir), "--n-cnn", "500", "--n-dc", "60",
                       "--n-rdc", "30", "--steps", "20", "--square-queries", "300", "--levels", "8",
                       "--results", str(tmp_path / "robustness.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ROWS) == 15 and all(line.startswith("rdc eval ") for line in lines)
    stems = set()
    for line, (defense, grad, norm, eps) in zip(lines, ROWS):
        args = build_parser().parse_args(shlex.split(line)[1:])  # a valid rdc command line
        assert (args.defense, args.norm, args.eps, args.attack) == (defense, norm, float(eps), "ensemble")
        assert args.grad == (grad or "auto")
        assert args.n == {"cnn": 500, "dc": 60, "rdc": 30}[defense]
        assert (args.steps, args.square_queries, args.targets, args.seed) == (20, 300, 9, 0)
        assert args.dc_steps == (None if defense == "cnn" else 8) and args.cnn == "mnist-cnn"
        outputs = [Path(args.out), Path(args.log), Path(args.state)]
        assert all(p.parent == out_dir for p in outputs) and [p.suffix for p in outputs] == [".json", ".log", ".jsonl"]
        key = "-".join([defense + (f"-{grad}" if grad else ""), norm, eps])
        assert Path(args.out).stem.startswith(f"{key}-n{args.n}-")  # the row key: defense, norm and eps
        stems.add(Path(args.out).stem)
    assert len(stems) == len(ROWS)  # distinct files
    assert not out_dir.exists() and not (tmp_path / "robustness.json").exists()  # a dry run writes nothing


def test_dry_run_says_how_far_an_unfinished_evaluation_got(table, tmp_path, capsys):
    """An evaluation with a state file and no report gets a comment line: examples done of
    all and how many the attack broke (summed over torchrun shards' state files)."""
    out_dir = tmp_path / "runs"
    argv = ["--dry-run", "--no-checks", "--rows", "dc-linf-0.3", "--n-row", "dc-*=5", "--out-dir", str(out_dir)]
    assert table.main(argv) == 0
    [line] = capsys.readouterr().out.splitlines()
    state = Path(build_parser().parse_args(shlex.split(line)[1:]).state)
    out_dir.mkdir()
    header = json.dumps({"settings": {"n": 5}})
    fields = {"label": 3, "linf": 0.3, "l2": 2.0, "queries": 20}
    records = [{"index": 0, "clean_correct": True, "robust_correct": True, "seconds": 600.0} | fields,
               {"index": 1, "clean_correct": True, "robust_correct": False, "seconds": 660.0} | fields,
               {"index": 2, "clean_correct": False, "robust_correct": False} | fields]  # (no timing: older states)
    state.write_text("\n".join([header] + [json.dumps(r) for r in records[:2]]) + "\nnot json\n")
    Path(f"{state}.rank1-of-2").write_text("\n".join([header, json.dumps(records[2])]) + "\n")
    assert table.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"#   unfinished: 3 of 5 examples done, 1 broken by the attack, 1 misclassified clean; "
                        f"the other 2 need about 21 min at the 630 s per example so far (state {state})")
    assert table._duration(7199) == "120 min" and table._duration(54000) == "15.0 h"
    report = {"settings": {"command": "rdc " + " ".join(shlex.quote(a) for a in shlex.split(line)[1:])}}
    Path(str(state).removesuffix(".state.jsonl") + ".json").write_text(json.dumps(report))
    assert table.main(argv) == 0 and capsys.readouterr().out.splitlines() == [line]  # finished: no comment


def _model_digest(name: str) -> str:
    return hashlib.sha256((ROOT / "resources" / "models" / f"{name}.safetensors").read_bytes()).hexdigest()


def test_rows_with_other_noise_levels_never_share_files_or_rows_with_the_cards_settings(table, capsys):
    """Before, --levels T gave the card's file names and robustness.json row (key and
    settings_sha256): such a row replaced the model's own figure in the README."""
    from rdc_studio.core.models import read_card

    card_steps = read_card(DEFAULT_MODEL)["classifier"]["steps"]
    assert table.settings_sha256(DEFAULT_MODEL, levels=card_steps) == table.settings_sha256(DEFAULT_MODEL)
    other = table.settings_sha256(DEFAULT_MODEL, levels=card_steps // 2)
    assert other != table.settings_sha256(DEFAULT_MODEL)
    assert table.main(["--dry-run", "--rows", "dc-linf-0.3", "--levels", str(card_steps // 2)]) == 0
    assert f"-s{other[:8]}" in capsys.readouterr().out


def test_evaluation_files_are_named_after_the_model_files(table, capsys):
    """A retrained model gets new file names, so its table never reuses or resumes an old model's evaluation."""
    assert table.main(["--dry-run", "--rows", "cnn-linf-0.3,dc-linf-0.3", "--check-rows", "dc-*"]) == 0
    stems = [Path(build_parser().parse_args(shlex.split(line)[1:]).out).stem
             for line in capsys.readouterr().out.splitlines() if line.startswith("rdc eval")]
    m = f"m{_model_digest(DEFAULT_MODEL)[:8]}-s{table.settings_sha256(DEFAULT_MODEL)[:8]}"
    c = "c" + _model_digest("mnist-cnn")[:8]
    assert stems[0] == f"cnn-linf-0.3-n1000-{c}" and stems[1] == f"dc-linf-0.3-n200-{m}-{c}"
    checks = stems[2:]
    # APGD-CE and Square never touch the CNN; the transfer attack is crafted on it
    assert f"check-dc-linf-apgd-ce-eps0.6-s100-n50-{m}" in checks
    assert f"check-dc-linf-square-eps0.3-q1000-n50-{m}" in checks
    assert f"check-dc-linf-transfer-eps0.3-s100-n50-{m}-{c}" in checks


def test_threat_models_and_per_row_n(table, capsys):
    assert table.parse_threats("linf:0.1, linf:8/255 ,l2:1.5") == [("linf", "0.1"), ("linf", "8/255"), ("l2", "1.5")]
    for bad, message in (("linf", "NORM:EPS"), ("l1:0.3", "NORM:EPS"), ("linf:0", "positive"),
                         ("linf:abc", "positive"), ("linf:0.3,linf:.3", "twice"), (" , ", "no threat")):
        with pytest.raises(SystemExit, match=message):
            table.parse_threats(bad)
    assert table.parse_row_n("rdc-*-linf-0.3=50, dc-l2-1.5=300") == [("rdc-*-linf-0.3", 50), ("dc-l2-1.5", 300)]
    for bad in ("rdc-*=", "=5", "dc-linf-0.3=0", "dc-linf-0.3=x", "dc-linf-0.3"):
        with pytest.raises(SystemExit, match="PATTERN=N"):
            table.parse_row_n(bad)
    args = table.parse_args(["--n-rdc", "120", "--n-row", "rdc-*-linf-0.3=50,rdc-bpda-*=40"])
    rows = table.build_rows(args)
    assert [r.key for r in rows] == ["-".join([d + (f"-{g}" if g else ""), n, e]) for d, g, n, e in ROWS]
    assert len({r.key for r in rows}) == len(rows) == 15
    n = {r.key: r.n for r in rows}
    assert n["rdc-exact-linf-0.1"] == n["rdc-smooth-l2-1.5"] == 120 and n["rdc-exact-linf-0.3"] == 50
    assert n["rdc-bpda-linf-0.1"] == n["rdc-bpda-linf-0.3"] == 40  # the later pair wins
    assert n["cnn-linf-0.3"] == 1000 and n["dc-l2-1.5"] == 200
    with pytest.raises(SystemExit, match="--n-row 'rdc-\\*-linf-0.2' matches none"):
        table.build_rows(table.parse_args(["--n-row", "rdc-*-linf-0.2=50"]))
    # another set of threat models: the keys follow
    args = table.parse_args(["--threats", "l2:0.5,linf:8/255", "--rows", "dc-*"])
    assert [(r.key, r.eps) for r in table.build_rows(args)] == [("dc-l2-0.5", "0.5"), ("dc-linf-8over255", "8/255")]


def test_one_radius_spelt_differently_names_the_same_rows_and_files(table, tmp_path, capsys):
    """``.3``, ``0.30`` and ``0.3`` are one radius: the same row keys, evaluation files and
    reused results (every committed file name already uses the canonical spelling)."""
    for text, canonical in ((".3", "0.3"), ("0.30", "0.3"), ("1e-1", "0.1"), ("1.0", "1"), ("6", "6"),
                            ("08/255", "8/255"), (" 8 / 255 ", "8/255"), ("0.5/255", "0.5/255")):
        assert table.canonical_eps(text) == canonical
    assert table.parse_threats("linf:.1,linf:0.30,l2:1.50") == THREATS
    default = table.parse_args(["--rows", "dc-*"])
    respelt = table.parse_args(["--rows", "dc-*", "--threats", "linf:.1,linf:0.30,l2:1.50", "--sweep-linf",
                                ".1,0.20,.3", "--sweep-l2", "0.5,1.0,1.5", "--large-eps-linf", ".6",
                                "--large-eps-l2", "6.0"])
    for attr in ("sweep_linf", "sweep_l2", "large_eps_linf", "large_eps_l2"):
        assert getattr(respelt, attr) == getattr(default, attr)
    dry_run = ["--rows", "dc-*", "--dry-run", "--out-dir", str(tmp_path)]
    assert table.main(dry_run) == 0
    expected = capsys.readouterr().out
    assert table.main(dry_run + ["--threats", "linf:.1,linf:0.30,l2:1.50", "--sweep-linf", ".1,0.20,.3",
                                 "--large-eps-l2", "6.0"]) == 0
    assert capsys.readouterr().out == expected
    for bad in ("0", "-0.1", "abc", ""):
        with pytest.raises(SystemExit):
            table.parse_args(["--sweep-linf", bad])
    with pytest.raises(SystemExit):
        table.parse_args(["--large-eps-linf", "0.6,0.7"])


def test_dry_run_with_checks_and_a_row_filter(table, capsys):
    assert table.main(["--dry-run", "--rows", "rdc-*-linf-0.3", "--sweep-linf", "0.1,0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    split = lines.index("# gradient-masking checks")
    assert [shlex.split(line)[shlex.split(line).index("--grad") + 1] for line in lines[:split]] == ["exact", "smooth",
                                                                                                  "bpda"]
    checks = [build_parser().parse_args(shlex.split(line)[1:]) for line in lines[split + 1:]]
    # per row: APGD-CE at 0.1, 0.2, the row's 0.3 and the large 0.6; twice the steps at 0.3; Square and
    # transfer once for all three gradient modes (they take no gradient of the defense)
    assert len(checks) == 3 * 5 + 2
    first = checks[:7]
    assert [(a.attack, a.eps, a.steps) for a in first if a.attack == "apgd-ce"] == [
        ("apgd-ce", 0.1, 100), ("apgd-ce", 0.2, 100), ("apgd-ce", 0.3, 100), ("apgd-ce", 0.6, 100),
        ("apgd-ce", 0.3, 200)]
    assert {a.attack for a in first} == {"apgd-ce", "square", "transfer"} and all(a.n == 50 for a in first)
    assert next(a for a in first if a.attack == "square").square_queries == 1000
    gradient_free = [a for a in checks if a.attack in ("square", "transfer")]
    assert [(a.attack, a.grad, a.eps) for a in gradient_free] == [("square", "exact", 0.3),
                                                                  ("transfer", "exact", 0.3)]
    assert all(a.grad == "smooth" for a in checks[7:12]) and all(a.grad == "bpda" for a in checks[12:])
    with pytest.raises(SystemExit, match="matches none"):
        table.main(["--dry-run", "--rows", "vit-*"])
    # --check-rows narrows the checks to some of the rows; the table keeps them all
    assert table.main(["--dry-run", "--rows", "rdc-*-linf-0.3", "--check-rows", "rdc-smooth-*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    split = lines.index("# gradient-masking checks")
    assert split == 3 and len(lines) - split - 1 == 7
    grads = {(line.split()[line.split().index("--attack") + 1], line.split()[line.split().index("--grad") + 1])
             for line in lines[split + 1:]}
    assert grads == {("apgd-ce", "smooth"), ("square", "exact"), ("transfer", "exact")}
    with pytest.raises(SystemExit, match="--check-rows"):
        table.main(["--dry-run", "--rows", "rdc-*-linf-0.3", "--check-rows", "cnn-*"])


def test_rows_of_one_norm_share_the_eps_sweep_of_their_checks(table, capsys):
    assert table.main(["--dry-run", "--rows", "dc-linf-*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    checks = lines[lines.index("# gradient-masking checks") + 1:]
    assert len(checks) == len(set(checks))  # each evaluation printed once
    sweep = [build_parser().parse_args(shlex.split(c)[1:]) for c in checks]
    sweep = sorted((a.eps, a.steps) for a in sweep if a.attack == "apgd-ce")
    # 0.1, 0.2, 0.3, 0.6 once for both rows; twice the steps at each row's eps
    assert sweep == [(0.1, 100), (0.1, 200), (0.2, 100), (0.3, 100), (0.3, 200), (0.6, 100)]


# --- robustness.json from fake reports (nothing is attacked) ---------------------------------

def _fake_report(command: str, defense: str, grad: str | None, norm: str, eps: float, robust: list[bool],
                 clean: list[bool] | None = None, seconds_per_image: float = 2.0,
                 hardware: str = "Test CPU, 2 logical CPUs, torch 2.x, 2 threads") -> dict:
    """An ensemble report exactly as rdc eval writes it (core.evaluate.robust_report), for given outcomes."""
    from rdc_studio.core.evaluate import ExampleResult, robust_report

    clean = clean if clean is not None else [True] * len(robust)
    order = list(ENSEMBLE)
    results = [ExampleResult(i, i % 10, c, r, 0.0 if r else eps, 0.0, 10,
                             broken_by=None if r else ("clean" if not c else order[i % len(order)]),
                             seconds=seconds_per_image)
               for i, (c, r) in enumerate(zip(clean, robust))]
    settings = {"device": "cpu", "dataset": "mnist", "split": "test", "defense": defense, "attack": "ensemble",
                "batch_size": 50, "command": command}
    model = {"name": "mnist-cnn", "architecture": "cnn"}
    if defense != "cnn":
        settings["classifier"] = {"levels": 16, "noise_seed": 0}
        model = {"name": "mnist-multihead", "path": "resources/models/mnist-multihead.safetensors",
                 "architecture": "multihead"}
    if defense == "rdc":
        settings["purify"] = {"eta": 0.3, "steps": 10}
        settings["grad"] = grad
    settings["attack_settings"] = {name: {"norm": norm, "eps": eps} for name in order}
    settings["ensemble"] = {"order": order, "transfer_source": "mnist-cnn", "targets": 9}
    report = robust_report(results, seconds_per_image * len(robust), model, settings,
                           attacks=[(name, name.upper()) for name in order], seeds={"attack_seed": 0}).to_dict()
    report["hardware"] = hardware  # robust_report describes this machine; the test wants a fixed string
    return report


ENSEMBLE = ("apgd-ce", "apgd-dlr", "apgd-t", "square", "transfer")
# per example: robust under exact / smooth / BPDA; only examples 0 and 5 survive all three
OUTCOMES = {"exact": [1, 1, 1, 0, 1, 1], "smooth": [1, 0, 1, 1, 1, 1], "bpda": [1, 1, 0, 1, 0, 1]}


def _write_fake_reports(table, argv: list[str], out_dir: Path, outcomes=OUTCOMES) -> dict[str, dict]:
    """Put a fake report for every row of ``argv`` into ``out_dir``, made by exactly that row's command
    (so the script reuses it instead of running rdc eval); returns them by row key."""
    args = table.add_model_digests(table.parse_args(argv))
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    for row in table.build_rows(args):
        ev = table.row_evaluation(args, row)
        eps = table.parse_fraction(row.eps)
        if row.defense == "rdc":
            robust = [bool(v) for v in outcomes[row.grad]][:row.n]
        else:
            robust = [i % 3 == 0 for i in range(row.n)]  # 1, 0, 0, 1, ...
        report = _fake_report(ev.command, row.defense, row.grad, row.norm, eps, robust,
                              seconds_per_image={"exact": 3.0, "smooth": 4.0, "bpda": 5.0}.get(row.grad, 1.0))
        (out_dir / f"{ev.name}.json").write_text(json.dumps(report))
        reports[row.key] = report
    return reports


@pytest.fixture
def no_attacks(table, monkeypatch):
    """Fail the test if the script would start an rdc eval (every report must be a fake one)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the test would run a real evaluation")

    monkeypatch.setattr(table, "_rdc_eval", refuse)
    monkeypatch.setattr(table, "run_concurrently", refuse)


def test_robustness_json_rows_for_three_threat_models(table, tmp_path, no_attacks, capsys):
    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    argv = ["--out-dir", str(out_dir), "--results", str(results), "--n-cnn", "9", "--n-dc", "6", "--n-rdc", "6",
            "--no-checks"]
    fakes = _write_fake_reports(table, argv, out_dir)
    assert table.main(argv) == 0
    rows = json.loads(results.read_text())
    model_sha, cnn_sha = _model_digest(DEFAULT_MODEL), _model_digest("mnist-cnn")
    assert [(r["defense"], r["norm"], r["eps"]) for r in rows] == [
        (d, norm, float(eps)) for d in ("cnn", "dc", "rdc") for norm in ("linf", "l2")
        for n, eps in THREATS if n == norm]
    assert [r["key"] for r in rows][:3] == ["cnn-linf-0.1", "cnn-linf-0.3", "cnn-l2-1.5"]
    fields = {"defense", "norm", "eps", "n", "clean", "robust", "ci95", "attacks", "grad_modes", "model",
              "model_sha256", "command", "hardware", "seconds_per_image"}
    for r in rows:
        assert fields <= set(r) and r["attacks"] == list(ENSEMBLE) and r["masking_checks"] is None
        assert r["hardware"] == "Test CPU, 2 logical CPUs, torch 2.x, 2 threads, device cpu"
        assert (r["model"], r["model_sha256"]) == (("mnist-cnn", cnn_sha) if r["defense"] == "cnn"
                                                   else (DEFAULT_MODEL, model_sha))
        # DC and RDC rows name the card settings their defense was built with; the CNN has none
        assert r.get("settings_sha256") == (None if r["defense"] == "cnn" else table.settings_sha256(DEFAULT_MODEL))
    for r in [r for r in rows if r["defense"] != "rdc"]:
        fake = fakes[r["key"]]  # the CNN and DC rows are their evaluation row as it is
        robust = len(range(0, fake["n"], 3))  # examples 0, 3, 6, ... survive
        assert (r["n"], r["clean"], r["robust"], r["ci95"]) == (fake["n"], 1.0, robust / fake["n"], fake["robust_ci95"])
        assert r["ci95"] == list(wilson_interval(robust, fake["n"])) and r["grad_modes"] == ["exact"]
        assert r["command"] == fake["settings"]["command"] and r["seconds_per_image"] == 1.0
    out = capsys.readouterr().out
    assert "merged 9 rows (cnn-linf-0.1, cnn-linf-0.3, cnn-l2-1.5, dc-linf-0.1" in out and "--readme" in out


def test_the_optional_binarised_dc_row_is_opt_in_and_a_row_of_its_own(table, tmp_path, no_attacks, capsys):
    assert not [r for r in table.build_rows(table.parse_args([])) if r.key.startswith("binary-")]  # '*' omits it
    with pytest.raises(SystemExit, match="matches none"):
        table.build_rows(table.parse_args(["--rows", "*-dc-linf-0.3"]))  # only a pattern naming it selects it
    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    argv = ["--out-dir", str(out_dir), "--results", str(results), "--rows", "dc-linf-0.3,binary-dc-linf-0.3",
            "--n-dc", "6", "--no-checks"]
    args = table.add_model_digests(table.parse_args(argv))
    plain, binary = table.build_rows(args)
    assert (plain.key, binary.key, binary.defense, binary.binarize) == ("dc-linf-0.3", "binary-dc-linf-0.3", "dc", 0.5)
    parsed = build_parser().parse_args(table.row_evaluation(args, binary).argv)
    assert (parsed.defense, parsed.binarize, parsed.attack) == ("dc", 0.5, "ensemble")
    assert build_parser().parse_args(table.row_evaluation(args, plain).argv).binarize is None
    # its gradient-masking checks attack the binarised defense too
    checks = [c for evs in [table.check_evaluations(args, binary)] for c in evs.values()]
    assert checks and all(build_parser().parse_args(c.argv).binarize == 0.5 for c in checks)
    _write_fake_reports(table, argv, out_dir)
    assert table.main(argv) == 0
    rows = json.loads(results.read_text())
    assert [(r["key"], r["defense"], r["label"].split(" (")[0], r["grad_modes"]) for r in rows] == [
        ("dc-linf-0.3", "dc", "DC", ["exact"]),
        ("binary-dc-linf-0.3", "binary-dc", "DC on binarised input", ["straight-through"])]
    assert table.result_key(rows[0]) != table.result_key(rows[1])
    # the README table shows it under its own label, after the default defenses' rows
    section = table.readme_section(rows, DEFAULT_MODEL, args.model_sha256, "mnist-cnn", args.cnn_sha256,
                                   settings_digest=args.settings_sha256)
    lines = [line for line in section.splitlines() if line.startswith("| DC")]
    assert [line.split(" | ")[0] for line in lines] == [
        "| DC", "| DC on binarised input (threshold 0.5; optional, not the default)"]
    assert "binarised" not in section.split("Not measured yet for this model: ")[1]


def test_rdc_row_is_the_worst_case_over_the_gradient_modes(table, tmp_path, no_attacks, capsys):
    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    argv = ["--out-dir", str(out_dir), "--results", str(results), "--rows", "rdc-*-linf-0.1", "--n-rdc", "6",
            "--n-row", "rdc-bpda-*=5", "--no-checks"]
    fakes = _write_fake_reports(table, argv, out_dir)
    assert table.main(argv) == 0
    [row] = json.loads(results.read_text())
    assert (row["key"], row["defense"], row["norm"], row["eps"]) == ("rdc-linf-0.1", "rdc", "linf", 0.1)
    # on the 5 examples all three attacked, only example 0 survives all three (example 5: BPDA's n is 5)
    assert (row["n"], row["clean"], row["robust"]) == (5, 1.0, 0.2)
    assert row["ci95"] == list(wilson_interval(1, 5))
    assert row["grad_modes"] == ["exact", "smooth", "bpda"] and row["attacks"] == list(ENSEMBLE)
    assert row["per_grad_mode"] == {"exact": 0.8, "smooth": 0.8, "bpda": 0.6}
    parts = [fakes[f"rdc-{mode}-linf-0.1"] for mode in ("exact", "smooth", "bpda")]
    assert row["command"] == [p["settings"]["command"] for p in parts]
    assert all(c.startswith("rdc eval ") and f"--grad {m}" in c for c, m in zip(row["command"], row["grad_modes"]))
    assert row["seconds_per_image"] == pytest.approx(3.0 + 4.0 + 5.0)
    assert row["model_sha256"] == _model_digest(DEFAULT_MODEL) and row["masking_checks"] is None
    # the same worst case as core.evaluate's
    from rdc_studio.core.evaluate import worst_case_report
    assert worst_case_report(parts)["robust_acc"] == row["robust"]
    # with one gradient mode missing there is no RDC row, and the script says why
    results.unlink()
    capsys.readouterr()
    assert table.main(argv[:5] + ["rdc-exact-linf-0.1,rdc-smooth-linf-0.1"] + argv[6:]) == 0
    assert json.loads(results.read_text()) == []
    assert "no RDC row in robustness.json for l-inf 0.1 (no bpda)" in capsys.readouterr().out


def test_masking_checks_of_a_row_in_robustness_json(table):
    check = {"passed": False, "name": "large_eps", "verdict": "FAIL", "summary": "40% at eps 0.6"}
    checks = [{"row": "rdc-exact-linf-0.3", "check": check},
              {"row": "rdc-bpda-linf-0.3", "check": check | {"passed": True, "verdict": "PASS"}},
              {"row": "dc-linf-0.3", "check": check | {"passed": True, "verdict": "PASS"}}]
    summary = table.masking_summary(checks, ["rdc-exact-linf-0.3", "rdc-smooth-linf-0.3", "rdc-bpda-linf-0.3"], 50)
    assert summary["passed"] is False and summary["n"] == 50
    assert [(c["row"], c["verdict"]) for c in summary["checks"]] == [("rdc-exact-linf-0.3", "FAIL"),
                                                                     ("rdc-bpda-linf-0.3", "PASS")]
    assert table.masking_summary(checks, ["dc-linf-0.3"], 50)["passed"] is True
    assert table.masking_summary(checks, ["cnn-linf-0.3"], 50) is None


def _result(defense: str, norm: str, eps: float, sha: str, robust: float = 0.5, **extra) -> dict:
    row = {"key": f"{defense}-{norm}-{eps:g}", "label": {"cnn": "CNN", "dc": "DC", "rdc": "RDC (worst case)"}[defense],
           "defense": defense, "norm": norm, "eps": eps, "n": 100, "clean": 0.99, "robust": robust,
           "ci95": [robust - 0.1, robust + 0.1], "attacks": list(ENSEMBLE),
           "grad_modes": ["exact", "smooth", "bpda"] if defense == "rdc" else ["exact"],
           "model": "mnist-cnn" if defense == "cnn" else "mnist-multihead", "model_sha256": sha,
           "command": "rdc eval ...", "hardware": "Test CPU, device cpu", "seconds_per_image": 1.5,
           "masking_checks": None}
    return row | extra


def test_merge_replaces_rows_of_the_same_measurement_and_keeps_the_rest(table, tmp_path):
    old_model, new_model = "a" * 64, "b" * 64
    existing = [_result("rdc", "linf", 0.3, new_model, robust=0.1), _result("dc", "linf", 0.1, new_model, robust=0.2),
                _result("dc", "linf", 0.1, old_model, robust=0.9), _result("cnn", "l2", 1.5, "c" * 64)]
    measured = [_result("dc", "linf", 0.1, new_model, robust=0.0), _result("dc", "l2", 1.5, new_model, robust=0.3)]
    merged = table.merge_results(existing, measured)
    keys = [table.result_key(r) for r in merged]
    assert len(merged) == 5 and len(set(keys)) == 5
    by_key = {table.result_key(r): r for r in merged}
    assert by_key[("dc", "linf", 0.1, new_model, "")]["robust"] == 0.0  # replaced by this run's
    assert by_key[("dc", "linf", 0.1, old_model, "")]["robust"] == 0.9  # another model's file: kept
    assert by_key[("rdc", "linf", 0.3, new_model, "")]["robust"] == 0.1  # not measured this run: kept
    assert by_key[("dc", "l2", 1.5, new_model, "")]["robust"] == 0.3  # new
    # the same weights with other card settings (a re-chosen grid) are another measurement
    other = table.merge_results(merged, [_result("dc", "l2", 1.5, new_model, robust=0.6, settings_sha256="e" * 64)])
    assert len(other) == 6 and {r["robust"] for r in other if r["key"] == "dc-l2-1.5"} == {0.3, 0.6}
    # a re-measured row whose checks did not run this time keeps the verdicts of the row it replaces
    checks = {"passed": True, "n": 20, "checks": [{"row": "dc-linf-0.1", "check": "large_eps", "verdict": "PASS",
                                                   "summary": ""}]}
    with_checks = table.merge_results(merged, [_result("dc", "linf", 0.1, new_model, robust=0.05,
                                                       masking_checks=checks)])
    grown = table.merge_results(with_checks, [_result("dc", "linf", 0.1, new_model, robust=0.04)])
    row = next(r for r in grown if table.result_key(r) == ("dc", "linf", 0.1, new_model, ""))
    assert row["robust"] == 0.04 and row["masking_checks"] == checks
    other_model = next(r for r in grown if table.result_key(r) == ("dc", "linf", 0.1, old_model, ""))
    assert other_model["masking_checks"] is None  # another measurement's checks are not borrowed
    # nor are the checks of another budget (they judged other attacks)
    stronger = table.merge_results(with_checks, [_result("dc", "linf", 0.1, new_model, robust=0.03,
                                                         budget={"steps": 200, "targets": 9, "square_queries": 5000})])
    row = next(r for r in stronger if table.result_key(r) == ("dc", "linf", 0.1, new_model, ""))
    assert row["robust"] == 0.03 and row["masking_checks"] is None
    # sorted by model, then CNN, DC, RDC, then norm and eps: merging is order-independent
    assert table.merge_results(list(reversed(existing)), measured) == merged
    assert [r["defense"] for r in merged if r["model_sha256"] == new_model] == ["dc", "dc", "rdc"]
    # eps compare as numbers; the file round-trips
    path = tmp_path / "results" / "robustness.json"
    table.update_results(path, existing)
    assert table.update_results(path, [_result("rdc", "linf", 3 / 10, new_model, robust=0.05)]) == \
        json.loads(path.read_text())
    assert sum(r["defense"] == "rdc" for r in table.load_results(path)) == 1
    assert [p.name for p in path.parent.iterdir()] == ["robustness.json"]  # no temporary files left
    assert table.load_results(tmp_path / "missing.json") == []
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit, match="not a JSON list"):
        table.load_results(tmp_path / "bad.json")


def test_a_second_run_keeps_the_rows_of_the_first(table, tmp_path, no_attacks):
    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    base = ["--out-dir", str(out_dir), "--results", str(results), "--n-cnn", "3", "--n-dc", "3", "--no-checks"]
    first, second = base + ["--rows", "cnn-*"], base + ["--rows", "dc-linf-0.3", "--threats", "linf:0.3"]
    _write_fake_reports(table, first, out_dir)
    _write_fake_reports(table, second, out_dir)
    assert table.main(first) == 0
    before = json.loads(results.read_text())
    assert table.main(second) == 0
    after = json.loads(results.read_text())
    assert after[:3] == before and [r["key"] for r in after] == ["cnn-linf-0.1", "cnn-linf-0.3", "cnn-l2-1.5",
                                                                 "dc-linf-0.3"]
    assert table.main(second) == 0 and json.loads(results.read_text()) == after  # re-running changes nothing


def test_a_report_made_with_other_threads_is_reused_and_named_by_its_own_command(table, tmp_path, no_attacks):
    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    made = ["--out-dir", str(out_dir), "--results", str(results), "--rows", "dc-linf-0.1", "--n-dc", "3",
            "--no-checks", "--threads", "1"]
    fakes = _write_fake_reports(table, made, out_dir)
    rerun = made[:-1] + ["2"]  # only the thread count differs: no rdc eval (no_attacks), same report
    assert table.main(rerun) == 0
    (row,) = json.loads(results.read_text())
    assert row["command"] == fakes["dc-linf-0.1"]["settings"]["command"] and "--threads 1" in row["command"]
    assert table.same_results("rdc eval --n 3 --threads 1 --seed 0", "rdc eval --n 3 --seed 0 --threads 2")
    assert not table.same_results("rdc eval --n 3 --threads 1", "rdc eval --n 4 --threads 1")
    # batch size and device schedule the work too: a GPU report stands in for its CPU twin
    assert table.same_results("rdc eval --n 3 --batch-size 5 --threads 1", "rdc eval --n 3 --device cuda --batch-size 50")
    assert not table.same_results("rdc eval --n 3 --batch-size 5", "rdc eval --n 3 --batch-size 5 --steps 40")
    assert not table.same_results(None, "rdc eval --n 3")
    # so do the output paths: a report made in another folder and copied here is the same result
    assert table.same_results("rdc eval --n 3 --out gpu/a.json --log gpu/a.log --state gpu/a.state.jsonl",
                              "rdc eval --n 3 --out runs/a.json --log runs/a.log --state runs/a.state.jsonl")
    assert not table.same_results("rdc eval --n 3 --out a.json --eps 0.1", "rdc eval --n 3 --out a.json --eps 0.2")
    # and their spellings under torchrun (sharded, one identical report)
    assert table.same_results("rdc eval --num-examples 3 --log-file a.log --out a.json",
                              "rdc eval --n 3 --log b.log --out b.json")
    assert not table.same_results("rdc eval --num-examples 3", "rdc eval --n 4")


def test_a_rows_hardware_names_the_device_once_and_every_machine_of_a_resumed_state(table):
    older = {"hardware": "Some CPU, 2 logical CPUs, torch 2.14.1, 1 threads", "settings": {"device": "cpu"}}
    assert table.report_hardware(older) == "Some CPU, 2 logical CPUs, torch 2.14.1, 1 threads, device cpu"
    # reports whose examples record their machine carry the device (and each machine) themselves
    mixed = {"hardware": "mixed: A, device cuda:0 (2 examples); B, device cpu (1 example)",
             "examples_per_hardware": {"A, device cuda:0": 2, "B, device cpu": 1}, "settings": {"device": "cpu"}}
    assert table.report_hardware(mixed) == mixed["hardware"]


def test_a_reused_report_of_older_attacks_is_named_with_the_way_to_measure_it_again(table, tmp_path, no_attacks,
                                                                                    capsys):
    from rdc_studio.core.attacks import ATTACK_REVISION

    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    made = ["--out-dir", str(out_dir), "--results", str(results), "--rows", "dc-linf-0.1", "--n-dc", "3",
            "--no-checks"]
    fakes = _write_fake_reports(table, made, out_dir)  # as reports before revision 2: no attack_revision
    assert table.main(made) == 0
    err = capsys.readouterr().err
    assert f"was made by attack revision 1; the attacks are now revision {ATTACK_REVISION}" in err
    assert f"fresh --out-dir (e.g. benchmarks/results/robustness-runs-r{ATTACK_REVISION})" in err
    assert json.loads(results.read_text())[0]["attack_revision"] == 1
    args = table.add_model_digests(table.parse_args(made))
    path = out_dir / f"{table.row_evaluation(args, table.build_rows(args)[0]).name}.json"
    path.write_text(json.dumps(fakes["dc-linf-0.1"] | {"attack_revision": ATTACK_REVISION}))
    assert table.main(made) == 0
    assert "attack revision" not in capsys.readouterr().err


# --- the README table ------------------------------------------------------------------------

README = """# Project

Intro text | with a pipe.

## Headline figures

| figure | value | command |
|---|---|---|
| clean accuracy | **0.989** | `rdc eval ...` |

<!-- robustness-table:start -->
stale text
<!-- robustness-table:end -->

## Next section

More text.
"""


@pytest.fixture
def model_files(tmp_path):
    """Stand-ins for the current diffusion model and CNN files (only their sha256 and the model's
    card matter here)."""
    model, cnn = tmp_path / "model.safetensors", tmp_path / "cnn.safetensors"
    model.write_bytes(b"diffusion model weights")
    model.with_suffix(".json").write_text((ROOT / "resources" / "models" / f"{DEFAULT_MODEL}.json").read_text())
    cnn.write_bytes(b"cnn weights")
    return (str(model), hashlib.sha256(model.read_bytes()).hexdigest(),
            str(cnn), hashlib.sha256(cnn.read_bytes()).hexdigest())


def test_readme_table_is_generated_from_robustness_json(table, tmp_path, model_files):
    model, model_sha, cnn, cnn_sha = model_files
    settings = table.settings_sha256(model)
    checks = {"passed": False, "n": 50, "checks": [{"row": "rdc-exact-linf-0.3", "check": "large_eps",
                                                    "verdict": "FAIL", "summary": ""}] +
              [{"row": "rdc-smooth-linf-0.3", "check": "monotone_eps", "verdict": "PASS", "summary": ""}] * 3}
    results = tmp_path / "robustness.json"
    results.write_text(json.dumps([
        _result("rdc", "linf", 0.3, model_sha, robust=0.123, masking_checks=checks,
                command=["rdc eval a", "rdc eval b", "rdc eval c"], seconds_per_image=120.0, settings_sha256=settings),
        _result("dc", "linf", 0.1, model_sha, robust=0.0, hardware="NVIDIA H200, device cuda",
                settings_sha256=settings),
        _result("cnn", "l2", 1.5, cnn_sha, robust=0.515),
        _result("dc", "l2", 1.5, "0" * 64, robust=0.777, settings_sha256=settings),  # an older model's row: not shown
        _result("rdc", "l2", 1.5, "1" * 64, robust=0.888, settings_sha256=settings),
        # these weights but other card settings (before the grid was re-chosen), or none recorded: not shown
        _result("dc", "l2", 1.5, model_sha, robust=0.666, settings_sha256="f" * 64),
        _result("rdc", "l2", 1.5, model_sha, robust=0.555),
    ]))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    argv = ["--readme", "--readme-file", str(readme), "--results", str(results), "--model", model, "--cnn", cnn]
    assert table.main(argv) == 0
    text = readme.read_text()
    before, rest = text.split("<!-- robustness-table:start -->\n")
    section, after = rest.split("<!-- robustness-table:end -->")
    assert before == README.split("<!-- robustness-table:start -->")[0] + ""  # the rest of the file as it was
    assert after == README.split("<!-- robustness-table:end -->")[1]
    table_lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert table_lines[0].startswith("| defense | threat model | n | clean | robust (95% CI) |")
    assert [line.split(" | ")[:2] for line in table_lines[1:]] == [["| CNN", "l2 1.5"], ["| DC", "l-inf 0.1"],
                                                                    ["| RDC (worst case)", "l-inf 0.3"]]
    # the checks cover two of the row's three gradient modes, and the cell says so
    assert "| 100 | 99.0% | **12.3%** (2.3-22.3) | ensemble | **1 of 4 failed** (n = 50; exact, smooth gradients " \
        "only) | 120.00 | [1] |" in section
    assert "| **51.5%** (41.5-61.5) | ensemble | not run | 1.50 | [1] |" in section
    assert "| **0.0%**" in section and "[1] Test CPU, device cpu" in section
    assert "[2] NVIDIA H200, device cuda" in section
    assert "77.7" not in section and "88.8" not in section and "stale text" not in section
    assert "66.6" not in section and "55.5" not in section
    # the rows not measured yet are named, without numbers
    missing = section.split("Not measured yet for this model: ")[1].strip()
    assert missing == ("CNN l-inf 0.1; CNN l-inf 0.3; DC l-inf 0.3; DC l2 1.5; "
                       "RDC (worst case over exact, smooth, BPDA) l-inf 0.1; RDC (worst case over exact, smooth, BPDA) "
                       "l2 1.5.")
    assert f"sha256 `{model_sha[:12]}`, defense settings `{settings[:12]}`" in section and str(results) in section
    # idempotent: a second run leaves the file as it is
    assert table.update_readme(readme, results, model, cnn) is False and readme.read_text() == text


def test_readme_without_robustness_json_says_nothing_is_measured(table, tmp_path, model_files, capsys):
    model, model_sha, cnn, _ = model_files
    readme = tmp_path / "README.md"
    readme.write_text(README)
    argv = ["--readme", "--readme-file", str(readme), "--results", str(tmp_path / "none-yet.json"), "--model", model,
            "--cnn", cnn]
    assert table.main(argv) == 0 and "updated" in capsys.readouterr().out
    section = readme.read_text().split("<!-- robustness-table:start -->")[1].split("<!-- robustness-table:end -->")[0]
    assert "No row of the robustness table has been measured for the current model" in section
    assert f"`python benchmarks/robustness_table.py --model {model}`" in section and "--readme" in section
    assert "|" not in section and "%" not in section  # no table, no numbers
    assert table.main(argv) == 0 and "unchanged" in capsys.readouterr().out
    # a README without the markers is left alone, with an error
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="robustness-table:start"):
        table.main(argv)
    assert readme.read_text() == "# no markers\n"
    with pytest.raises(ValueError, match="comes before"):
        table.replace_section("<!-- robustness-table:end --> <!-- robustness-table:start -->", "x")


def test_the_repository_readme_matches_robustness_json(table):
    """The README's table is what --readme makes of benchmarks/results/robustness.json (or of its absence)."""
    text = (ROOT / "README.md").read_text()
    section = table.readme_section(table.load_results(table.DEFAULT_RESULTS), table.DEFAULT_MODEL,
                                   table.model_sha256(table.DEFAULT_MODEL), "mnist-cnn",
                                   table.model_sha256("mnist-cnn"),
                                   settings_digest=table.settings_sha256(table.DEFAULT_MODEL))
    assert table.replace_section(text, section) == text


def _tiny_args(checkpoint, cnn, out_dir):
    return ["--model", str(checkpoint), "--cnn", str(cnn), "--out-dir", str(out_dir),
            "--results", str(out_dir.parent / f"{out_dir.name}-robustness.json"),
            "--threats", ",".join(f"{norm}:{eps}" for norm, eps in TINY_THREATS), "--n-cnn", "2", "--n-dc", "2",
            "--n-rdc", "2", "--steps", "1", "--square-queries", "2", "--targets", "2", "--levels", "2",
            "--threads", "1", "--check-n", "2", "--check-square-queries", "2", "--sweep-linf", "0.3",
            "--sweep-l2", "1.5"]


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_table_on_a_tiny_model(table, tiny_checkpoint, tiny_cnn, tmp_path, capsys):
    out_dir = tmp_path / "table"
    args = _tiny_args(tiny_checkpoint, tiny_cnn, out_dir)
    assert table.main(args + ["--no-checks"]) == 0
    data = json.loads((out_dir / "table.json").read_text())
    assert [(r["defense_flag"], r["grad"], r["norm"]) for r in data["rows"]] == TINY_ROWS
    for row in data["rows"]:
        rep = json.loads(Path(row["report"]).read_text())
        assert rep["settings"]["command"] == row["command"] and row["n"] == rep["n"] == 2
        assert set(row["per_attack"]) == {"apgd-ce", "apgd-dlr", "apgd-t", "square", "transfer"}
        assert row["robust_acc"] <= row["clean_acc"] and row["robust_ci95"][0] <= row["robust_acc"]
        assert row["seconds_per_image"] > 0 and row["forward_passes_per_image"] >= 1 and row["hardware"]
        assert Path(row["log"]).read_text().startswith("command: rdc eval")
        assert (out_dir / f"{Path(row['report']).stem}.state.jsonl").exists()
    md = (out_dir / "table.md").read_text()
    main_table, worst_table = md.split("## Worst case over gradient modes")
    assert main_table.count("\n| ") == 1 + len(TINY_ROWS) and "| RDC (BPDA) | l2 1.5 | 2 |" in md
    # per norm, the per-example worst case over the three RDC rows (exact, smooth, BPDA)
    assert [(w["norm"], w["n"], len(w["runs"])) for w in data["worst_case"]] == [("linf", 2, 3), ("l2", 2, 3)]
    for w in data["worst_case"]:
        rdc_rows = [r for r in data["rows"] if r["defense_flag"] == "rdc" and r["norm"] == w["norm"]]
        assert w["robust_acc"] <= min(r["robust_acc"] for r in rdc_rows)
        assert [r["robust_acc_on_common"] for r in w["runs"]] == [r["robust_acc"] for r in rdc_rows]
    assert worst_table.count("\n| ") == 1 + 2 and "| l2 1.5 | 2 | 3 | RDC (exact gradients) " in worst_table
    assert all(f"`{row['command']}`" in md for row in data["rows"]) and data["checks"] == []
    # robustness.json: CNN, DC and the RDC's worst case per threat model, from these reports
    results = json.loads((tmp_path / "table-robustness.json").read_text())
    assert [(r["key"], r["n"]) for r in results] == [("cnn-linf-0.3", 2), ("cnn-l2-1.5", 2), ("dc-linf-0.3", 2),
                                                     ("dc-l2-1.5", 2), ("rdc-linf-0.3", 2), ("rdc-l2-1.5", 2)]
    by_key = {r["key"]: r for r in data["rows"]}
    model_sha, cnn_sha = (hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (tiny_checkpoint, tiny_cnn))
    for r in results:
        if r["defense"] == "rdc":
            worst = next(w for w in data["worst_case"] if w["norm"] == r["norm"])
            assert (r["robust"], r["ci95"], r["clean"]) == (worst["robust_acc"], worst["robust_ci95"],
                                                            worst["clean_acc"])
            parts = [by_key[f"rdc-{mode}-{r['norm']}-{r['eps']:g}"] for mode in ("exact", "smooth", "bpda")]
            assert r["command"] == [p["command"] for p in parts] and r["model_sha256"] == model_sha
            assert r["seconds_per_image"] == pytest.approx(sum(p["seconds_per_image"] for p in parts))
        else:
            twin = by_key[f"{r['key'].split('-')[0]}-{r['key'].split('-', 1)[1]}"]
            assert (r["robust"], r["ci95"], r["command"]) == (twin["robust_acc"], twin["robust_ci95"], twin["command"])
            assert r["model_sha256"] == (cnn_sha if r["defense"] == "cnn" else model_sha)
        assert r["hardware"].startswith(data["rows"][0]["hardware"]) and r["hardware"].endswith("device cpu")
        assert r["attacks"] == ["apgd-ce", "apgd-dlr", "apgd-t", "square", "transfer"]
    # the checks of one row; its finished table row is reused, not recomputed
    [state] = out_dir.glob("cnn-linf-0.3-n2-c*.state.jsonl")
    before = state.read_text()
    capsys.readouterr()
    assert table.main(args + ["--rows", "cnn-linf-0.3"]) == 0
    assert state.read_text() == before
    data = json.loads((out_dir / "table.json").read_text())
    assert [c["check"]["name"] for c in data["checks"]] == ["large_eps", "monotone_eps", "whitebox_vs_blackbox",
                                                           "more_iterations"]
    assert all(c["check"]["verdict"] in ("PASS", "FAIL") and c["commands"] for c in data["checks"])
    assert data["meta"]["all_checks_passed"] == all(c["check"]["passed"] for c in data["checks"])
    md = (out_dir / "table.md").read_text()
    assert "## Gradient-masking checks" in md and md.count("| CNN | l-inf 0.3 |") == 1 + 4
    assert "rdc eval --dataset mnist --split test --n 2 --defense cnn --attack transfer" in md
    assert "check-cnn-linf-apgd-ce-eps0.6-s1-n2" in md and "check-cnn-linf-apgd-ce-eps0.3-s2-n2" in md
    # robustness.json: the CNN row now carries its checks; the other rows stay as they were
    after = {r["key"]: r for r in json.loads((tmp_path / "table-robustness.json").read_text())}
    assert after.keys() == {r["key"] for r in results}
    assert [c["check"] for c in after["cnn-linf-0.3"]["masking_checks"]["checks"]] == [
        "large_eps", "monotone_eps", "whitebox_vs_blackbox", "more_iterations"]
    assert after["cnn-linf-0.3"]["masking_checks"]["n"] == 2 and after["dc-linf-0.3"]["masking_checks"] is None


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_jobs_run_evaluations_as_subprocesses_with_the_same_results(table, tiny_checkpoint, tiny_cnn, tmp_path,
                                                                    capsys):
    rows = ["--rows", "cnn-linf-0.3,dc-l2-1.5,rdc-smooth-linf-0.3", "--check-rows", "cnn-linf-0.3"]
    sequential, parallel = tmp_path / "seq", tmp_path / "par"
    assert table.main(_tiny_args(tiny_checkpoint, tiny_cnn, sequential) + rows) == 0
    # a stale state of another run makes one evaluation fail; the rest of the table is still made
    [dc_state] = sequential.glob("dc-l2-1.5-n2-*.state.jsonl")
    (parallel / dc_state.name).parent.mkdir(parents=True)
    (parallel / dc_state.name).write_text('{"settings": {"other": 1}}\n')
    capsys.readouterr()
    assert table.main(_tiny_args(tiny_checkpoint, tiny_cnn, parallel) + rows + ["--jobs", "3"]) == 1
    out = capsys.readouterr()
    assert f"not in the table: {dc_state.name.split('.state')[0]}: rdc eval exited with" in out.out
    assert "other settings" in out.out
    seq = json.loads((sequential / "table.json").read_text())
    par = json.loads((parallel / "table.json").read_text())
    assert [r["key"] for r in par["rows"]] == ["cnn-linf-0.3", "rdc-smooth-linf-0.3"]
    # robustness.json gets the CNN row; an RDC row needs all three gradient modes
    assert [r["key"] for r in json.loads((tmp_path / "par-robustness.json").read_text())] == ["cnn-linf-0.3"]
    for row in par["rows"]:
        twin = next(r for r in seq["rows"] if r["key"] == row["key"])
        assert row["command"] == twin["command"].replace(str(sequential), str(parallel))
        assert json.loads(Path(row["report"]).read_text())["per_example"] == \
            json.loads(Path(twin["report"]).read_text())["per_example"]
        assert row["timing"]["source"] == "measured by this script" and row["timing"]["examples_timed"] == 2
        assert Path(row["report"]).with_suffix(".out").read_text()  # each subprocess's console output
    assert [c["check"]["name"] for c in par["checks"]] == [c["check"]["name"] for c in seq["checks"]]
    assert [c["check"]["passed"] for c in par["checks"]] == [c["check"]["passed"] for c in seq["checks"]]


def test_rows_record_and_show_the_attack_budget(table):
    """A reduced ensemble is never shown as the full one: steps, targets and queries are in the row."""
    report = {"settings": {"ensemble": {"order": list(table.ENSEMBLE_ORDER), "targets": 1},
                           "attack_settings": {"apgd-ce": {"steps": 20}, "apgd-dlr": {"steps": 20},
                                               "square": {"steps": 100}, "transfer": {"steps": 20}}}}
    budget = table.report_budget(report)
    assert budget == {"steps": 20, "targets": 1, "square_queries": 100}
    row = {"attacks": list(table.ENSEMBLE_ORDER), "budget": budget}
    assert table.describe_attacks(row) == "ensemble (20 steps, 1 target, Square 100)"
    single = {"attacks": ["apgd-ce"], "budget": {"steps": 100, "targets": None, "square_queries": None}}
    assert table.describe_attacks(single) == "apgd-ce (100 steps)"
    # reports of one attack (rdc eval --attack square / apgd-ce) keep its settings unnamed
    square = {"settings": {"attack": "square", "attack_settings": {"method": "square", "steps": 500, "eps": 0.3}}}
    assert table.report_budget(square) == {"steps": None, "targets": None, "square_queries": 500}
    assert table.describe_attacks({"attacks": ["square"], "budget": table.report_budget(square)}) == \
        "Square alone (500 queries)"
    apgd = {"settings": {"attack": "apgd-ce", "attack_settings": {"method": "apgd", "steps": 40, "loss": "ce"}}}
    assert table.report_budget(apgd) == {"steps": 40, "targets": None, "square_queries": None}


def test_a_larger_n_grows_from_the_largest_smaller_run(table, tmp_path, capsys):
    out_dir = tmp_path / "table"
    out_dir.mkdir()

    def evaluation(n: int, eps: str = "1.5"):
        args = table.add_model_digests(table.parse_args(
            ["--out-dir", str(out_dir), "--threats", f"l2:{eps}", "--rows", "dc-*", "--n-dc", str(n), "--no-checks"]))
        return table.row_evaluation(args, table.build_rows(args)[0])

    for n in (4, 6):
        ev = evaluation(n)
        (out_dir / f"{ev.name}.state.jsonl").write_text(f'{{"settings": {{"n": {n}}}}}\n{{"index": 0}}\n')
        (out_dir / f"{ev.name}.timing.json").write_text(json.dumps({"command": ev.command, "seconds": 2.0 * n,
                                                                    "examples": n}))
    other = evaluation(2, eps="2")  # another threat model never serves as a source
    (out_dir / f"{other.name}.state.jsonl").write_text('{"settings": {"n": 2}}\n')
    assert table.grow_from_smaller_run(evaluation(4), out_dir) is None  # it has its own state
    assert table.grow_from_smaller_run(evaluation(3), out_dir) is None  # nothing smaller
    big = evaluation(10)
    assert table.grow_from_smaller_run(big, out_dir) == evaluation(6).name
    assert (out_dir / f"{big.name}.state.jsonl").read_text() == '{"settings": {"n": 6}}\n{"index": 0}\n'
    timing = json.loads((out_dir / f"{big.name}.timing.json").read_text())
    assert timing == {"command": big.command, "seconds": 12.0, "examples": 6}
    assert f"grows the state of {evaluation(6).name}" in capsys.readouterr().err
    assert table.grow_from_smaller_run(evaluation(2, eps="2"), out_dir) is None
    # the grown state refused and deleted, a new one made from scratch: the copied timing is not its own
    table._drop_stale_timing(big, out_dir, 6)  # its own state's examples: kept
    assert (out_dir / f"{big.name}.timing.json").exists()
    (out_dir / f"{big.name}.state.jsonl").unlink()
    table._drop_stale_timing(big, out_dir, 0)
    assert not (out_dir / f"{big.name}.timing.json").exists()
    assert "its timing file counted examples its state no longer holds" in capsys.readouterr().err


def _fake_follow_up(table, argv: list[str], out_dir: Path, reports: dict[str, dict], broken: dict[str, set[int]],
                    stage: int = 0, earlier: dict[str, list] | None = None):
    """Put a fake report for every evaluation of follow-up ``stage`` the script would run into
    ``out_dir`` (``earlier``: the stages before it, by row key): the examples in ``broken[row
    key]`` are broken, the other survivors survive."""
    args = table.add_model_digests(table.parse_args(argv))
    done = [(row, table.row_evaluation(args, row), reports[row.key]) for row in table.build_rows(args)]
    made = {}
    for row, ev in table.follow_up_evaluations(args, done, earlier or {}, stage):
        indices = parse_indices(dict(zip(ev.argv, ev.argv[1:]))["--indices"])
        report = _fake_report(ev.command, row.defense, row.grad, row.norm, table.parse_fraction(row.eps),
                              [i not in broken.get(row.key, set()) for i in range(max(indices) + 1)],
                              seconds_per_image=10.0)
        report["per_example"] = [e for e in report["per_example"] if e[0] in indices]
        report["n"] = len(indices)
        (out_dir / f"{ev.name}.json").write_text(json.dumps(report))
        made[row.key] = (ev, report)
    return made


def test_a_follow_up_grows_from_the_survivors_of_a_smaller_row(table, tmp_path, capsys):
    """When a row grows, its follow-up attacks a superset of the old survivors: it starts from
    the old follow-up's state (the largest proper subset of its indices with the same budget)."""
    out_dir = tmp_path / "table"
    out_dir.mkdir()
    args = table.add_model_digests(table.parse_args(["--out-dir", str(out_dir), "--rows", "dc-linf-0.3",
                                                     "--follow-up", "100/3/1000,flip/5"]))
    [row] = table.build_rows(args)

    def follow_up(n: int, indices: list[int], stage: int = 0):
        return table.follow_up_evaluation(args, replace(row, n=n), indices, args.follow_up[stage])

    for n, indices in ((6, [0, 3]), (8, [0, 3, 7]), (9, [1, 8])):
        ev = follow_up(n, indices)
        header = {"settings": {"n": len(indices), "indices": table.format_indices(indices)}}
        (out_dir / f"{ev.name}.state.jsonl").write_text(json.dumps(header) + '\n{"index": 0}\n')
    other_budget = follow_up(4, [0], stage=1)
    (out_dir / f"{other_budget.name}.state.jsonl").write_text('{"settings": {"n": 1, "indices": "0"}}\n')
    big = follow_up(12, [0, 3, 7, 10])
    assert table.grow_from_smaller_run(big, out_dir) == follow_up(8, [0, 3, 7]).name
    assert json.loads((out_dir / f"{big.name}.state.jsonl").read_text().splitlines()[0])["settings"]["n"] == 3
    assert f"grows the state of {follow_up(8, [0, 3, 7]).name}" in capsys.readouterr().err
    assert table.grow_from_smaller_run(follow_up(12, [2, 5]), out_dir) is None  # no subset of its indices
    # the flip stage grows from its own budget's state (indices 0), not the larger ensemble one
    assert table.grow_from_smaller_run(follow_up(12, [0, 3, 7, 10], stage=1), out_dir) == other_budget.name


def test_a_square_stage_runs_once_for_the_three_gradient_modes(table, tmp_path, no_attacks, capsys):
    """Square takes no gradient: its follow-up of an RDC row is one evaluation (named after the
    first mode) that serves all three; the row records one command and its seconds once."""
    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    argv = ["--out-dir", str(out_dir), "--results", str(results), "--rows", "dc-linf-0.1,rdc-*-linf-0.1",
            "--n-dc", "6", "--n-rdc", "6", "--no-checks", "--follow-up", "square/500"]
    reports = _write_fake_reports(table, argv, out_dir)
    capsys.readouterr()
    assert table.main(argv + ["--dry-run"]) == 0
    follow_lines = capsys.readouterr().out.split("# follow-ups")[1].splitlines()[1:]
    assert [(line.split("--indices ")[1].split()[0], " --grad " in line) for line in follow_lines] == \
        [("0,3", False), ("0,5", True)]
    assert "rdc-exact-linf-0.1-n6-followup-square-q500-" in follow_lines[1] and "--attack square" in follow_lines[1]
    made = _fake_follow_up(table, argv, out_dir, reports, {key: {5} for key in
                                                            ("rdc-exact-linf-0.1", "rdc-smooth-linf-0.1",
                                                             "rdc-bpda-linf-0.1")})
    assert len({ev.name for ev, _ in made.values() if "rdc" in ev.name}) == 1
    assert table.main(argv) == 0
    dc, rdc = json.loads(results.read_text())
    assert rdc["robust"] == 1 / 6 and (rdc["follow_up"]["n"], rdc["follow_up"]["broke"]) == (2, 1)
    assert isinstance(rdc["follow_up"]["command"], str) and rdc["follow_up"]["seconds_per_image"] == 10.0


def test_follow_up_attacks_the_survivors_and_lowers_the_rows(table, tmp_path, no_attacks, capsys):
    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    argv = ["--out-dir", str(out_dir), "--results", str(results), "--rows", "dc-linf-0.1,rdc-*-linf-0.1",
            "--n-dc", "6", "--n-rdc", "6", "--no-checks", "--follow-up", "--follow-up-targets", "3",
            "--follow-up-square-queries", "1000"]
    reports = _write_fake_reports(table, argv, out_dir)
    # the DC row left 0 and 3 robust; the RDC's worst case 0 and 5 (OUTCOMES)
    capsys.readouterr()
    assert table.main(argv + ["--dry-run"]) == 0
    follow_lines = capsys.readouterr().out.split("# follow-ups")[1].splitlines()[1:]
    assert [line.split("--indices ")[1].split()[0] for line in follow_lines] == ["0,3", "0,5", "0,5", "0,5"]
    assert all("--steps 100" in line and "--targets 3" in line and "--square-queries 1000" in line
               for line in follow_lines)
    assert all("followup-s100t3q1000-i" in line for line in follow_lines)
    made = _fake_follow_up(table, argv, out_dir, reports, {"dc-linf-0.1": {3}, "rdc-bpda-linf-0.1": {5}})
    assert table.main(argv) == 0
    dc, rdc = json.loads(results.read_text())
    assert (dc["robust"], dc["ci95"]) == (1 / 6, list(wilson_interval(1, 6)))  # only 0 is left
    assert dc["follow_up"] == {"n": 2, "indices": "0,3", "attacks": list(ENSEMBLE),
                               "budget": {"steps": None, "targets": 9, "square_queries": None}, "broke": 1,
                               "command": made["dc-linf-0.1"][1]["settings"]["command"], "seconds_per_image": 10.0}
    assert (rdc["robust"], rdc["n"], rdc["follow_up"]["broke"]) == (1 / 6, 6, 1)
    assert rdc["follow_up"]["command"] == [made[f"rdc-{m}-linf-0.1"][1]["settings"]["command"]
                                           for m in ("exact", "smooth", "bpda")]
    assert rdc["follow_up"]["seconds_per_image"] == 30.0 and rdc["per_grad_mode"]["bpda"] == 0.5
    assert "then ensemble (9 targets) on its 2 survivors, which broke 1" in table.describe_attacks(rdc)
    md = (out_dir / "table.md").read_text()
    assert "## Follow-up on the survivors" in md and "| dc-linf-0.1 | 2 (0,3) |" in md
    assert json.loads((out_dir / "table.json").read_text())["follow_ups"][0]["broken"] == [3]


def test_a_row_without_survivors_says_so_and_an_unfinished_follow_up_changes_nothing(table):
    args = table.parse_args(["--follow-up"])
    row = table.Row("dc", "linf", "0.3", 4)
    ev = table.Evaluation("x", ("eval",))
    none_left = _fake_report("rdc eval", "dc", None, "linf", 0.3, [False] * 4)
    assert table.follow_up_summary(args, [(row, ev, none_left)], {})["follow_up"]["n"] == 0
    assert table.describe_attacks({"attacks": list(ENSEMBLE), "budget": {}, "follow_up": {"n": 0}}) == \
        "ensemble; no survivors to follow up"
    some_left = _fake_report("rdc eval", "dc", None, "linf", 0.3, [True, False, True, False])
    assert table.follow_up_summary(args, [(row, ev, some_left)], {}) == {}
    assert table.follow_up_summary(table.parse_args([]), [(row, ev, some_left)], {}) == {}


def test_the_budget_sets_the_attack_defaults_and_explicit_options_win(table):
    full = table.parse_args([])
    assert (full.steps, full.targets, full.square_queries, full.check_square_queries) == (100, 9, 5000, 1000)
    reduced = table.parse_args(["--budget", "reduced"])
    assert (reduced.steps, reduced.targets, reduced.square_queries, reduced.check_square_queries) == (20, 1, 100, 200)
    mixed = table.parse_args(["--budget", "reduced", "--steps", "40", "--square-queries", "300"])
    assert (mixed.steps, mixed.targets, mixed.square_queries) == (40, 1, 300)


def test_a_dry_run_read_in_part_ends_quietly(tmp_path):
    import subprocess

    done = subprocess.run(f"{shlex.quote(sys.executable)} benchmarks/robustness_table.py --dry-run "
                          f"--out-dir {shlex.quote(str(tmp_path))} | head -1", shell=True, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.stdout.startswith("rdc eval ") and done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_a_run_without_follow_up_keeps_the_follow_up_of_the_same_evaluations(table):
    sha = "a" * 64
    followed = _result("rdc", "linf", 0.3, sha, robust=0.04, command=["x", "y", "z"], per_grad_mode={"bpda": 0.1},
                       follow_up={"n": 4, "broke": 2})
    plain = _result("rdc", "linf", 0.3, sha, robust=0.08, command=["x", "y", "z"], per_grad_mode={"bpda": 0.14})
    [kept] = table.merge_results([followed], [plain])
    assert (kept["robust"], kept["per_grad_mode"], kept["follow_up"]) == (0.04, {"bpda": 0.1}, {"n": 4, "broke": 2})
    [kept] = table.merge_results([followed], [plain | {"attack_revision": 2}])
    assert kept["attack_revision"] == 1  # the stored follow-up's (none recorded: revision 1)
    # another follow-up chain on the same evaluations does not make what the stored one broke robust again
    other_chain = plain | {"robust": 0.06, "follow_up": {"n": 4, "broke": 1, "budget": {"square_queries": 500}}}
    [kept] = table.merge_results([followed], [other_chain])
    assert (kept["robust"], kept["follow_up"]) == (0.04, {"n": 4, "broke": 2})
    # other evaluations (e.g. a larger n) without a follow-up do not undo what the stored follow-up
    # broke: the stored row stays (and the script says so) until the new row has its own follow-up
    grown = plain | {"command": ["x2", "y2", "z2"], "n": 100}
    assert table.merge_results([followed], [grown]) == [followed]
    [fresh] = table.merge_results([followed], [grown | {"robust": 0.03}])  # no higher: a new measurement
    assert fresh["robust"] == 0.03 and "follow_up" not in fresh
    [refollowed] = table.merge_results([followed], [grown | {"follow_up": {"n": 8, "broke": 4}, "robust": 0.05}])
    assert refollowed["robust"] == 0.05 and refollowed["follow_up"]["n"] == 8


def test_a_smaller_sample_of_the_same_measurement_never_replaces_a_stored_row(table, tmp_path, capsys):
    sha, reduced = "a" * 64, {"steps": 20, "targets": 1, "square_queries": 100}
    stored = _result("rdc", "l2", 1.5, sha, robust=0.88, n=100, budget=reduced, command=["h200"])
    smaller = stored | {"n": 60, "robust": 0.8, "command": ["cpu"]}
    assert table.merge_results([stored], [smaller]) == [stored]
    # more examples, or another budget (a stronger attack), is a new measurement that replaces it
    [grown] = table.merge_results([stored], [smaller | {"n": 200}])
    assert (grown["n"], grown["robust"]) == (200, 0.8)
    full = {"steps": 100, "targets": 9, "square_queries": 5000}
    [stronger] = table.merge_results([stored], [smaller | {"budget": full}])
    assert (stronger["n"], stronger["budget"]) == (60, full)
    # but a weaker attack on no more examples never does (it would hide what the stronger one broke)
    assert table.merge_results([stronger], [stronger | {"budget": reduced, "robust": 0.9}]) == [stronger]
    assert table.merge_results([stronger], [stronger | {"budget": reduced, "n": 50}]) == [stronger]
    # the script says so on stderr, once however often it writes the file
    path = tmp_path / "robustness.json"
    table.update_results(path, [stored])
    said: set = set()
    for _ in range(3):
        assert table.update_results(path, [smaller], said) == [stored]
    err = capsys.readouterr().err
    assert err.count("keeps its rdc-l2-1.5 row of n = 100") == 1 and "this run's n = 60" in err
    assert json.loads(path.read_text()) == [stored]


def test_a_re_read_of_the_same_evaluations_keeps_the_row_date(table):
    sha = "a" * 64
    old = _result("dc", "l2", 1.5, sha, command="rdc eval x", date="2026-12-04")
    [reread] = table.merge_results([old], [old | {"date": "2026-12-05", "masking_checks": {"passed": True}}])
    assert reread["date"] == "2026-12-04" and reread["masking_checks"] == {"passed": True}
    # other commands measured something new, and so did a follow-up the old row lacked
    [new] = table.merge_results([old], [old | {"date": "2026-12-05", "command": "rdc eval y"}])
    assert new["date"] == "2026-12-05"
    [followed] = table.merge_results([old], [old | {"date": "2026-12-05", "follow_up": {"n": 2, "broke": 1}}])
    assert followed["date"] == "2026-12-05"


def test_follow_up_stages_each_attack_what_the_earlier_ones_left(table, tmp_path, no_attacks, capsys):
    out_dir, results = tmp_path / "table", tmp_path / "robustness.json"
    base = ["--out-dir", str(out_dir), "--results", str(results), "--rows", "dc-linf-0.1,rdc-*-linf-0.1",
            "--n-dc", "6", "--n-rdc", "6", "--no-checks"]
    argv = base + ["--follow-up", "100/3/1000,100/9/5000"]
    reports = _write_fake_reports(table, argv, out_dir)
    # the DC row left 0 and 3 robust; the RDC's worst case 0 and 5 (OUTCOMES). Stage 1 breaks DC 3 and
    # nothing of the RDC's; stage 2 then attacks DC 0 and RDC 0 and 5, and the smooth mode breaks 0
    first = _fake_follow_up(table, argv, out_dir, reports, {"dc-linf-0.1": {3}})
    capsys.readouterr()
    assert table.main(argv + ["--dry-run"]) == 0
    follow_lines = capsys.readouterr().out.split("# follow-ups")[1].splitlines()[1:]
    assert [(line.split("--indices ")[1].split()[0], line.split("-followup-")[1].split("-")[0])
            for line in follow_lines] == [("0,3", "s100t3q1000")] + [("0,5", "s100t3q1000")] * 3 + \
        [("0", "s100t9q5000")] + [("0,5", "s100t9q5000")] * 3
    second = _fake_follow_up(table, argv, out_dir, reports, {"rdc-smooth-linf-0.1": {0}}, stage=1,
                             earlier={key: [made] for key, made in first.items()})
    assert table.main(argv) == 0
    dc, rdc = json.loads(results.read_text())
    assert dc["robust"] == 1 / 6 and rdc["robust"] == 1 / 6  # DC 0; RDC 5
    assert (dc["follow_up"]["n"], dc["follow_up"]["broke"]) == (2, 1)
    assert (dc["follow_up"]["then"]["n"], dc["follow_up"]["then"]["indices"], dc["follow_up"]["then"]["broke"]) == \
        (1, "0", 0)
    assert (rdc["follow_up"]["broke"], rdc["follow_up"]["then"]["indices"], rdc["follow_up"]["then"]["broke"]) == \
        (0, "0,5", 1)
    assert rdc["follow_up"]["then"]["command"] == [second[f"rdc-{m}-linf-0.1"][1]["settings"]["command"]
                                                   for m in ("exact", "smooth", "bpda")]
    assert "then" not in rdc["follow_up"]["then"]
    assert table.describe_attacks(rdc).endswith("on its 2 survivors, which broke none; then ensemble (9 targets) "
                                                "on its 2 survivors, which broke 1")
    table_json = json.loads((out_dir / "table.json").read_text())
    assert table_json["meta"]["follow_up_stages"] == [{"steps": 100, "targets": 3, "square_queries": 1000},
                                                      {"steps": 100, "targets": 9, "square_queries": 5000}]
    assert [(f["row"], f["stage"]) for f in table_json["follow_ups"] if f["row"] == "dc-linf-0.1"] == \
        [("dc-linf-0.1", 1), ("dc-linf-0.1", 2)]
    assert "| dc-linf-0.1, stage 2 | 1 (0) |" in (out_dir / "table.md").read_text()
    # a later run with the first stage only, or none, re-reads the same evaluations: the chain stands
    chained = json.loads(results.read_text())
    assert table.main(base + ["--follow-up", "100/3/1000"]) == 0
    assert json.loads(results.read_text()) == chained
    assert table.main(base) == 0
    assert json.loads(results.read_text()) == chained


def test_follow_up_stages_are_checked(table):
    assert table.parse_args([]).follow_up == []
    assert table.parse_args(["--follow-up"]).follow_up == [table.FollowUpBudget(100, 9, 5000)]
    assert table.parse_args(["--follow-up", "--follow-up-targets", "3"]).follow_up == \
        [table.FollowUpBudget(100, 3, 5000)]
    stages = table.parse_args(["--follow-up", "50/1/100, 100/9/5000"]).follow_up
    assert [b.tag for b in stages] == ["s50t1q100", "s100t9q5000"]
    square = table.parse_args(["--follow-up", "square/1000,100/9/5000"]).follow_up
    assert [(b.attack, b.tag) for b in square] == [("square", "square-q1000"), ("ensemble", "s100t9q5000")]
    args = table.add_model_digests(table.parse_args(["--follow-up", "square/1000"]))
    [row] = [r for r in table.build_rows(args) if r.key == "dc-linf-0.3"]
    parsed = build_parser().parse_args(table.follow_up_evaluation(args, row, [4, 7], square[0]).argv)
    assert (parsed.attack, parsed.square_queries, parsed.indices) == ("square", 1000, "4,7")
    assert table.describe_attacks({"attacks": ["apgd-ce"], "budget": {}, "follow_up": {
        "n": 3, "broke": 1, "attacks": ["square"], "budget": {"steps": None, "targets": None, "square_queries": 1000}}}) \
        == "apgd-ce; then Square alone (1000 queries) on its 3 survivors, which broke 1"
    flip = table.parse_args(["--follow-up", "square/500,flip/50"]).follow_up
    assert [(b.attack, b.tag) for b in flip] == [("square", "square-q500"), ("flip", "flip-s50")]
    assert flip[1].as_dict() == {"steps": 50, "targets": 0, "square_queries": 0, "attack": "flip"}
    args = table.add_model_digests(table.parse_args(["--rows", "binary-dc-linf-0.3", "--follow-up", "flip/50"]))
    [binary] = table.build_rows(args)
    table.check_follow_up_stages([binary], args.follow_up)
    parsed = build_parser().parse_args(table.follow_up_evaluation(args, binary, [4, 7], flip[1]).argv)
    assert (parsed.attack, parsed.steps, parsed.binarize, parsed.indices) == ("flip", 50, 0.5, "4,7")
    with pytest.raises(SystemExit, match="binarised defense only"):
        table.check_follow_up_stages([row, binary], args.follow_up)
    with pytest.raises(SystemExit, match="binarised defense only"):
        table.main(["--rows", "dc-linf-0.3", "--follow-up", "flip/5", "--dry-run"])
    assert table.describe_attacks({"attacks": ["apgd-ce"], "budget": {}, "follow_up": {
        "n": 3, "broke": 0, "attacks": ["flip"], "budget": {"steps": 50, "targets": None, "square_queries": None}}}) \
        == "apgd-ce; then the threshold-flip attack (50 iterations) on its 3 survivors, which broke none"
    # flip/STEPSxSTARTS: restarts in the stem, the budget, the command and the README text
    [starts] = table.parse_args(["--follow-up", "flip/50x4"]).follow_up
    assert (starts.tag, starts.restarts) == ("flip-s50r4", 4) and starts.as_dict()["restarts"] == 4
    parsed = build_parser().parse_args(table.follow_up_evaluation(args, binary, [4, 7], starts).argv)
    assert (parsed.attack, parsed.steps, parsed.restarts) == ("flip", 50, 4)
    assert "--restarts" not in table.follow_up_evaluation(args, binary, [4, 7], flip[1]).argv
    assert table.describe_attacks({"attacks": ["flip"], "budget": starts.as_dict()}) \
        == "the threshold-flip attack (50 iterations, 4 starts)"
    flip_report = {"settings": {"attack": "flip", "attack_settings": {"method": "flip", "steps": 50, "restarts": 4}}}
    assert table.report_budget(flip_report) == {"steps": 50, "targets": None, "square_queries": None, "restarts": 4}
    flip_report["settings"]["attack_settings"]["restarts"] = 1
    assert "restarts" not in table.report_budget(flip_report)
    # apgd-ce/STEPS[xSTARTS]: APGD-CE alone, on any row (the convergence check at the final budget)
    longer, restarted = table.parse_args(["--follow-up", "apgd-ce/200,apgd-ce/200x2"]).follow_up
    assert (longer.attack, longer.tag, restarted.tag) == ("apgd-ce", "apgd-ce-s200", "apgd-ce-s200r2")
    assert longer.as_dict() == {"steps": 200, "targets": 0, "square_queries": 0, "attack": "apgd-ce"}
    table.check_follow_up_stages([row, binary], [longer])
    parsed = build_parser().parse_args(table.follow_up_evaluation(args, row, [4, 7], restarted).argv)
    assert (parsed.attack, parsed.steps, parsed.restarts, parsed.indices) == ("apgd-ce", 200, 2, "4,7")
    assert "--square-queries" not in table.follow_up_evaluation(args, row, [4, 7], longer).argv
    apgd_report = {"settings": {"attack": "apgd-ce", "attack_settings": {"method": "apgd", "steps": 200, "restarts": 2}}}
    assert table.describe_attacks({"attacks": ["apgd-ce"], "budget": table.report_budget(apgd_report)}) \
        == "apgd-ce (200 steps, 2 starts)"
    for bad in ("100/9", "100/0/5000", "a/b/c", ",", "square/0", "square/", "square/10/2", "flip/0", "flip/2/3",
                "flip/5x0", "flip/x4", "flip/5x", "square/5x2", "apgd-ce/0", "apgd-ce/", "apgd-ce/5x0",
                "apgd-dlr/100"):
        with pytest.raises(SystemExit):
            table.parse_args(["--follow-up", bad])
    assert not table.extends_follow_up({"n": 2}, {"n": 2}) and table.extends_follow_up({"n": 2}, None)
    assert table.extends_follow_up({"n": 2, "then": {"n": 1}}, {"n": 2})
    assert not table.extends_follow_up({"n": 2, "then": {"n": 1}}, {"n": 3})


def _stage(attacks: list[str], steps: int | None, n: int, broke: int, then: dict | None = None) -> dict:
    stage = {"attacks": attacks, "budget": {"steps": steps, "targets": None, "square_queries": None}, "n": n,
             "broke": broke}
    return stage | ({"then": then} if then else {})


def test_final_budget_convergence_needs_a_doubled_apgd_stage_that_broke_none(table):
    ensemble = list(table.ENSEMBLE_ORDER)
    row = {"attacks": ensemble, "budget": {"steps": 20}, "masking_checks": {"checks": [
        {"row": "rdc-smooth-linf-0.3", "check": "more_iterations", "verdict": "FAIL", "summary": ""},
        {"row": "rdc-smooth-linf-0.3", "check": "large_eps", "verdict": "PASS", "summary": ""}]}}
    chain = _stage(ensemble, 100, 4, 2, _stage(ensemble, 100, 2, 0, _stage(["apgd-ce"], 200, 2, 0)))
    assert table.final_budget_convergence(row) is None  # no follow-up
    assert table.final_budget_convergence(row | {"follow_up": chain}) == {"steps": 200, "before": 100, "survivors": 2}
    note = table._convergence_note(row | {"follow_up": chain})
    assert note == ("; each compares 20 with 40 steps; at the final budget, APGD-CE with 200 steps, twice the 100 "
                    "of the stages before it, broke none of the 2 survivors")
    # the steps come from the check itself (a --check-steps 50 check compared 50 with 100)
    checked = {"checks": [dict(row["masking_checks"]["checks"][0], summary="50 -> 100 steps: 10.0% -> 6.0%, ...")]}
    assert table._convergence_note(row | {"follow_up": chain, "masking_checks": checked}).startswith(
        "; each compares 50 with 100 steps;")
    # not twice the steps of every stage before it
    short = _stage(ensemble, 100, 4, 2, _stage(["apgd-ce"], 150, 2, 0))
    assert table.final_budget_convergence(row | {"follow_up": short}) is None
    # the long attack broke a survivor: the figure was not converged
    broke = _stage(ensemble, 100, 4, 2, _stage(["apgd-ce"], 200, 2, 1))
    assert table.final_budget_convergence(row | {"follow_up": broke}) is None
    # a later stage broke one: the evidence is refuted
    later = _stage(ensemble, 100, 4, 2, _stage(["apgd-ce"], 200, 2, 0, _stage(["square"], None, 2, 1)))
    assert table.final_budget_convergence(row | {"follow_up": later}) is None
    # nothing to attack proves nothing
    assert table.final_budget_convergence(row | {"follow_up": _stage(["apgd-ce"], 200, 0, 0)}) is None
    # a row whose doubled-steps checks all passed needs no note
    passed = {"checks": [dict(c, verdict="PASS") for c in row["masking_checks"]["checks"]]}
    assert table._convergence_note(row | {"follow_up": chain, "masking_checks": passed}) == ""
