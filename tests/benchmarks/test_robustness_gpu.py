"""benchmarks/robustness_gpu.sh: the GPU protocol's commands, its time limit and resume, and
its pack, run on the CPU with a tiny model."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from rdc_studio.core.cli import build_parser
from rdc_studio.core.data import mnist_available

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "robustness_gpu.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=900)


def test_dry_run_lists_every_dc_and_rdc_row_and_their_checks_on_the_gpu(tmp_path):
    done = run_script(DRY_RUN="1", OUT_DIR=str(tmp_path / "runs"), RESULTS=str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    commands = [build_parser().parse_args(shlex.split(line)[1:]) for line in done.stdout.splitlines()
                if line.startswith("rdc eval ")]
    rows = {(a.defense, a.grad, a.norm, a.eps, a.n) for a in commands if a.attack == "ensemble"}
    threats = [("linf", 0.1), ("linf", 0.3), ("l2", 1.5)]
    assert rows == ({("dc", "auto", norm, eps, 100) for norm, eps in threats}
                    | {("rdc", g, norm, eps, 100) for g in ("exact", "smooth", "bpda") for norm, eps in threats})
    for a in commands:
        assert (a.device, a.threads, a.batch_size, a.model, a.split) == ("cuda", 1, 25, "mnist-embedding", "test")
        assert Path(a.out).parent == tmp_path / "runs"
        if a.attack == "ensemble":
            assert (a.steps, a.targets, a.square_queries) == (20, 1, 100)
    checks = [a for a in commands if a.attack != "ensemble"]
    # every row's checks, every gradient mode, on 50 digits: the eps sweep, 40 steps, Square 200, transfer
    assert {(a.defense, a.grad) for a in checks} == {("dc", "auto")} | {("rdc", g) for g in ("exact", "smooth", "bpda")}
    assert {a.n for a in checks} == {50} and {a.attack for a in checks} == {"apgd-ce", "square", "transfer"}
    assert {a.steps for a in checks if a.attack == "apgd-ce"} == {20, 40}
    assert {a.square_queries for a in checks if a.attack == "square"} == {200}
    assert {(a.norm, a.eps) for a in checks if a.attack == "square"} == set(threats)
    assert not (tmp_path / "runs").exists()  # a dry run measures nothing


def test_sizes_and_rows_come_from_the_environment(tmp_path):
    done = run_script(DRY_RUN="1", OUT_DIR=str(tmp_path / "runs"), ROWS="rdc-*-l2-1.5", N="30", N_DC="7",
                      CHECK_N="12", STEPS="10", JOBS="3", BATCH="4", DEVICE="cpu")
    assert done.returncode == 0, done.stderr
    commands = [build_parser().parse_args(shlex.split(line)[1:]) for line in done.stdout.splitlines()
                if line.startswith("rdc eval ")]
    assert {(a.defense, a.norm, a.n) for a in commands if a.attack == "ensemble"} == {("rdc", "l2", 30)}
    assert {a.n for a in commands if a.attack != "ensemble"} == {12}
    assert {(a.device, a.batch_size) for a in commands} == {("cpu", 4)}
    assert {a.steps for a in commands if a.attack == "ensemble"} == {10}


def test_follow_up_on_request(tmp_path):
    done = run_script(DRY_RUN="1", OUT_DIR=str(tmp_path / "runs"), ROWS="dc-*", FOLLOW_UP="1")
    assert done.returncode == 0, done.stderr
    # nothing has finished in this folder, so there are no survivors to list yet
    assert "# follow-ups: each stage's attacks on each row's survivors" in done.stdout
    assert "--indices" not in done.stdout
    assert "# follow-ups" not in run_script(DRY_RUN="1", OUT_DIR=str(tmp_path / "runs"), ROWS="dc-*").stdout
    staged = run_script(DRY_RUN="1", OUT_DIR=str(tmp_path / "runs"), ROWS="dc-*", FOLLOW_UP="100/3/1000,100/9/5000")
    assert staged.returncode == 0 and "# follow-ups" in staged.stdout
    bad = run_script(DRY_RUN="1", OUT_DIR=str(tmp_path / "runs"), ROWS="dc-*", FOLLOW_UP="100/3")
    assert bad.returncode == 2 and "STEPS/TARGETS/QUERIES" in bad.stderr


@pytest.mark.parametrize("seconds", ["0", "ten", "-5"])
def test_a_time_limit_that_is_not_a_positive_whole_number_is_refused(tmp_path, seconds):
    done = run_script(seconds, OUT_DIR=str(tmp_path / "runs"), PACK=str(tmp_path / "p.tgz"))
    assert done.returncode == 2 and "SECONDS must be a positive whole number" in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p.tgz").exists()


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_a_run_cut_off_at_its_time_limit_resumes_and_finishes(tmp_path, tiny_checkpoint):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    pack = tmp_path / "pack.tgz"
    env = dict(MODEL=str(tiny_checkpoint), ROWS="dc-l2-1.5", N="2", CHECK_N="2", STEPS="1", JOBS="2", BATCH="2",
               DEVICE="cpu", OUT_DIR=str(tmp_path / "runs"), RESULTS=str(tmp_path / "robustness.json"),
               README=str(readme), PACK=str(pack))
    cut = run_script("1", **env)
    assert cut.returncode == 124, cut.stderr
    assert "stopped at the time limit: run this command again" in cut.stderr and pack.exists()
    assert not (tmp_path / "robustness.json").exists()  # nothing finished, nothing merged

    done = run_script("600", **env)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads((tmp_path / "robustness.json").read_text())
    assert (row["key"], row["n"], row["model"]) == ("dc-l2-1.5", 2, str(tiny_checkpoint))
    assert row["hardware"].endswith("device cpu") and "--device cpu" in row["command"]
    assert [c["check"] for c in row["masking_checks"]["checks"]] == ["large_eps", "monotone_eps",
                                                                    "whitebox_vs_blackbox", "more_iterations"]
    assert row["masking_checks"]["n"] == 2
    # the README copy's table regenerated from these results; the repository's README untouched
    assert readme.read_text() != (ROOT / "README.md").read_text()
    assert "| DC | l2 1.5 | 2 |" in readme.read_text()
    with tarfile.open(pack) as tar:
        names = tar.getnames()
    assert not any(name.endswith(".lock") for name in names)
    packed = {Path("/" + name) for name in names}
    assert {tmp_path / "robustness.json", readme, tmp_path / "runs" / "table.json"} <= packed
    assert any(p.parent == tmp_path / "runs" and p.name.startswith("dc-l2-1.5-n2-") and p.suffix == ".json"
               for p in packed)
