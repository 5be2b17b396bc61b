"""benchmarks/robustness_table.py: one rdc eval command per row, the table and the checks on a tiny model."""
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

from rdc_studio.core.cli import build_parser
from rdc_studio.core.data import mnist_available

ROOT = Path(__file__).resolve().parents[2]
ROWS = [("cnn", None, "linf"), ("cnn", None, "l2"), ("dc", None, "linf"), ("dc", None, "l2"),
        ("rdc", "exact", "linf"), ("rdc", "exact", "l2"), ("rdc", "smooth", "linf"), ("rdc", "smooth", "l2"),
        ("rdc", "bpda", "linf"), ("rdc", "bpda", "l2")]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("robustness_table", ROOT / "benchmarks" / "robustness_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
                       "--n-rdc", "30", "--steps", "20", "--square-queries", "300", "--levels", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ROWS) and all(line.startswith("rdc eval ") for line in lines)
    stems = set()
    for line, (defense, grad, norm) in zip(lines, ROWS):
        args = build_parser().parse_args(shlex.split(line)[1:])  # a valid rdc command line
        assert (args.defense, args.norm, args.attack) == (defense, norm, "ensemble")
        assert args.grad == (grad or "auto") and args.eps == ("0.3" if norm == "linf" else "1.5")
        assert args.n == {"cnn": 500, "dc": 60, "rdc": 30}[defense]
        assert (args.steps, args.square_queries, args.targets, args.seed) == (20, 300, 9, 0)
        assert args.dc_steps == (None if defense == "cnn" else 8) and args.cnn == "mnist-cnn"
        outputs = [Path(args.out), Path(args.log), Path(args.state)]
        assert all(p.parent == out_dir for p in outputs) and [p.suffix for p in outputs] == [".json", ".log", ".jsonl"]
        stems.add(Path(args.out).stem)
    assert len(stems) == len(ROWS) and not out_dir.exists()  # distinct files; a dry run writes nothing


def test_dry_run_with_checks_and_a_row_filter(table, capsys):
    assert table.main(["--dry-run", "--rows", "rdc-*-linf", "--sweep-linf", "0.1,0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    split = lines.index("# gradient-masking checks")
    assert [shlex.split(line)[shlex.split(line).index("--grad") + 1] for line in lines[:split]] == ["exact", "smooth",
                                                                                                  "bpda"]
    checks = [build_parser().parse_args(shlex.split(line)[1:]) for line in lines[split + 1:]]
    # per row: APGD-CE at 0.1, 0.2, the row's 0.3 and the large 0.6; twice the steps at 0.3; Square; transfer
    assert len(checks) == 3 * 7
    first = checks[:7]
    assert [(a.attack, a.eps, a.steps) for a in first if a.attack == "apgd-ce"] == [
        ("apgd-ce", "0.1", 100), ("apgd-ce", "0.2", 100), ("apgd-ce", "0.3", 100), ("apgd-ce", "0.6", 100),
        ("apgd-ce", "0.3", 200)]
    assert {a.attack for a in first} == {"apgd-ce", "square", "transfer"} and all(a.n == 50 for a in first)
    assert next(a for a in first if a.attack == "square").square_queries == 1000
    with pytest.raises(SystemExit, match="matches none"):
        table.main(["--dry-run", "--rows", "vit-*"])
    # --check-rows narrows the checks to some of the rows; the table keeps them all
    assert table.main(["--dry-run", "--rows", "rdc-*-linf", "--check-rows", "rdc-smooth-*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    split = lines.index("# gradient-masking checks")
    assert split == 3 and len(lines) - split - 1 == 7
    assert all(shlex.split(line)[shlex.split(line).index("--grad") + 1] == "smooth" for line in lines[split + 1:])
    with pytest.raises(SystemExit, match="--check-rows"):
        table.main(["--dry-run", "--rows", "rdc-*-linf", "--check-rows", "cnn-*"])


def _tiny_args(checkpoint, cnn, out_dir):
    return ["--model", str(checkpoint), "--cnn", str(cnn), "--out-dir", str(out_dir), "--n-cnn", "2", "--n-dc", "2",
            "--n-rdc", "2", "--steps", "1", "--square-queries", "2", "--targets", "2", "--levels", "2",
            "--threads", "1", "--check-n", "2", "--check-square-queries", "2", "--sweep-linf", "0.3",
            "--sweep-l2", "1.5"]


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_table_on_a_tiny_model(table, tiny_checkpoint, tiny_cnn, tmp_path, capsys):
    out_dir = tmp_path / "table"
    args = _tiny_args(tiny_checkpoint, tiny_cnn, out_dir)
    assert table.main(args + ["--no-checks"]) == 0
    data = json.loads((out_dir / "table.json").read_text())
    assert [(r["defense_flag"], r["grad"], r["norm"]) for r in data["rows"]] == ROWS
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
    assert main_table.count("\n| ") == 1 + len(ROWS) and "| RDC (BPDA) | l2 1.5 | 2 |" in md
    # per norm, the per-example worst case over the three RDC rows (exact, smooth, BPDA)
    assert [(w["norm"], w["n"], len(w["runs"])) for w in data["worst_case"]] == [("linf", 2, 3), ("l2", 2, 3)]
    for w in data["worst_case"]:
        rdc_rows = [r for r in data["rows"] if r["defense_flag"] == "rdc" and r["norm"] == w["norm"]]
        assert w["robust_acc"] <= min(r["robust_acc"] for r in rdc_rows)
        assert [r["robust_acc_on_common"] for r in w["runs"]] == [r["robust_acc"] for r in rdc_rows]
    assert worst_table.count("\n| ") == 1 + 2 and "| l2 1.5 | 2 | 3 | RDC (exact gradients) " in worst_table
    assert all(f"`{row['command']}`" in md for row in data["rows"]) and data["checks"] == []
    # the checks of one row; its finished table row is reused, not recomputed
    state = out_dir / "cnn-linf-n2.state.jsonl"
    before = state.read_text()
    capsys.readouterr()
    assert table.main(args + ["--rows", "cnn-linf"]) == 0
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


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_jobs_run_evaluations_as_subprocesses_with_the_same_results(table, tiny_checkpoint, tiny_cnn, tmp_path,
                                                                    capsys):
    rows = ["--rows", "cnn-linf,dc-l2,rdc-smooth-linf", "--check-rows", "cnn-linf"]
    sequential, parallel = tmp_path / "seq", tmp_path / "par"
    assert table.main(_tiny_args(tiny_checkpoint, tiny_cnn, sequential) + rows) == 0
    # a stale state of another run makes one evaluation fail; the rest of the table is still made
    (parallel / "dc-l2-n2.state.jsonl").parent.mkdir(parents=True)
    (parallel / "dc-l2-n2.state.jsonl").write_text('{"settings": {"other": 1}}\n')
    capsys.readouterr()
    assert table.main(_tiny_args(tiny_checkpoint, tiny_cnn, parallel) + rows + ["--jobs", "3"]) == 1
    out = capsys.readouterr()
    assert "not in the table: dc-l2-n2: rdc eval exited with" in out.out and "other settings" in out.out
    seq = json.loads((sequential / "table.json").read_text())
    par = json.loads((parallel / "table.json").read_text())
    assert [r["key"] for r in par["rows"]] == ["cnn-linf", "rdc-smooth-linf"]
    for row in par["rows"]:
        twin = next(r for r in seq["rows"] if r["key"] == row["key"])
        assert row["command"] == twin["command"].replace(str(sequential), str(parallel))
        assert json.loads(Path(row["report"]).read_text())["per_example"] == \
            json.loads(Path(twin["report"]).read_text())["per_example"]
        assert row["timing"]["source"] == "measured by this script" and row["timing"]["examples_timed"] == 2
        assert Path(row["report"]).with_suffix(".out").read_text()  # each subprocess's console output
    assert [c["check"]["name"] for c in par["checks"]] == [c["check"]["name"] for c in seq["checks"]]
    assert [c["check"]["passed"] for c in par["checks"]] == [c["check"]["passed"] for c in seq["checks"]]
