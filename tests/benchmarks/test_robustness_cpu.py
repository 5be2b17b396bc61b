"""benchmarks/robustness_cpu.sh: the reduced-budget CPU protocol runs the rows and checks it documents."""
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

from rdc_studio.core.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def dry_output(tmp_path: Path, **env: str) -> str:
    """What the script prints with DRY_RUN=1."""
    environ = {**os.environ, "DRY_RUN": "1", "OUT_DIR": str(tmp_path / "runs"), **env,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "robustness_cpu.sh")], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def dry_run(tmp_path: Path, **env: str) -> list:
    """The parsed `rdc eval` command lines the script prints with DRY_RUN=1."""
    lines = [line for line in dry_output(tmp_path, **env).splitlines() if line.startswith("rdc eval ")]
    return [build_parser().parse_args(shlex.split(line)[1:]) for line in lines]


def test_dry_run_lists_the_documented_rows_and_checks(tmp_path):
    commands = dry_run(tmp_path)
    rows = Counter((a.defense, a.grad, a.norm, a.eps, a.n) for a in commands if a.attack == "ensemble")
    expected = {("dc", "auto", "linf", 0.1, 100), ("dc", "auto", "l2", 1.5, 100),
                ("dc", "auto", "linf", 0.3, 100)}
    expected |= {("rdc", g, norm, eps, 60) for g in ("exact", "smooth", "bpda") for norm, eps in (("linf", 0.1), ("l2", 1.5))}
    expected |= {("rdc", g, "linf", 0.3, 50) for g in ("exact", "smooth", "bpda")}
    assert set(rows) == expected and set(rows.values()) == {1}
    for a in commands:
        assert a.model == "mnist-embedding" and a.threads == 1 and a.batch_size == 5 and a.split == "test"
        assert Path(a.out).parent == tmp_path / "runs"
        if a.attack == "ensemble":
            assert (a.steps, a.targets, a.square_queries) == (20, 1, 100)
    checks = [a for a in commands if a.attack != "ensemble"]
    # the DC's checks on 50 digits, the RDC's for every gradient mode on 10 at l-inf 0.1 and
    # l2 1.5 and on 50 at l-inf 0.3
    assert {(a.defense, a.grad, a.n) for a in checks} == {("dc", "auto", 50)} | {
        ("rdc", g, n) for g in ("exact", "smooth", "bpda") for n in (10, 50)}
    assert {a.n for a in checks if a.defense == "rdc" and a.steps == 40 and a.eps == 0.3} == {50}
    assert {a.attack for a in checks} == {"apgd-ce", "square", "transfer"}
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # a dry run measures nothing


def test_sizes_and_model_come_from_the_environment(tmp_path):
    commands = dry_run(tmp_path, N_DC="30", N_RDC="12", CHECK_N_DC="8", CHECK_N_LARGE="6", N_DC_LARGE="20",
                       N_RDC_LARGE="7", STEPS="10")
    assert {a.n for a in commands if a.attack == "ensemble" and a.eps != 0.3} == {30, 12}
    assert {(a.defense, a.n) for a in commands if a.attack == "ensemble" and a.eps == 0.3} == \
        {("dc", 20), ("rdc", 7)}
    assert {a.n for a in commands if a.defense == "dc" and a.attack != "ensemble"} == {8, 6}
    assert {a.steps for a in commands if a.attack == "ensemble"} == {10}


def test_the_l_inf_0_3_rows_get_the_staged_follow_up_unless_switched_off(tmp_path):
    staged = dry_output(tmp_path)
    assert "--follow-up 100/3/1000,100/9/5000,apgd-ce/200" in staged and "# follow-ups" in staged
    assert staged.count("--follow-up") == 1  # only the l-inf 0.3 stage
    other = dry_output(tmp_path, FOLLOW_UP_LARGE="100/9/5000")
    assert "--follow-up 100/9/5000" in other
    assert "--follow-up" not in dry_output(tmp_path, FOLLOW_UP_LARGE="")
