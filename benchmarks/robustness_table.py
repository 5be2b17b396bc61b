"""The README's robustness table for the bundled MNIST models, with gradient-masking checks.

Rows: CNN, DC, RDC (exact gradients), RDC (smooth: exact with a tanh surrogate for the
LM's sign steps, whose derivative is zero) and RDC (BPDA), each under l-inf eps 0.3 and
l2 eps 1.5, attacked with the AutoAttack-style ensemble of ``rdc eval --attack ensemble``
(APGD-CE, APGD-DLR, APGD-T, Square, transfer from the CNN) on the first n MNIST test
images. Every number comes from an ``rdc eval`` command that is printed and recorded, so
any row can be re-run on its own. Each evaluation writes NAME.json (report), NAME.log
(readable log) and NAME.state.jsonl (per-example state) in --out-dir: re-running the
script resumes an interrupted evaluation and reuses finished ones. The script then writes
table.md and table.json there.

Gradient-masking checks (``--checks``, on by default) run APGD-CE on the first
--check-n images of each row's defense and norm: (a) robust accuracy ~0 at a large eps,
(b) non-increasing over an eps sweep, (c) white-box <= Square and <= transfer, (d)
doubling the iterations changes it by < 1 point (see :mod:`core.masking`).

    python benchmarks/robustness_table.py --out-dir runs/robustness-table
    python benchmarks/robustness_table.py --dry-run          # print the commands only
    python benchmarks/robustness_table.py --rows 'cnn-*,dc-linf' --n-dc 50 --no-checks
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdc_studio.core.defense import parse_fraction
from rdc_studio.core.evaluate import worst_case_report
from rdc_studio.core.masking import (CheckResult, all_passed, check_large_eps, check_monotone_eps, check_more_iterations,
                          check_whitebox_vs_blackbox)
from rdc_studio.core.models import DEFAULT_MODEL, atomic_write_bytes, atomic_write_json

DEFENSES = {  # key: (--defense, --grad, label)
    "cnn": ("cnn", None, "CNN"),
    "dc": ("dc", None, "DC"),
    "rdc-exact": ("rdc", "exact", "RDC (exact gradients)"),
    "rdc-smooth": ("rdc", "smooth", "RDC (smooth gradients)"),
    "rdc-bpda": ("rdc", "bpda", "RDC (BPDA)"),
}
NORM_LABELS = {"linf": "l-inf", "l2": "l2"}
ENSEMBLE_ORDER = ("apgd-ce", "apgd-dlr", "apgd-t", "square", "transfer")
ENSEMBLE_HEADERS = ("APGD-CE", "+APGD-DLR", "+APGD-T", "+Square", "+transfer")


@dataclass(frozen=True)
class Row:
    """One row of the table: a defense under one threat model."""

    defense_key: str  # a key of DEFENSES
    norm: str
    eps: str  # as given on the command line ("0.3", "8/255")
    n: int

    @property
    def key(self) -> str:
        return f"{self.defense_key}-{self.norm}"

    @property
    def defense(self) -> str:
        return DEFENSES[self.defense_key][0]

    @property
    def grad(self) -> str | None:
        return DEFENSES[self.defense_key][1]

    @property
    def label(self) -> str:
        return DEFENSES[self.defense_key][2]


@dataclass(frozen=True)
class Evaluation:
    """One ``rdc eval`` run: its file stem in the out dir and its arguments (without ``rdc``)."""

    name: str
    argv: tuple[str, ...]

    @property
    def command(self) -> str:
        """The command line exactly as ``rdc eval`` records it in its report."""
        return "rdc " + " ".join(shlex.quote(a) for a in self.argv)


def _slug(eps: str) -> str:
    return eps.replace("/", "over")


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_rows(args: argparse.Namespace) -> list[Row]:
    """The rows selected by ``--rows`` (shell patterns over keys such as ``rdc-exact-linf``)."""
    n = {"cnn": args.n_cnn, "dc": args.n_dc, "rdc-exact": args.n_rdc, "rdc-smooth": args.n_rdc, "rdc-bpda": args.n_rdc}
    rows = [Row(d, norm, eps, n[d]) for d in DEFENSES for norm, eps in (("linf", args.eps_linf), ("l2", args.eps_l2))]
    return select_rows(rows, args.rows, "--rows")


def select_rows(rows: list[Row], patterns: str, flag: str) -> list[Row]:
    """The rows whose key matches one of the comma-separated shell ``patterns``."""
    selected = [r for r in rows if any(fnmatch.fnmatchcase(r.key, p) for p in _split_list(patterns))]
    if not selected:
        raise SystemExit(f"robustness_table: {flag} {patterns!r} matches none of {', '.join(r.key for r in rows)}")
    return selected


def eval_argv(args: argparse.Namespace, row: Row, attack: str, eps: str, n: int, steps: int, stem: str,
              square_queries: int | None = None) -> tuple[str, ...]:
    """The ``rdc eval`` arguments of one evaluation of ``row``'s defense (outputs under --out-dir)."""
    out = Path(args.out_dir) / stem
    argv = ["eval", "--dataset", "mnist", "--split", "test", "--n", str(n), "--defense", row.defense]
    if row.defense != "cnn":
        argv += ["--model", args.model]
        if args.levels:
            argv += ["--levels", str(args.levels)]
    if row.grad:
        argv += ["--grad", row.grad]
    argv += ["--attack", attack, "--norm", row.norm, "--eps", eps]
    if attack != "square":
        argv += ["--steps", str(steps)]
    if attack in ("ensemble", "square"):
        argv += ["--square-queries", str(square_queries)]
    if attack == "ensemble":
        argv += ["--targets", str(args.targets)]
    if attack in ("ensemble", "transfer") or row.defense == "cnn":
        argv += ["--cnn", args.cnn]
    argv += ["--seed", str(args.seed)]
    for flag, value, default in (("--batch-size", args.batch_size, 50), ("--device", args.device, "auto"),
                                 ("--threads", args.threads, 0)):
        if value != default:  # results do not depend on these; keep the commands short
            argv += [flag, str(value)]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    argv += ["--out", f"{out}.json", "--log", f"{out}.log", "--state", f"{out}.state.jsonl"]
    return tuple(argv)


def row_evaluation(args: argparse.Namespace, row: Row) -> Evaluation:
    stem = f"{row.key}-n{row.n}"
    return Evaluation(stem, eval_argv(args, row, "ensemble", row.eps, row.n, args.steps, stem, args.square_queries))


def check_evaluations(args: argparse.Namespace, row: Row) -> dict[str, Evaluation]:
    """The evaluations behind the gradient-masking checks of ``row`` (APGD-CE unless named).

    Keys: ``apgd@EPS`` for the eps sweep (which includes the row's eps and the large eps),
    ``apgd-long`` (twice the steps at the row's eps), ``square`` and ``transfer``.
    """
    m, steps = args.check_n, args.check_steps or args.steps
    sweep = _split_list(args.sweep_linf if row.norm == "linf" else args.sweep_l2)
    large = args.large_eps_linf if row.norm == "linf" else args.large_eps_l2
    values = {parse_fraction(e) for e in sweep}
    for extra in (row.eps, large):
        if parse_fraction(extra) not in values:
            sweep.append(extra)
            values.add(parse_fraction(extra))
    base = f"check-{row.key}"
    evs = {}
    for eps in sorted(sweep, key=parse_fraction):
        stem = f"{base}-apgd-ce-eps{_slug(eps)}-s{steps}-n{m}"
        evs[f"apgd@{eps}"] = Evaluation(stem, eval_argv(args, row, "apgd-ce", eps, m, steps, stem))
    stem = f"{base}-apgd-ce-eps{_slug(row.eps)}-s{2 * steps}-n{m}"
    evs["apgd-long"] = Evaluation(stem, eval_argv(args, row, "apgd-ce", row.eps, m, 2 * steps, stem))
    q = args.check_square_queries
    stem = f"{base}-square-eps{_slug(row.eps)}-q{q}-n{m}"
    evs["square"] = Evaluation(stem, eval_argv(args, row, "square", row.eps, m, steps, stem, square_queries=q))
    stem = f"{base}-transfer-eps{_slug(row.eps)}-s{steps}-n{m}"
    evs["transfer"] = Evaluation(stem, eval_argv(args, row, "transfer", row.eps, m, steps, stem))
    return evs


def _done_in_state(path: Path) -> int:
    """Examples already recorded in a resumable state file (0 when there is none)."""
    if not path.exists():
        return 0
    done = set()
    for line in path.read_text().splitlines()[1:]:
        try:
            done.add(int(json.loads(line)["index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return len(done)


def _existing_report(ev: Evaluation, out_dir: Path) -> dict[str, Any] | None:
    """The report of ``ev`` in ``out_dir`` if one was made by exactly ``ev``'s command."""
    path = out_dir / f"{ev.name}.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return report if report.get("settings", {}).get("command") == ev.command else None


def _load_timing(ev: Evaluation, out_dir: Path) -> dict[str, Any]:
    path = out_dir / f"{ev.name}.timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    return timing if timing.get("command") == ev.command else {"command": ev.command, "seconds": 0.0, "examples": 0}


def _add_timing(ev: Evaluation, out_dir: Path, report: dict[str, Any], done_before: int) -> None:
    """Add the run that just made ``report`` to ``ev``'s timing file (the examples it computed)."""
    timing = _load_timing(ev, out_dir)
    computed = report["n"] - done_before
    if computed > 0:
        timing["seconds"] += report["seconds"]
        timing["examples"] += computed
        atomic_write_json(out_dir / f"{ev.name}.timing.json", timing)


def _with_timing(ev: Evaluation, out_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with ``table_timing``: seconds per image over the examples this script's runs
    computed (``rdc eval`` times only its own run, also when it resumed)."""
    timing = _load_timing(ev, out_dir)
    if timing["examples"] > 0:
        report["table_timing"] = {"seconds_per_image": timing["seconds"] / timing["examples"],
                                  "examples_timed": timing["examples"], "source": "measured by this script"}
    else:  # the report was made outside this script
        report["table_timing"] = {"seconds_per_image": report["seconds_per_image"], "examples_timed": report["n"],
                                  "source": "the report (its last run only)"}
    return report


def _failure_hint(ev: Evaluation, out_dir: Path, message: str) -> str:
    if "other settings" in message:
        return (f" (the state {ev.name}.state.jsonl in {out_dir} belongs to a run with other settings: use "
                f"another --out-dir or delete it)")
    return ""


def _rdc_eval(ev: Evaluation) -> tuple[int, str]:
    """Run ``ev``'s ``rdc eval`` command as a subprocess, its console output passed through;
    returns its exit code and last line of output."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "rdc_studio.core.cli", *ev.argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    tail = ""
    try:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            text = chunk.decode(errors="replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-2000:]
    finally:
        rc = proc.wait()
    lines = [line for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    return rc, lines[-1] if lines else ""


def run_evaluation(ev: Evaluation, out_dir: Path) -> dict[str, Any]:
    """Run ``ev`` (unless its report already exists for the same command), exactly as its
    printed command, and return its report, with ``table_timing`` (see :func:`_with_timing`)."""
    report = _existing_report(ev, out_dir)
    if report is None:
        print(f"\n$ {ev.command}", file=sys.stderr, flush=True)
        before = _done_in_state(out_dir / f"{ev.name}.state.jsonl")
        rc, last = _rdc_eval(ev)
        if rc != 0:
            raise SystemExit(f"robustness_table: {ev.name}: rdc eval exited with {rc}: {last}"
                             f"{_failure_hint(ev, out_dir, last)}")
        report = json.loads((out_dir / f"{ev.name}.json").read_text())
        _add_timing(ev, out_dir, report, before)
    return _with_timing(ev, out_dir, report)


def run_concurrently(evaluations: list[Evaluation], out_dir: Path, jobs: int,
                     poll_seconds: float = 0.5) -> dict[str, str]:
    """Run the evaluations that lack a report as up to ``jobs`` ``rdc eval`` subprocesses at once.

    Each one's console output goes to NAME.out in ``out_dir``. Returns ``{name: reason}`` for
    the evaluations that failed; the others leave their reports (and timings) behind, so the
    sequential pass that follows only reads them. Stopping this script stops the subprocesses,
    which save their resumable state.
    """
    import subprocess

    queue, seen = [], set()
    for ev in evaluations:
        if ev.name not in seen and _existing_report(ev, out_dir) is None:
            queue.append(ev)
            seen.add(ev.name)
    running: list[tuple[Evaluation, subprocess.Popen, int, Any]] = []
    failed: dict[str, str] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                ev = queue.pop(0)
                print(f"$ {ev.command}   [{ev.name}.out]", file=sys.stderr, flush=True)
                before = _done_in_state(out_dir / f"{ev.name}.state.jsonl")
                log = open(out_dir / f"{ev.name}.out", "ab")
                proc = subprocess.Popen([sys.executable, "-m", "rdc_studio.core.cli", *ev.argv], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
                running.append((ev, proc, before, log))
            time.sleep(poll_seconds)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                ev, proc, before, log = item
                log.close()
                report = _existing_report(ev, out_dir)
                if proc.returncode == 0 and report is not None:
                    _add_timing(ev, out_dir, report, before)
                    print(f"done {ev.name}: robust {100 * report['robust_acc']:.1f}% (n={report['n']})",
                          file=sys.stderr, flush=True)
                else:
                    tail = (out_dir / f"{ev.name}.out").read_text(errors="replace").strip().splitlines()[-1:]
                    reason = f"rdc eval exited with {proc.returncode}" + (f": {tail[0]}" if tail else "")
                    failed[ev.name] = reason + _failure_hint(ev, out_dir, reason)
                    print(f"FAILED {ev.name}: {failed[ev.name]}", file=sys.stderr, flush=True)
    finally:
        for _, proc, _, log in running:  # interrupted: let each save its state
            proc.terminate()
        for _, proc, _, log in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return failed


def row_summary(row: Row, ev: Evaluation, report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The table.json entry of a finished row."""
    per_attack = {r["attack"]: {"robust_acc": r["robust_acc"], "robust_ci95": r["robust_ci95"],
                                "broken": r["success"]} for r in report.get("per_attack", [])}
    return {"key": row.key, "defense": row.label, "defense_flag": row.defense, "grad": row.grad,
            "norm": row.norm, "eps": row.eps, "n": report["n"], "clean_acc": report["clean_acc"],
            "clean_ci95": report["ci95"], "robust_acc": report["robust_acc"], "robust_ci95": report["robust_ci95"],
            "per_attack": per_attack, "seconds_per_image": report["table_timing"]["seconds_per_image"],
            "timing": report["table_timing"],
            "forward_passes_per_image": report["forward_backward_passes_per_image"],
            "hardware": report["hardware"], "command": ev.command, "report": str(out_dir / f"{ev.name}.json"),
            "log": str(out_dir / f"{ev.name}.log")}


def _sweep_key(evs: dict[str, Evaluation], eps: str) -> str:
    """The key of the sweep evaluation at ``eps`` (compared as numbers: "0.3" == ".3")."""
    value = parse_fraction(eps)
    return next(k for k in evs if k.startswith("apgd@") and parse_fraction(k.split("@", 1)[1]) == value)


def run_checks(args: argparse.Namespace, row: Row, evs: dict[str, Evaluation], out_dir: Path,
               main_report: dict[str, Any] | None) -> list[tuple[CheckResult, list[str]]]:
    """Run the check evaluations of ``row`` and judge them: (result, commands behind it) pairs."""
    reports = {key: run_evaluation(ev, out_dir) for key, ev in evs.items()}
    large = _sweep_key(evs, args.large_eps_linf if row.norm == "linf" else args.large_eps_l2)
    main = _sweep_key(evs, row.eps)
    sweep = [k for k in evs if k.startswith("apgd@")]
    judged = [
        (check_large_eps(reports[large], args.large_eps_max_acc), [large]),
        (check_monotone_eps([(parse_fraction(k.split("@", 1)[1]), reports[k]) for k in sweep]), sweep),
        (check_whitebox_vs_blackbox(reports[main], reports["square"], reports["transfer"], ensemble=main_report),
         [main, "square", "transfer"]),
        (check_more_iterations(reports[main], reports["apgd-long"], args.max_change), [main, "apgd-long"]),
    ]
    return [(result, [evs[k].command for k in keys]) for result, keys in judged]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def worst_cases(summaries: list[dict[str, Any]], reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per threat model with two or more RDC rows: the per-example worst case over their
    gradient modes (on the examples all of them attacked), as :func:`core.evaluate.worst_case_report`."""
    out = []
    for norm in NORM_LABELS:
        rows = [s for s in summaries if s["defense_flag"] == "rdc" and s["norm"] == norm]
        if len(rows) < 2:
            continue
        combined = worst_case_report([reports[s["key"]] for s in rows], labels=[s["defense"] for s in rows])
        combined.pop("per_example")
        out.append({"norm": norm, "eps": rows[0]["eps"], "rows": [s["key"] for s in rows]} | combined)
    return out


def render_markdown(summaries: list[dict[str, Any]], checks: list[dict[str, Any]], meta: dict[str, Any],
                    worst: list[dict[str, Any]] | None = None) -> str:
    """table.md: the results table, the checks and the commands behind every number."""
    hardware: list[str] = []
    for s in summaries:
        if s["hardware"] not in hardware:
            hardware.append(s["hardware"])
    lines = ["# Robustness of the bundled MNIST models", "",
             f"Made by `{meta['command']}` ({meta['date']}). Model `{meta['model']}`, transfer source and CNN row "
             f"`{meta['cnn']}`. Attack: `rdc eval --attack ensemble`, i.e. APGD-CE, APGD-DLR, APGD-T "
             f"({meta['targets']} target classes), Square ({meta['square_queries']} queries) and APGD-CE crafted on "
             f"the CNN (transfer), each run only on the examples still unbroken; APGD {meta['steps']} iterations, "
             f"1 restart, seed {meta['seed']}. First n MNIST test images, 8-bit inputs, every adversarial example "
             f"validated; accuracies in %, 95% Wilson intervals. The per-attack columns give the robust accuracy "
             f"after that attack and all before it.", "",
             "| Defense | Threat model | n | Clean | Robust (95% CI) | " + " | ".join(ENSEMBLE_HEADERS)
             + " | s / image | passes / image | Hardware |",
             "|" + "---|" * (8 + len(ENSEMBLE_HEADERS))]
    for s in summaries:
        lo, hi = s["robust_ci95"]
        per = [_pct(s["per_attack"][a]["robust_acc"]) if a in s["per_attack"] else "-" for a in ENSEMBLE_ORDER]
        lines.append(f"| {s['defense']} | {NORM_LABELS[s['norm']]} {s['eps']} | {s['n']} | {_pct(s['clean_acc'])} | "
                     f"**{_pct(s['robust_acc'])}** ({_pct(lo)}-{_pct(hi)}) | " + " | ".join(per)
                     + f" | {s['seconds_per_image']:.2f} | {s['forward_passes_per_image']:.0f} | "
                     f"[{hardware.index(s['hardware']) + 1}] |")
    lines.append("")
    lines += [f"[{i}] {h}" + ("  " if i < len(hardware) else "") for i, h in enumerate(hardware, 1)]
    lines.append("")
    lines.append("Seconds per image: wall time of the evaluation divided by the images it computed; passes per "
                 "image: forward(-backward) passes of the attacked model, all attacks together.")
    if worst:
        lines += ["", "## Worst case over gradient modes", "",
                  "An example counts as robust only if the ensemble left it robust in every RDC row of its threat "
                  "model (docs/architecture.md, evaluation rules), on the first n examples all those rows "
                  "attacked.", "",
                  "| Threat model | n | Rows | Robust per row on these n | Worst case (95% CI) |", "|---|---|---|---|---|"]
        for w in worst:
            lo, hi = w["robust_ci95"]
            per_row = ", ".join(f"{r['label']} {_pct(r['robust_acc_on_common'])}" for r in w["runs"])
            lines.append(f"| {NORM_LABELS[w['norm']]} {w['eps']} | {w['n']} | {len(w['runs'])} | {per_row} | "
                         f"**{_pct(w['robust_acc'])}** ({_pct(lo)}-{_pct(hi)}) |")
    if checks:
        lines += ["", "## Gradient-masking checks", "",
                  f"APGD-CE ({meta['check_steps']} iterations, 1 restart) on the first {meta['check_n']} test images "
                  f"of each row's defense and norm; Square with {meta['check_square_queries']} queries. "
                  f"(a) robust accuracy <= {_pct(meta['large_eps_max_acc'])}% at l-inf eps {meta['large_eps_linf']} / "
                  f"l2 eps {meta['large_eps_l2']}; (b) non-increasing over eps (clean accuracy at eps 0); (c) "
                  f"white-box APGD-CE <= Square and <= transfer, each run alone; (d) doubling the APGD-CE iterations "
                  f"changes robust accuracy by < {100 * meta['max_change']:g} point.", "",
                  f"**All checks passed: {'yes' if meta['all_checks_passed'] else 'no'}**", "",
                  "| Defense | Threat model | Check | Result | Numbers |", "|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['defense']} | {NORM_LABELS[c['norm']]} {c['eps']} | {c['check']['title']} | "
                         f"**{c['check']['verdict']}** | {_cell(c['check']['summary'])} |")
    lines += ["", "## Commands", "", "Each row (run from the repository root):", ""]
    lines += [f"- {s['defense']}, {NORM_LABELS[s['norm']]} {s['eps']}: `{s['command']}`" for s in summaries]
    if checks:
        lines += ["", "Checks:", ""]
        seen: list[str] = []
        for c in checks:
            seen += [cmd for cmd in c["commands"] if cmd not in seen]
        lines += [f"- `{cmd}`" for cmd in seen]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusion model: bundled name or checkpoint path")
    p.add_argument("--cnn", default="mnist-cnn", help="the CNN row and the transfer source")
    p.add_argument("--out-dir", default="runs/robustness-table")
    p.add_argument("--rows", default="*", help="comma-separated shell patterns over row keys "
                   "(cnn-linf, cnn-l2, dc-linf, dc-l2, rdc-exact-linf, rdc-exact-l2, rdc-smooth-linf, rdc-smooth-l2, "
                   "rdc-bpda-linf, rdc-bpda-l2)")
    p.add_argument("--n-cnn", type=int, default=1000, help="test images of the CNN rows")
    p.add_argument("--n-dc", type=int, default=200, help="test images of the DC rows")
    p.add_argument("--n-rdc", type=int, default=100, help="test images of the RDC rows (exact, smooth and BPDA)")
    p.add_argument("--eps-linf", default="0.3")
    p.add_argument("--eps-l2", default="1.5")
    p.add_argument("--steps", type=int, default=100, help="APGD iterations")
    p.add_argument("--square-queries", type=int, default=5000)
    p.add_argument("--targets", type=int, default=9, help="APGD-T target classes")
    p.add_argument("--levels", type=int, default=None, help="classifier noise levels T (default: the model card's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    p.add_argument("--jobs", type=int, default=1,
                   help="evaluations run at once, each an rdc eval subprocess (e.g. several on one GPU)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                   help="run the gradient-masking checks")
    p.add_argument("--check-rows", default="*", help="shell patterns: the rows (of --rows) that get the checks")
    p.add_argument("--check-n", type=int, default=50, help="test images of each check evaluation")
    p.add_argument("--check-steps", type=int, default=None, help="APGD iterations of the checks (default: --steps)")
    p.add_argument("--check-square-queries", type=int, default=1000)
    p.add_argument("--sweep-linf", default="0.1,0.2,0.3", help="l-inf eps sweep of check (b)")
    p.add_argument("--sweep-l2", default="0.5,1,1.5", help="l2 eps sweep of check (b)")
    p.add_argument("--large-eps-linf", default="0.6", help="check (a); also the end of the sweep")
    p.add_argument("--large-eps-l2", default="6")
    p.add_argument("--large-eps-max-acc", type=float, default=0.02, help="check (a): robust accuracy allowed")
    p.add_argument("--max-change", type=float, default=0.01, help="check (d): largest change allowed")
    p.add_argument("--dry-run", action="store_true", help="print the rdc eval commands and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    rows = build_rows(args)
    out_dir = Path(args.out_dir)
    row_evs = [(row, row_evaluation(args, row)) for row in rows]
    check_evs = [(row, check_evaluations(args, row)) for row in select_rows(rows, args.check_rows, "--check-rows")
                 ] if args.checks else []
    if args.dry_run:
        for _, ev in row_evs:
            print(ev.command)
        if check_evs:
            print("# gradient-masking checks")
            for row, evs in check_evs:
                for ev in evs.values():
                    print(ev.command)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/robustness_table.py " + " ".join(shlex.quote(a) for a in argv),
            "date": time.strftime("%Y-%m-%d"), "model": args.model, "cnn": args.cnn, "steps": args.steps,
            "square_queries": args.square_queries, "targets": args.targets, "seed": args.seed,
            "checks": bool(args.checks), "check_n": args.check_n, "check_steps": args.check_steps or args.steps,
            "check_square_queries": args.check_square_queries, "large_eps_linf": args.large_eps_linf,
            "large_eps_l2": args.large_eps_l2, "large_eps_max_acc": args.large_eps_max_acc,
            "max_change": args.max_change}
    summaries: list[dict[str, Any]] = []
    reports: dict[str, dict[str, Any]] = {}
    checks: list[dict[str, Any]] = []
    results: list[CheckResult] = []

    def write() -> None:
        meta["all_checks_passed"] = all_passed(results)
        worst = worst_cases(summaries, reports)
        atomic_write_json(out_dir / "table.json", {"meta": meta, "rows": summaries, "worst_case": worst,
                                                   "checks": checks})
        atomic_write_bytes(out_dir / "table.md", render_markdown(summaries, checks, meta, worst).encode())

    failed: dict[str, str] = {}
    if args.jobs > 1:
        failed = run_concurrently([ev for _, ev in row_evs] + [ev for _, evs in check_evs for ev in evs.values()],
                                  out_dir, args.jobs)
    for row, ev in row_evs:
        if ev.name in failed:
            continue
        reports[row.key] = run_evaluation(ev, out_dir)
        summaries.append(row_summary(row, ev, reports[row.key], out_dir))
        write()
    for row, evs in check_evs:
        if any(ev.name in failed for ev in evs.values()):
            continue
        for result, commands in run_checks(args, row, evs, out_dir, reports.get(row.key)):
            results.append(result)
            checks.append({"row": row.key, "defense": row.label, "norm": row.norm, "eps": row.eps,
                           "check": result.to_dict(), "commands": commands})
        write()
    print(f"wrote {out_dir / 'table.md'} and {out_dir / 'table.json'}")
    for c in checks:
        print(f"{c['check']['verdict']}  {c['defense']}, {NORM_LABELS[c['norm']]} {c['eps']}: {c['check']['summary']}")
    if checks:
        print("all gradient-masking checks passed" if all_passed(results)
              else "some gradient-masking checks FAILED (see table.md)")
    for name, reason in failed.items():
        print(f"not in the table: {name}: {reason} (see {out_dir / (name + '.out')})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
