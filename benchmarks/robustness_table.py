"""The robustness table of the bundled MNIST models, with gradient-masking checks.

Rows: CNN, DC, RDC (exact gradients), RDC (smooth: exact with a tanh surrogate for the
LM's sign steps, whose derivative is zero) and RDC (BPDA), each under every threat model
of ``--threats`` (default l-inf 0.1, l-inf 0.3 and l2 1.5), attacked with the
AutoAttack-style ensemble of ``rdc eval --attack ensemble`` (APGD-CE, APGD-DLR, APGD-T,
Square, transfer from the CNN) on the first n MNIST test images. Row keys are
DEFENSE-NORM-EPS (``cnn-linf-0.1``, ``rdc-smooth-l2-1.5``); ``--rows`` selects rows by
shell patterns over them and ``--n-row`` sets n per row (``--n-row 'rdc-*-linf-0.3=50'``;
the defaults are ``--n-cnn``, ``--n-dc`` and ``--n-rdc``). Every number comes from an
``rdc eval`` command that is printed and recorded, so any row can be re-run on its own.
Each evaluation writes NAME.json (report), NAME.log (readable log) and NAME.state.jsonl
(per-example state) in --out-dir; NAME ends with the first 8 hex digits of the sha256 of
the model files it uses (``m`` the diffusion model, ``c`` the CNN), so a retrained model
never reuses or resumes an old model's evaluation. Re-running the script resumes an
interrupted evaluation and reuses finished ones; an evaluation over more examples than a
finished one with otherwise the same settings starts from that one's state (n = 10 grows
to n = 100 by attacking examples 10-99 only), and so does a follow-up of a grown row: it
starts from the state of the same stage on the survivors the row had before (a subset of
its own), so only the new survivors are attacked. The script writes table.md and
table.json (every evaluation row of this run, the worst cases and the checks) in --out-dir;
they are overwritten by the next run, while robustness.json (below) accumulates.

**robustness.json.** The script also merges its results into ``--results`` (default
``benchmarks/results/robustness.json``), the one machine-readable file behind the README's
robustness table: a JSON list of rows, one per defense and threat model, each with
``defense`` (cnn, dc or rdc), ``norm``, ``eps`` (a number), ``n``, ``clean``, ``robust``
(fractions), ``ci95`` (95% Wilson interval of ``robust``), ``attacks`` (the ensemble's
attacks, in order), ``grad_modes``, ``model`` and ``model_sha256`` (the checkpoint the
defense used: the CNN's for CNN rows), ``command``, ``hardware`` and ``seconds_per_image``,
plus ``key``, ``label``, ``date``, ``attack_revision`` (the oldest ``core.attacks.ATTACK_REVISION``
among the row's reports; rows written before it existed have none and were made by 1),
``settings_sha256`` (DC and RDC rows: the digest of the
model card's classifier and purification settings the defense was built with,
:func:`core.models.defense_settings_sha256`), ``masking_checks`` (null when no run has checked
that measurement; a later run without checks keeps the earlier verdicts) and, for the RDC, ``per_grad_mode``. The RDC row is the per-example worst case over the
rdc-exact, rdc-smooth and rdc-bpda evaluations of its threat model (an example is robust
only if it is robust in all three; :func:`core.evaluate.worst_case_report`), on the
examples all three attacked: its ``command`` is the list of their three commands and its
``seconds_per_image`` their sum. It is written only when all three were evaluated. Rows
measured in this run replace the rows with the same (defense, norm, eps, model_sha256,
settings_sha256); all other rows stay. A row never gives way to one of fewer examples
attacked with the same budget (say the CPU script's n = 60 over an H200's n = 100): the stored
row stays, the script says so, and the smaller one is only in the run's table.md. Nor does a
row whose follow-up broke examples give way to a higher figure of other evaluations without a
follow-up (another folder, a larger n): what an attack broke stays broken until the new row
has a follow-up of its own.

**Follow-up on the survivors** (``--follow-up``). Once a row has finished, its survivors
are attacked again with the ensemble and a larger budget (``--follow-up-steps``,
``--follow-up-targets``, ``--follow-up-square-queries``; the full ensemble by default), by
``rdc eval --indices`` (each example's attack is seeded by its index, so it is the attack a
run over the first n would make). For the RDC, the survivors are the examples that survived
all three gradient modes, and each mode attacks them with its own gradients. As in
AutoAttack, an example then counts as robust only if both runs left it robust
(:func:`core.evaluate.with_follow_up`): robustness.json's ``robust`` and ``ci95`` say so, and
the row gets ``follow_up`` (the survivors attacked, the budget, how many it broke, its
commands and seconds per attacked image); table.md lists the follow-ups. A follow-up's file
stem holds its budget and a digest of its indices. ``--follow-up 100/3/1000,100/9/5000`` runs
it in stages (STEPS/TARGETS/QUERIES each): a stage attacks the examples every earlier one left,
once all of them finished, and the row's ``follow_up`` holds the next stage under ``then``. A
stage ``square/QUERIES`` runs Square alone (gradient-free: for defenses whose gradients are
suspect, such as input binarisation; for an RDC row it runs once, under the first gradient
mode's name, and serves all three), and ``flip/STEPS`` the threshold-flip attack (``rdc eval --attack flip``: a greedy
search over the pixels eps can carry across the binarisation threshold; ``flip/STEPSxSTARTS``
adds random-flip restarts), for the rows of a binarised defense only. ``apgd-ce/STEPS`` runs
APGD-CE alone with STEPS iterations (``apgd-ce/STEPSxSTARTS`` with restarts): after the full
ensemble, twice its steps is the masking checks' "longer attacks do not lower it further" at
the row's final budget. A later run with fewer stages (or none) that re-reads the same evaluations keeps the
longer chain.

``--readme`` rewrites the README's robustness table (between ``<!-- robustness-table:start
-->`` and ``<!-- robustness-table:end -->``) from ``--results`` alone, showing the rows of
``--model`` and ``--cnn`` as their files and cards are now (by sha256 of the weights and, for
DC and RDC rows, of the card's defense settings); it measures nothing.

Gradient-masking checks (``--checks``, on by default) run APGD-CE on the first
--check-n images of each row's defense and norm: (a) robust accuracy ~0 at a large eps,
(b) non-increasing over an eps sweep, (c) white-box <= Square and <= transfer, (d)
doubling the iterations neither lowers it by 1 point or more nor raises it beyond noise (see
:mod:`core.masking`). The sweep
evaluations are shared by the rows of one defense and norm; Square and transfer by the three
RDC gradient modes of one threat model (they take no gradient of the defense).

    python benchmarks/robustness_table.py --out-dir runs/robustness-table
    python benchmarks/robustness_table.py --dry-run          # the commands, and how far unfinished ones got
    python benchmarks/robustness_table.py --rows 'cnn-*,dc-linf-*' --n-row 'dc-linf-0.3=50' --no-checks
    python benchmarks/robustness_table.py --rows '*-linf-0.3' --follow-up   # survivors again, full budget
    python benchmarks/robustness_table.py --rows '*-linf-0.3' --follow-up 100/3/1000,100/9/5000  # in stages
    python benchmarks/robustness_table.py --readme          # README table from robustness.json
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rdc_studio.core.cli import whole_number
from rdc_studio.core.defense import parse_fraction
from rdc_studio.core.evaluate import (example_rows, format_indices, parse_indices, read_state_file, with_follow_up,
                                      worst_case_report)
from rdc_studio.core.masking import (CheckResult, all_passed, check_large_eps, check_monotone_eps, check_more_iterations,
                          check_whitebox_vs_blackbox)
from rdc_studio.core.models import (DEFAULT_MODEL, CheckpointError, atomic_write_bytes, atomic_write_json,
                                    defense_settings_sha256, file_sha256, read_card, resolve_model_path)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "robustness.json"
DEFAULT_THREATS = "linf:0.1,linf:0.3,l2:1.5"
DEFENSES = {  # key: (--defense, --grad, label)
    "cnn": ("cnn", None, "CNN"),
    "dc": ("dc", None, "DC"),
    "rdc-exact": ("rdc", "exact", "RDC (exact gradients)"),
    "rdc-smooth": ("rdc", "smooth", "RDC (smooth gradients)"),
    "rdc-bpda": ("rdc", "bpda", "RDC (BPDA)"),
    "binary-dc": ("dc", None, "DC on binarised input"),
}
# rows of an optional defense (never the default, never "not measured yet"): the DC behind
# input binarisation at this threshold (`rdc eval --binarize`), attacked with the
# straight-through gradient and, gradient-free, Square; selected only by a --rows pattern that
# begins with its key (e.g. 'binary-dc-linf-0.3'), so '*' leaves them out
BINARIZE = {"binary-dc": 0.5}
RDC_GRAD_MODES = ("exact", "smooth", "bpda")  # the RDC row: the worst case over these
# --budget: the full ensemble, and the reduced one that fits the DC and RDC rows into CPU hours
# or a GPU lease of minutes (it is recorded in every row and shown in the README table)
BUDGETS = {"full": {"steps": 100, "targets": 9, "square_queries": 5000, "check_square_queries": 1000},
           "reduced": {"steps": 20, "targets": 1, "square_queries": 100, "check_square_queries": 200}}
RESULT_DEFENSES = {"cnn": "CNN", "dc": "DC", "rdc": "RDC (worst case over exact, smooth, BPDA)",
                   "binary-dc": "DC on binarised input (threshold 0.5; optional, not the default)"}
NORM_LABELS = {"linf": "l-inf", "l2": "l2"}
ENSEMBLE_ORDER = ("apgd-ce", "apgd-dlr", "apgd-t", "square", "transfer")
ENSEMBLE_HEADERS = ("APGD-CE", "+APGD-DLR", "+APGD-T", "+Square", "+transfer")
README_START = "<!-- robustness-table:start -->"
README_END = "<!-- robustness-table:end -->"


@dataclass(frozen=True)
class Row:
    """One evaluation row of the table: a defense (and gradient mode) under one threat model."""

    defense_key: str  # a key of DEFENSES
    norm: str
    eps: str  # as given on the command line ("0.3", "8/255")
    n: int

    @property
    def key(self) -> str:
        return f"{self.defense_key}-{self.norm}-{_slug(self.eps)}"

    @property
    def defense(self) -> str:
        return DEFENSES[self.defense_key][0]

    @property
    def grad(self) -> str | None:
        return DEFENSES[self.defense_key][1]

    @property
    def label(self) -> str:
        return DEFENSES[self.defense_key][2]

    @property
    def binarize(self) -> float | None:
        """The input binarisation threshold of an optional binarised defense, else None."""
        return BINARIZE.get(self.defense_key)

    @property
    def result_defense(self) -> str:
        """The ``defense`` of its robustness.json row: ``cnn``, ``dc``, ``rdc`` or an optional one."""
        return self.defense_key if self.binarize is not None else self.defense


@dataclass(frozen=True)
class FollowUpBudget:
    """The budget of one follow-up stage: the ensemble's, Square's alone (``steps`` 0),
    APGD-CE's alone (``attack`` "apgd-ce", ``steps`` iterations: a longer run of the strongest
    single attack, the convergence check at a row's final budget) or the threshold-flip
    attack's (``attack`` "flip", ``steps`` iterations; binarised rows only)."""

    steps: int
    targets: int
    square_queries: int
    attack: str = ""  # the ``rdc eval --attack`` of the stage; "" picks ensemble or square (see below)
    restarts: int = 1  # flip or APGD-CE alone: starts (``flip/STEPSxSTARTS``, ``apgd-ce/STEPSxSTARTS``)

    def __post_init__(self) -> None:
        if not self.attack:
            object.__setattr__(self, "attack", "ensemble" if self.steps else "square")

    @property
    def tag(self) -> str:
        """The budget in a file stem, e.g. ``s100t9q5000`` (``square-q1000`` for Square alone,
        ``apgd-ce-s200`` for APGD-CE alone, ``flip-s50`` for the flip attack)."""
        if self.attack in ("flip", "apgd-ce"):
            return f"{self.attack}-s{self.steps}" + (f"r{self.restarts}" if self.restarts > 1 else "")
        return f"s{self.steps}t{self.targets}q{self.square_queries}" if self.steps else f"square-q{self.square_queries}"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"steps": self.steps, "targets": self.targets, "square_queries": self.square_queries}
        if self.attack in ("flip", "apgd-ce"):
            d["attack"] = self.attack
        if self.restarts > 1:
            d["restarts"] = self.restarts
        return d


def parse_follow_up(text: str) -> list[FollowUpBudget]:
    """``--follow-up`` stages, comma-separated ``STEPS/TARGETS/QUERIES`` (the ensemble),
    ``square/QUERIES`` (Square alone), ``apgd-ce/STEPS`` (APGD-CE alone; ``apgd-ce/STEPSxSTARTS``
    with random restarts) or ``flip/STEPS`` (the threshold-flip attack, for rows of a binarised
    defense; ``flip/STEPSxSTARTS`` with random-flip restarts), e.g.
    ``100/3/1000,100/9/5000,apgd-ce/200`` or ``square/1000,flip/50x4``."""
    stages = []
    for part in _split_list(text):
        fields = part.split("/")
        if len(fields) == 2 and fields[0] == "square" and fields[1].isdigit() and int(fields[1]) > 0:
            stages.append(FollowUpBudget(0, 0, int(fields[1])))
            continue
        single = re.fullmatch(r"(flip|apgd-ce)/([0-9]+)(?:x([0-9]+))?", part)
        if single and int(single[2]) > 0 and int(single[3] or 1) > 0:
            stages.append(FollowUpBudget(int(single[2]), 0, 0, single[1], int(single[3] or 1)))
            continue
        if len(fields) != 3 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise ValueError(f"a follow-up stage is STEPS/TARGETS/QUERIES with three positive whole numbers, "
                             f"square/QUERIES, apgd-ce/STEPS[xSTARTS] or flip/STEPS[xSTARTS], not {part!r}")
        stages.append(FollowUpBudget(*map(int, fields)))
    if not stages:
        raise ValueError("--follow-up needs at least one STEPS/TARGETS/QUERIES stage")
    return stages


def check_follow_up_stages(rows: list[Row], stages: list[FollowUpBudget]) -> None:
    """Refuse a flip stage when a selected row's defense does not binarise its input.

    Raises
    ------
    SystemExit
        Naming the rows the flip attack cannot attack.
    """
    plain = [row.key for row in rows if row.binarize is None]
    if plain and any(stage.attack == "flip" for stage in stages):
        raise SystemExit(f"robustness_table: a flip/STEPS follow-up attacks a binarised defense only (binary-dc-*), "
                         f"not {', '.join(plain)}")


@dataclass(frozen=True)
class Evaluation:
    """One ``rdc eval`` run: its file stem in the out dir and its arguments (without ``rdc``)."""

    name: str
    argv: tuple[str, ...]

    @property
    def command(self) -> str:
        """The command line exactly as ``rdc eval`` records it in its report."""
        return "rdc " + " ".join(shlex.quote(a) for a in self.argv)


# per evaluation row key, its finished follow-up stages in order: (evaluation, report)
FollowUps = dict[str, list[tuple[Evaluation, dict[str, Any]]]]


def _slug(eps: str) -> str:
    return eps.replace("/", "over")


def canonical_eps(text: str) -> str:
    """One spelling per radius, so that ``.3``, ``0.30`` and ``0.3`` name the same files and
    reuse the same evaluations: a decimal in its shortest exact form (a whole number without
    ``.0``), a fraction of whole numbers without padding (``8/255``). ``ValueError`` when
    ``text`` is not a number ``rdc eval --eps`` takes."""
    value = parse_fraction(text)
    numerator, sep, denominator = text.partition("/")
    if sep:
        try:
            return f"{int(numerator)}/{int(denominator)}"
        except ValueError:  # e.g. 0.5/255: kept as written (the value decides what is computed)
            return text.strip()
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def eps_radius(text: str) -> str:
    """argparse type of one radius: positive, in its canonical spelling (:func:`canonical_eps`)."""
    try:
        eps = canonical_eps(text)
    except ValueError:
        eps = None
    if eps is None or not parse_fraction(eps) > 0:
        raise argparse.ArgumentTypeError(f"{text.strip()!r} is not a positive radius (0.3 or 8/255)")
    return eps


def eps_list(text: str) -> str:
    """argparse type of an eps sweep: comma-separated radii (:func:`eps_radius`)."""
    radii = [eps_radius(part) for part in _split_list(text)]
    if not radii:
        raise argparse.ArgumentTypeError("no radius given")
    return ",".join(radii)


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_threats(text: str) -> list[tuple[str, str]]:
    """The threat models of ``--threats``: ``NORM:EPS`` pairs, comma-separated.

    Parameters
    ----------
    text
        E.g. ``"linf:0.1,linf:0.3,l2:1.5"``; eps as ``rdc eval --eps`` takes it (``8/255``).

    Returns
    -------
    list of (norm, eps) pairs
        In the given order, eps in its canonical spelling (:func:`canonical_eps`).

    Raises
    ------
    SystemExit
        For an unknown norm, an eps that is not a positive number, a repeated threat
        model, or none at all.
    """
    threats: list[tuple[str, str]] = []
    for part in _split_list(text):
        norm, sep, eps = part.partition(":")
        norm, eps = norm.strip(), eps.strip()
        if not sep or norm not in NORM_LABELS:
            raise SystemExit(f"robustness_table: --threats: {part!r} is not NORM:EPS with NORM one of "
                             f"{', '.join(NORM_LABELS)}")
        try:
            eps = eps_radius(eps)
        except argparse.ArgumentTypeError:
            raise SystemExit(f"robustness_table: --threats: {part!r}: eps must be a positive number") from None
        if any(n == norm and parse_fraction(e) == parse_fraction(eps) for n, e in threats):  # 16/510 = 8/255
            raise SystemExit(f"robustness_table: --threats: {part!r} is given twice")
        threats.append((norm, eps))
    if not threats:
        raise SystemExit("robustness_table: --threats names no threat model")
    return threats


def parse_row_n(text: str) -> list[tuple[str, int]]:
    """The per-row sample sizes of ``--n-row``: ``PATTERN=N`` pairs, comma-separated.

    Parameters
    ----------
    text
        E.g. ``"rdc-*-linf-0.3=50,dc-l2-1.5=300"``; each shell pattern is matched against
        row keys, and a later pair wins over an earlier one.

    Returns
    -------
    list of (pattern, n) pairs

    Raises
    ------
    SystemExit
        For a pair without ``=`` or with an n that is not a positive integer.
    """
    pairs = []
    for part in _split_list(text):
        pattern, sep, n = part.rpartition("=")
        if not sep or not pattern.strip() or not n.strip().isdigit() or int(n) < 1:
            raise SystemExit(f"robustness_table: --n-row: {part!r} is not PATTERN=N with N a positive integer")
        pairs.append((pattern.strip(), int(n)))
    return pairs


def build_rows(args: argparse.Namespace) -> list[Row]:
    """The evaluation rows selected by ``--rows`` (shell patterns over keys such as
    ``rdc-exact-linf-0.3``): every defense under every threat model of ``--threats``, with n
    from ``--n-cnn``/``--n-dc``/``--n-rdc`` unless ``--n-row`` sets it for the row."""
    default_n = {"cnn": args.n_cnn, "dc": args.n_dc, "rdc-exact": args.n_rdc, "rdc-smooth": args.n_rdc,
                 "rdc-bpda": args.n_rdc, "binary-dc": args.n_dc}
    rows = [Row(d, norm, eps, default_n[d]) for d in DEFENSES for norm, eps in parse_threats(args.threats)]
    for pattern, n in parse_row_n(args.n_row):
        if not any(fnmatch.fnmatchcase(r.key, pattern) for r in rows):
            raise SystemExit(f"robustness_table: --n-row {pattern!r} matches none of {', '.join(r.key for r in rows)}")
        rows = [Row(r.defense_key, r.norm, r.eps, n) if fnmatch.fnmatchcase(r.key, pattern) else r for r in rows]
    return select_rows(rows, args.rows, "--rows", optional_by_name=True)


def row_matches(row: Row, pattern: str, optional_by_name: bool = False) -> bool:
    """Whether shell ``pattern`` selects ``row``; with ``optional_by_name``, a row of an optional
    defense (:data:`BINARIZE`) only by a pattern that begins with its defense key."""
    return fnmatch.fnmatchcase(row.key, pattern) and (not optional_by_name or row.binarize is None
                                                      or pattern.startswith(row.defense_key))


def select_rows(rows: list[Row], patterns: str, flag: str, optional_by_name: bool = False) -> list[Row]:
    """The rows whose key matches one of the comma-separated shell ``patterns`` (:func:`row_matches`)."""
    selected = [r for r in rows if any(row_matches(r, p, optional_by_name) for p in _split_list(patterns))]
    if not selected:
        raise SystemExit(f"robustness_table: {flag} {patterns!r} matches none of {', '.join(r.key for r in rows)}")
    return selected


def eval_argv(args: argparse.Namespace, row: Row, attack: str, eps: str, n: int, steps: int, stem: str,
              square_queries: int | None = None, targets: int | None = None,
              indices: str | None = None, restarts: int = 1) -> tuple[str, ...]:
    """The ``rdc eval`` arguments of one evaluation of ``row``'s defense (outputs under --out-dir):
    the first ``n`` test images, or ``indices`` (an ``rdc eval --indices`` list) when given;
    ``targets`` defaults to ``--targets``; ``restarts`` above 1 adds ``--restarts``."""
    out = Path(args.out_dir) / stem
    picked = ["--indices", indices] if indices is not None else ["--n", str(n)]
    argv = ["eval", "--dataset", "mnist", "--split", "test", *picked, "--defense", row.defense]
    if row.defense != "cnn":
        argv += ["--model", args.model]
        if args.levels:
            argv += ["--levels", str(args.levels)]
    if row.grad:
        argv += ["--grad", row.grad]
    if row.binarize is not None:
        argv += ["--binarize", f"{row.binarize:g}"]
    argv += ["--attack", attack, "--norm", row.norm, "--eps", eps]
    if attack != "square":
        argv += ["--steps", str(steps)]
    if restarts > 1:
        argv += ["--restarts", str(restarts)]
    if attack in ("ensemble", "square"):
        argv += ["--square-queries", str(square_queries)]
    if attack == "ensemble":
        argv += ["--targets", str(args.targets if targets is None else targets)]
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


def model_sha256(name_or_path: str) -> str:
    """The sha256 of the safetensors file of a bundled model name or checkpoint path (as
    ``rdc eval`` resolves ``--model`` and ``--cnn``).

    Raises
    ------
    SystemExit
        When there is no such model.
    """
    try:
        return file_sha256(resolve_model_path(name_or_path))
    except CheckpointError as exc:
        raise SystemExit(f"robustness_table: {exc}") from exc


def settings_sha256(name_or_path: str, levels: int | None = None) -> str:
    """:func:`core.models.defense_settings_sha256` of the card of a bundled model name or
    checkpoint path (the DC and RDC that ``rdc eval --model`` builds from it; with ``levels``,
    ``--levels``: the card's classifier with that many noise levels, so that such rows never
    share file names or a robustness.json row with the card's own settings).

    Raises
    ------
    SystemExit
        When there is no such model or its card is invalid.
    """
    try:
        card = read_card(name_or_path)
        if levels is not None:
            card = card | {"classifier": dict(card.get("classifier") or {}, steps=levels)}
        return defense_settings_sha256(card)
    except CheckpointError as exc:
        raise SystemExit(f"robustness_table: {exc}") from exc


def add_model_digests(args: argparse.Namespace) -> argparse.Namespace:
    """Set ``args.model_sha256`` and ``args.cnn_sha256`` (the files ``--model`` and ``--cnn`` name
    now) and ``args.settings_sha256`` (the defense settings of ``--model``'s card now)."""
    args.model_sha256 = model_sha256(args.model)
    args.cnn_sha256 = model_sha256(args.cnn)
    args.settings_sha256 = settings_sha256(args.model, getattr(args, "levels", None))
    return args


def model_tag(args: argparse.Namespace, row: Row, attack: str) -> str:
    """The end of an evaluation's file stem that names the model files it uses: ``-m`` and 8 hex
    digits of the diffusion model's sha256 and ``-s`` and 8 of its card's defense settings (all
    but CNN rows), ``-c`` and the CNN's (CNN rows, and the ensemble and transfer attacks, which
    craft examples on the CNN). A re-chosen grid or purification thus never resumes or grows
    the per-example state of another."""
    parts = []
    if row.defense != "cnn":
        parts += ["m" + args.model_sha256[:8], "s" + args.settings_sha256[:8]]
    if attack in ("ensemble", "transfer") or row.defense == "cnn":
        parts.append("c" + args.cnn_sha256[:8])
    return "-" + "-".join(parts)


def row_evaluation(args: argparse.Namespace, row: Row) -> Evaluation:
    """The ensemble evaluation of ``row``."""
    stem = f"{row.key}-n{row.n}{model_tag(args, row, 'ensemble')}"
    return Evaluation(stem, eval_argv(args, row, "ensemble", row.eps, row.n, args.steps, stem, args.square_queries))


def survivors(report: dict[str, Any]) -> list[int]:
    """The examples an attack report (or :func:`core.evaluate.worst_case_report`) left robust."""
    return [r.index for r in example_rows(report) if r.robust_correct]


def row_survivors(parts: list[tuple[Row, Evaluation, dict[str, Any]]]) -> list[int]:
    """The survivors of a result row made of ``parts``: one row's, or for the RDC's gradient
    modes the examples that survived all of them."""
    if len(parts) == 1:
        return survivors(parts[0][2])
    return survivors(worst_case_report([rep for _, _, rep in parts], labels=[r.grad for r, _, _ in parts]))


def follow_up_evaluation(args: argparse.Namespace, row: Row, indices: list[int],
                         budget: FollowUpBudget) -> Evaluation:
    """A follow-up of ``row``: the ensemble (or Square alone, or the flip attack) with ``budget``
    on ``indices`` (the row's survivors). Its name holds the budget and a digest of the indices,
    so other survivors never resume its state (but a superset grows from it,
    :func:`grow_from_smaller_run`)."""
    spelled = format_indices(indices)
    digest = hashlib.sha256(spelled.encode()).hexdigest()[:6]
    stem = f"{row.key}-n{row.n}-followup-{budget.tag}-i{digest}{model_tag(args, row, budget.attack)}"
    return Evaluation(stem, eval_argv(args, row, budget.attack, row.eps, row.n, budget.steps, stem,
                                      budget.square_queries, targets=budget.targets, indices=spelled,
                                      restarts=budget.restarts))


def result_parts(done: list[tuple[Row, Evaluation, dict[str, Any]]]
                 ) -> list[list[tuple[Row, Evaluation, dict[str, Any]]]]:
    """The evaluation rows of each robustness.json row ``done`` makes: a CNN or DC row alone, the
    three gradient modes of an RDC threat model together (:func:`rdc_threat_parts`)."""
    return [[part] for part in done if part[0].defense != "rdc"] + rdc_threat_parts(done)


def finished_stages(parts: list[tuple[Row, Evaluation, dict[str, Any]]], follow_ups: FollowUps) -> int:
    """How many follow-up stages every evaluation row of ``parts`` has finished (a mode's
    follow-up alone is not the RDC row's)."""
    return min(len(follow_ups.get(row.key, [])) for row, _, _ in parts)


def after_follow_ups(parts: list[tuple[Row, Evaluation, dict[str, Any]]], follow_ups: FollowUps,
                     stages: int) -> list[tuple[Row, Evaluation, dict[str, Any]]]:
    """``parts`` with each report merged with its first ``stages`` follow-ups
    (:func:`core.evaluate.with_follow_up`: an example stays robust only if every one left it robust)."""
    merged = []
    for row, ev, report in parts:
        for _, follow_up in follow_ups.get(row.key, [])[:stages]:
            report = with_follow_up(report, follow_up)
        merged.append((row, ev, report))
    return merged


def follow_up_evaluations(args: argparse.Namespace, done: list[tuple[Row, Evaluation, dict[str, Any]]],
                          follow_ups: FollowUps | None = None, stage: int = 0) -> list[tuple[Row, Evaluation]]:
    """The evaluations of follow-up ``stage`` (0: the first of ``args.follow_up``) for the
    finished rows ``done`` whose earlier stages all finished (``follow_ups``) and left survivors:
    a CNN or DC row's own survivors; for the RDC, the examples that survived all three gradient
    modes of the threat model, each mode attacking them with its own gradients, except that a
    Square-alone stage (which takes no gradient) runs once, under the first mode's name, and
    serves all three."""
    follow_ups = follow_ups or {}
    out = []
    for parts in result_parts(done):
        if finished_stages(parts, follow_ups) != stage:
            continue
        common = row_survivors(after_follow_ups(parts, follow_ups, stage))
        if not common:
            continue
        budget = args.follow_up[stage]
        if budget.attack == "square":  # gradient-free: one run serves every gradient mode of the RDC
            shared = follow_up_evaluation(args, parts[0][0], common, budget)
            out += [(row, shared) for row, _, _ in parts]
        else:
            out += [(row, follow_up_evaluation(args, row, common, budget)) for row, _, _ in parts]
    return out


def rdc_threat_parts(done: list[tuple[Row, Evaluation, dict[str, Any]]]
                     ) -> list[list[tuple[Row, Evaluation, dict[str, Any]]]]:
    """Per RDC threat model of ``done`` whose three gradient modes all finished: the (row,
    evaluation, report) of each mode, in :data:`RDC_GRAD_MODES` order."""
    threats: list[tuple[str, float]] = []
    for row, _, _ in done:
        if row.defense == "rdc" and (row.norm, parse_fraction(row.eps)) not in threats:
            threats.append((row.norm, parse_fraction(row.eps)))
    out = []
    for norm, eps in threats:
        by_mode = {row.grad: (row, ev, rep) for row, ev, rep in done
                   if row.defense == "rdc" and row.norm == norm and parse_fraction(row.eps) == eps}
        if set(by_mode) >= set(RDC_GRAD_MODES):
            out.append([by_mode[mode] for mode in RDC_GRAD_MODES])
    return out


def check_evaluations(args: argparse.Namespace, row: Row) -> dict[str, Evaluation]:
    """The evaluations behind the gradient-masking checks of ``row`` (APGD-CE unless named).

    Keys: ``apgd@EPS`` for the eps sweep (which includes the row's eps and the large eps),
    ``apgd-long`` (twice the steps at the row's eps), ``square`` and ``transfer``. Square and
    the transfer attack never take the defense's gradients, and the RDC's gradient modes change
    only its backward pass, so the three RDC rows of a threat model share one Square and one
    transfer evaluation (run, and named, with ``--grad exact``).
    """
    m, steps = args.check_n, args.check_steps or args.steps
    sweep = _split_list(args.sweep_linf if row.norm == "linf" else args.sweep_l2)
    large = args.large_eps_linf if row.norm == "linf" else args.large_eps_l2
    values = {parse_fraction(e) for e in sweep}
    for extra in (row.eps, large):
        if parse_fraction(extra) not in values:
            sweep.append(extra)
            values.add(parse_fraction(extra))
    base = f"check-{row.defense_key}-{row.norm}"  # the sweep is shared by the rows of one norm
    evs = {}
    for eps in sorted(sweep, key=parse_fraction):
        stem = f"{base}-apgd-ce-eps{_slug(eps)}-s{steps}-n{m}{model_tag(args, row, 'apgd-ce')}"
        evs[f"apgd@{eps}"] = Evaluation(stem, eval_argv(args, row, "apgd-ce", eps, m, steps, stem))
    stem = f"{base}-apgd-ce-eps{_slug(row.eps)}-s{2 * steps}-n{m}{model_tag(args, row, 'apgd-ce')}"
    evs["apgd-long"] = Evaluation(stem, eval_argv(args, row, "apgd-ce", row.eps, m, 2 * steps, stem))
    gradient_free = replace(row, defense_key="rdc-exact") if row.defense == "rdc" else row
    shared = f"check-{gradient_free.defense_key}-{row.norm}"
    q = args.check_square_queries
    stem = f"{shared}-square-eps{_slug(row.eps)}-q{q}-n{m}{model_tag(args, row, 'square')}"
    evs["square"] = Evaluation(stem, eval_argv(args, gradient_free, "square", row.eps, m, steps, stem,
                                               square_queries=q))
    stem = f"{shared}-transfer-eps{_slug(row.eps)}-s{steps}-n{m}{model_tag(args, row, 'transfer')}"
    evs["transfer"] = Evaluation(stem, eval_argv(args, gradient_free, "transfer", row.eps, m, steps, stem))
    return evs


def _done_in_state(path: Path) -> int:
    """Examples already recorded in a resumable state file (0 when there is none)."""
    return len(read_state_file(path).results)


def state_progress(ev: Evaluation, out_dir: Path) -> str | None:
    """How far an unfinished evaluation has got, from its state file (and those of its shards
    under ``torchrun``): examples done of all, how many of them an attack broke so far, and
    the time the rest would take at the seconds per example recorded so far; None when it
    has no state yet."""
    base = out_dir / f"{ev.name}.state.jsonl"
    paths = [base] + sorted(out_dir.glob(f"{ev.name}.state.jsonl.rank*-of-*"))
    total, records = None, {}
    for path in paths:
        state = read_state_file(path)
        total = total or (state.settings or {}).get("n")
        records.update(state.results)
    if not records and not base.exists():
        return None
    broken = sum(1 for r in records.values() if r.clean_correct and not r.robust_correct)
    wrong = sum(1 for r in records.values() if not r.clean_correct)
    text = f"{len(records)} of {total if total is not None else '?'} examples done, {broken} broken by the attack"
    text += f", {wrong} misclassified clean" if wrong else ""
    timed = [r.seconds for r in records.values() if r.seconds is not None]
    left = (total - len(records)) if total is not None else 0
    if timed and left > 0:
        per_example = sum(timed) / len(timed)
        text += f"; the other {left} need about {_duration(per_example * left)} at the {per_example:.0f} s per example so far"
    return text


def _duration(seconds: float) -> str:
    """``seconds`` for a reader: minutes below two hours, else hours."""
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


_STEM_N = re.compile(r"^(?P<pre>.*-n)(?P<n>[0-9]+)(?P<post>(-[msc][0-9a-f]{8})+)$")


_FOLLOW_UP_STEM = re.compile(r"^(?P<pre>.*-n)[0-9]+(?P<mid>-followup-.+-i)[0-9a-f]{6}(?P<post>(-[msc][0-9a-f]{8})+)$")


def _smaller_sources(ev: Evaluation, out_dir: Path) -> list[tuple[int, str]]:
    """(examples, file stem) of the states in ``out_dir`` that ``ev`` can grow from: the same
    evaluation over fewer first examples or, for a follow-up, over a proper subset of its
    indices (the survivors of the same row before it grew)."""
    if (m := _STEM_N.match(ev.name)) is not None:
        n, found = int(m["n"]), []
        for path in out_dir.glob(f"{m['pre']}*{m['post']}.state.jsonl"):
            other = _STEM_N.match(path.name.removesuffix(".state.jsonl"))
            if other and other["pre"] == m["pre"] and other["post"] == m["post"] and int(other["n"]) < n:
                found.append((int(other["n"]), other.string))
        return found
    if (m := _FOLLOW_UP_STEM.match(ev.name)) is None:
        return []
    wanted = set(parse_indices(dict(zip(ev.argv, ev.argv[1:]))["--indices"]))
    found = []
    for path in out_dir.glob(f"{m['pre']}*{m['mid']}*{m['post']}.state.jsonl"):
        other = _FOLLOW_UP_STEM.match(path.name.removesuffix(".state.jsonl"))
        if other is None or (other["pre"], other["mid"], other["post"]) != (m["pre"], m["mid"], m["post"]):
            continue
        try:
            held = set(parse_indices((read_state_file(path).settings or {}).get("indices") or ""))
        except ValueError:
            continue
        if held < wanted:
            found.append((len(held), other.string))
    return found


def grow_from_smaller_run(ev: Evaluation, out_dir: Path) -> str | None:
    """Start ``ev`` from the state of the same evaluation over fewer examples
    (:func:`_smaller_sources`; the largest), if ``out_dir`` holds one and ``ev`` has no state
    yet: the state (and its timing) is copied to ``ev``'s name, and ``rdc eval`` attacks only
    the examples it lacks (it checks that every other setting is equal). Returns the name grown
    from, or None."""
    import shutil

    if (out_dir / f"{ev.name}.state.jsonl").exists():
        return None
    smaller = _smaller_sources(ev, out_dir)
    if not smaller:
        return None
    source = max(smaller)[1]
    shutil.copyfile(out_dir / f"{source}.state.jsonl", out_dir / f"{ev.name}.state.jsonl")
    timing_path = out_dir / f"{source}.timing.json"
    if timing_path.exists():
        timing = json.loads(timing_path.read_text())
        atomic_write_json(out_dir / f"{ev.name}.timing.json", timing | {"command": ev.command})
    print(f"{ev.name}: grows the state of {source}", file=sys.stderr, flush=True)
    return source


def same_results(command: str | None, other: str | None) -> bool:
    """Whether two ``rdc eval`` command lines compute the same results: equal once their
    ``--threads``, ``--batch-size`` and ``--device`` and their output paths (``--out``, ``--log``
    or ``--log-file``, ``--state``) are dropped, and ``--num-examples`` is read as ``--n`` (their
    spellings under ``torchrun``, which shards the examples of one identical report). The first
    three set how the work is scheduled, not what is computed
    (every example's attack is seeded by its index alone), and the paths only say where it was
    written, so a finished report made on a GPU in batches of 50, in another folder, is read in
    place of its CPU twin (it is looked up by its evaluation's name); the report keeps the command
    that made it. A resumable state still refuses another batch size or device."""
    ignored = ("--threads", "--batch-size", "--device", "--out", "--log", "--log-file", "--state")
    spelled = {"--num-examples": "--n"}  # the spelling of --n under torchrun

    def identity(line: str) -> list[str]:
        words = [spelled.get(w, w) for w in shlex.split(line)]
        return [w for i, w in enumerate(words) if w not in ignored and (i == 0 or words[i - 1] not in ignored)]

    return command is not None and other is not None and identity(command) == identity(other)


def made_by(ev: Evaluation, report: dict[str, Any]) -> str:
    """The command line that made ``report`` (``ev``'s own unless it came from an earlier run
    with other scheduling options, e.g. ``--threads`` or ``--device``)."""
    return report.get("settings", {}).get("command") or ev.command


def _existing_report(ev: Evaluation, out_dir: Path) -> dict[str, Any] | None:
    """The report of ``ev`` in ``out_dir`` if one was made by ``ev``'s command (up to scheduling
    options, see :func:`same_results`)."""
    path = out_dir / f"{ev.name}.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return report if same_results(report.get("settings", {}).get("command"), ev.command) else None


def _load_timing(ev: Evaluation, out_dir: Path) -> dict[str, Any]:
    path = out_dir / f"{ev.name}.timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    return timing if same_results(timing.get("command"), ev.command) else {"command": ev.command, "seconds": 0.0,
                                                                           "examples": 0}


def _drop_stale_timing(ev: Evaluation, out_dir: Path, done_before: int) -> None:
    """Remove ``ev``'s timing file when it counts more examples than its state holds before a run:
    it belongs to a state that is gone (e.g. one grown from a smaller run, refused, then deleted),
    and would mix that state's seconds into the new one's."""
    path = out_dir / f"{ev.name}.timing.json"
    if not path.exists():
        return
    shards = sum(_done_in_state(p) for p in out_dir.glob(f"{ev.name}.state.jsonl.rank*-of-*"))  # torchrun's
    if _load_timing(ev, out_dir)["examples"] > done_before + shards:
        path.unlink()
        print(f"{ev.name}: its timing file counted examples its state no longer holds; it starts again",
              file=sys.stderr, flush=True)


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
    else:  # the report was made outside this script; its examples carry their own times since
        # resumable states keep them, older reports time their last run only
        every = report.get("timing", {}).get("examples_timed") == report["n"]
        report["table_timing"] = {"seconds_per_image": report["seconds_per_image"], "examples_timed": report["n"],
                                  "source": "the report (every example's own time)" if every
                                  else "the report (its last run only)"}
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

    proc = subprocess.Popen([sys.executable, "-m", "rdc_studio.core", *ev.argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    tail = ""
    try:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            text = chunk.decode(errors="replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-2000:]
    except BaseException:  # interrupted or terminated: the evaluation saves its state and stops too
        proc.terminate()
        raise
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
        grow_from_smaller_run(ev, out_dir)
        before = _done_in_state(out_dir / f"{ev.name}.state.jsonl")
        _drop_stale_timing(ev, out_dir, before)
        rc, last = _rdc_eval(ev)
        if rc != 0:
            raise SystemExit(f"robustness_table: {ev.name}: rdc eval exited with {rc}: {last}"
                             f"{_failure_hint(ev, out_dir, last)}")
        report = json.loads((out_dir / f"{ev.name}.json").read_text())
        _add_timing(ev, out_dir, report, before)
    _warn_older_attack_revision(ev, out_dir, report)
    return _with_timing(ev, out_dir, report)


def _warn_older_attack_revision(ev: Evaluation, out_dir: Path, report: dict[str, Any]) -> None:
    """Say so when an attack report (reused, or resumed from a state) was made, wholly or in
    part, by an older revision of the attacks than this code's: its row then claims that
    revision, and only a run into a fresh ``--out-dir`` measures it with the current attacks."""
    from rdc_studio.core.attacks import ATTACK_REVISION

    if report.get("robust_acc") is None:  # a clean evaluation: no attack
        return
    revision = report.get("attack_revision", 1)  # reports before revision 2 did not record it
    if revision < ATTACK_REVISION:
        mixed = report.get("examples_per_attack_revision")
        part = f" ({', '.join(f'revision {k}: {v}' for k, v in mixed.items())} examples)" if mixed else ""
        print(f"robustness_table: {ev.name}: the report in {out_dir} was made by attack revision {revision}{part}; "
              f"the attacks are now revision {ATTACK_REVISION}. Its row claims revision {revision}; to measure "
              f"it with the current attacks, run again into a fresh --out-dir (e.g. "
              f"benchmarks/results/robustness-runs-r{ATTACK_REVISION})", file=sys.stderr)


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
                grow_from_smaller_run(ev, out_dir)
                before = _done_in_state(out_dir / f"{ev.name}.state.jsonl")
                _drop_stale_timing(ev, out_dir, before)
                log = open(out_dir / f"{ev.name}.out", "ab")
                proc = subprocess.Popen([sys.executable, "-m", "rdc_studio.core", *ev.argv], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=ROOT)
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
            "hardware": report["hardware"], "command": made_by(ev, report), "report": str(out_dir / f"{ev.name}.json"),
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
    return [(result, [made_by(evs[k], reports[k]) for k in keys]) for result, keys in judged]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def worst_cases(summaries: list[dict[str, Any]], reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per threat model with two or more RDC rows: the per-example worst case over their
    gradient modes (on the examples all of them attacked), as :func:`core.evaluate.worst_case_report`."""
    out = []
    threats: list[tuple[str, float]] = []
    for s in summaries:
        if s["defense_flag"] == "rdc" and (s["norm"], parse_fraction(s["eps"])) not in threats:
            threats.append((s["norm"], parse_fraction(s["eps"])))
    for norm, eps in threats:
        rows = [s for s in summaries
                if s["defense_flag"] == "rdc" and s["norm"] == norm and parse_fraction(s["eps"]) == eps]
        if len(rows) < 2:
            continue
        combined = worst_case_report([reports[s["key"]] for s in rows], labels=[s["defense"] for s in rows])
        combined.pop("per_example")
        out.append(combined | {"norm": norm, "eps": rows[0]["eps"], "rows": [s["key"] for s in rows]})
    return out


# --- robustness.json -------------------------------------------------------------------------

def report_hardware(report: dict[str, Any]) -> str:
    """One line on the machine of an ``rdc eval`` report: its ``hardware`` (CPU model, logical
    CPUs, torch version, threads, GPU; :func:`core.evaluate.hardware_description`) and the
    device the evaluation ran on. Reports whose examples record their machine
    (``examples_per_hardware``) name the devices already, and every machine of a resumed state."""
    if "examples_per_hardware" in report:
        return report["hardware"]
    device = report.get("settings", {}).get("device")
    return f"{report['hardware']}, device {device}" if device else report["hardware"]


def report_attacks(report: dict[str, Any]) -> list[str]:
    """The attacks of an ``rdc eval`` report, in the order they ran (an ensemble's order)."""
    ensemble = report["settings"].get("ensemble")
    return list(ensemble["order"]) if ensemble else [report["settings"]["attack"]]


def report_budget(report: dict[str, Any]) -> dict[str, Any]:
    """The attack budget of an ``rdc eval`` report: gradient steps, APGD-T target classes
    and Square queries (None where the attack did not run), and a single attack's restarts
    when it made more than one start."""
    if not report["settings"].get("ensemble"):  # one attack (e.g. a square/QUERIES follow-up): its own settings
        single = report["settings"].get("attack_settings") or {}
        if report["settings"].get("attack") == "square":
            budget = {"steps": None, "targets": None, "square_queries": single.get("steps")}
        else:
            budget = {"steps": single.get("steps"), "targets": None, "square_queries": None}
        if (single.get("restarts") or 1) > 1:  # e.g. a flip/STEPSxSTARTS stage
            budget["restarts"] = single["restarts"]
        return budget
    per_attack = report["settings"].get("attack_settings") or {}
    ensemble = report["settings"]["ensemble"]
    gradient = [a for name, a in per_attack.items() if name != "square"]
    return {"steps": gradient[0].get("steps") if gradient else None, "targets": ensemble.get("targets"),
            "square_queries": per_attack.get("square", {}).get("steps")}


def describe_attacks(row: dict[str, Any]) -> str:
    """A result row's attacks and budget for the README, e.g. ``ensemble (20 steps, 1 target, Square 100)``."""
    budget = row.get("budget") or {}
    parts = [f"{budget['steps']} steps"] if budget.get("steps") else []
    if budget.get("targets"):
        parts.append(f"{budget['targets']} target{'s' if budget['targets'] != 1 else ''}")
    if budget.get("square_queries"):
        parts.append(f"Square {budget['square_queries']}")
    if budget.get("restarts", 1) > 1:
        parts.append(f"{budget['restarts']} starts")
    name = "ensemble" if list(row["attacks"]) == list(ENSEMBLE_ORDER) else ", ".join(row["attacks"])
    text = f"{name} ({', '.join(parts)})" if parts else name
    if list(row["attacks"]) == ["square"] and budget.get("square_queries"):
        text = f"Square alone ({budget['square_queries']} queries)"
    if list(row["attacks"]) == ["flip"] and budget.get("steps"):
        starts = f", {budget['restarts']} starts" if budget.get("restarts", 1) > 1 else ""
        text = f"the threshold-flip attack ({budget['steps']} iterations{starts})"
    follow = row.get("follow_up")
    if follow is not None and not follow["n"]:
        return f"{text}; no survivors to follow up"
    while follow is not None:  # each stage attacked the survivors of the ones before it
        then = describe_attacks({"attacks": follow["attacks"], "budget": follow["budget"]})
        attacked = f"{follow['n']} survivor{'s' if follow['n'] != 1 else ''}"
        text += f"; then {then} on its {attacked}, which broke {follow['broke'] or 'none'}"
        follow = follow.get("then")
    return text


def masking_summary(checks: list[dict[str, Any]], row_keys: list[str], check_n: int) -> dict[str, Any] | None:
    """The ``masking_checks`` entry of a result row: the checks of the evaluation rows
    ``row_keys`` (None when none ran), whether all passed, and each one's verdict."""
    mine = [c for c in checks if c["row"] in row_keys]
    if not mine:
        return None
    return {"passed": all(c["check"]["passed"] for c in mine), "n": check_n,
            "checks": [{"row": c["row"], "check": c["check"]["name"], "verdict": c["check"]["verdict"],
                        "summary": c["check"]["summary"]} for c in mine]}


def single_result_row(row: Row, ev: Evaluation, report: dict[str, Any], model: str, sha256: str,
                      checks: list[dict[str, Any]], check_n: int, settings: str | None = None) -> dict[str, Any]:
    """The robustness.json row of a CNN or DC evaluation row.

    Parameters
    ----------
    row, ev, report
        The evaluation row, its ``rdc eval`` command and its report (with ``table_timing``,
        see :func:`run_evaluation`).
    model, sha256
        The checkpoint the defense used (the CNN's for the CNN row) and its file's sha256.
    checks, check_n
        The gradient-masking checks run so far (``main``'s list) and their n.
    settings
        The card's defense-settings digest (DC rows; None for the CNN row).
    """
    extra = {} if settings is None else {"settings_sha256": settings}
    grad = "straight-through" if row.binarize is not None else report["settings"].get("grad") or "exact"
    return {"key": f"{row.result_defense}-{row.norm}-{_slug(row.eps)}", "label": RESULT_DEFENSES[row.result_defense],
            "defense": row.result_defense, "norm": row.norm, "eps": parse_fraction(row.eps), "n": report["n"],
            "clean": report["clean_acc"], "robust": report["robust_acc"], "ci95": list(report["robust_ci95"]),
            "attacks": report_attacks(report), "budget": report_budget(report),
            "grad_modes": [grad], "model": model, "model_sha256": sha256, "command": made_by(ev, report),
            "hardware": report_hardware(report),
            "seconds_per_image": report["table_timing"]["seconds_per_image"], "date": time.strftime("%Y-%m-%d"),
            "attack_revision": report.get("attack_revision", 1),
            **extra, "masking_checks": masking_summary(checks, [row.key], check_n)}


def rdc_result_row(parts: list[tuple[Row, Evaluation, dict[str, Any]]], model: str, sha256: str,
                   checks: list[dict[str, Any]], check_n: int, settings: str) -> dict[str, Any]:
    """The robustness.json row of the RDC under one threat model: the per-example worst case
    over its gradient-mode evaluations (:func:`core.evaluate.worst_case_report`).

    Parameters
    ----------
    parts
        (row, evaluation, report) of each gradient mode (rdc-exact, rdc-smooth, rdc-bpda),
        one threat model.
    model, sha256, checks, check_n, settings
        As for :func:`single_result_row`.

    Returns
    -------
    dict
        ``n``, ``clean``, ``robust`` and ``ci95`` over the examples all parts attacked (an
        example is robust only if it is robust in every part); ``command`` is the list of
        the parts' commands, ``seconds_per_image`` their sum, ``per_grad_mode`` each part's
        robust accuracy on those examples.

    Raises
    ------
    ValueError
        When the parts are not of one model, data split and threat model.
    """
    row = parts[0][0]
    modes = [r.grad for r, _, _ in parts]
    worst = worst_case_report([rep for _, _, rep in parts], labels=modes)
    attacks: list[str] = []
    hardware: list[str] = []
    for _, _, rep in parts:
        attacks += [a for a in report_attacks(rep) if a not in attacks]
        hardware += [h for h in [report_hardware(rep)] if h not in hardware]
    return {"key": f"rdc-{row.norm}-{_slug(row.eps)}", "label": RESULT_DEFENSES["rdc"], "defense": "rdc",
            "norm": row.norm, "eps": parse_fraction(row.eps), "n": worst["n"], "clean": worst["clean_acc"],
            "robust": worst["robust_acc"], "ci95": list(worst["robust_ci95"]), "attacks": attacks,
            "budget": report_budget(parts[0][2]), "grad_modes": modes, "model": model, "model_sha256": sha256,
            "command": [made_by(ev, rep) for _, ev, rep in parts], "hardware": "; ".join(hardware),
            "seconds_per_image": sum(rep["table_timing"]["seconds_per_image"] for _, _, rep in parts),
            "date": time.strftime("%Y-%m-%d"), "settings_sha256": settings,
            "attack_revision": min(rep.get("attack_revision", 1) for _, _, rep in parts),
            "masking_checks": masking_summary(checks, [r.key for r, _, _ in parts], check_n),
            "per_grad_mode": {run["label"]: run["robust_acc_on_common"] for run in worst["runs"]}}


def result_rows(args: argparse.Namespace, done: list[tuple[Row, Evaluation, dict[str, Any]]],
                checks: list[dict[str, Any]], follow_ups: FollowUps | None = None) -> list[dict[str, Any]]:
    """The robustness.json rows of this run's finished evaluations: one per CNN and DC
    evaluation, and one RDC worst-case row per threat model whose three gradient modes
    (:data:`RDC_GRAD_MODES`) all finished. ``follow_ups`` maps row keys to their finished
    follow-up stages: a row's figures then count an example robust only if every stage that
    finished for all its evaluation rows left it robust too
    (:func:`core.evaluate.with_follow_up`), and the row gets a ``follow_up`` entry
    (:func:`follow_up_summary`). ``args`` needs ``model_sha256``, ``cnn_sha256`` and
    ``settings_sha256`` (:func:`add_model_digests`)."""
    follow_ups = follow_ups or {}
    out = []
    for parts in result_parts(done):
        merged = after_follow_ups(parts, follow_ups, finished_stages(parts, follow_ups))
        row, ev, report = merged[0]
        if row.defense == "cnn":
            result = single_result_row(row, ev, report, args.cnn, args.cnn_sha256, checks, args.check_n)
        elif row.defense == "dc":
            result = single_result_row(row, ev, report, args.model, args.model_sha256, checks, args.check_n,
                                       args.settings_sha256)
        else:
            result = rdc_result_row(merged, args.model, args.model_sha256, checks, args.check_n,
                                    args.settings_sha256)
        out.append(result | follow_up_summary(args, parts, follow_ups))
    return out


def follow_up_summary(args: argparse.Namespace, parts: list[tuple[Row, Evaluation, dict[str, Any]]],
                      follow_ups: FollowUps, stage: int = 0) -> dict[str, Any]:
    """``{"follow_up": ...}`` for a result row made of ``parts`` (one row, or the RDC's three
    gradient modes) when this run has ``--follow-up``, else ``{}``: the survivors follow-up
    ``stage`` attacked (``n``, ``indices``), its attacks and budget, how many of them it broke,
    its commands (a list for the RDC, one per gradient mode unless one run served all) and seconds
    per attacked image (summed over the runs),
    and under ``then`` the next stage's entry once it has finished. ``{}`` while the first stage
    has not finished: the row stands as measured."""
    if stage >= len(getattr(args, "follow_up", None) or []):
        return {}
    before = row_survivors(after_follow_ups(parts, follow_ups, stage))
    if not before:
        if stage:  # an earlier stage broke them all: nothing followed
            return {}
        return {"follow_up": {"n": 0, "indices": "", "budget": args.follow_up[0].as_dict(), "broke": 0,
                              "command": None}}
    if finished_stages(parts, follow_ups) <= stage:
        return {}
    runs = list({ev.name: (ev, rep) for ev, rep in (follow_ups[row.key][stage] for row, _, _ in parts)}.values())
    broken = set()
    for _, rep in runs:
        broken |= {r.index for r in example_rows(rep) if not r.robust_correct}  # misclassified unperturbed too
    commands = [made_by(ev, rep) for ev, rep in runs]
    entry = {"n": len(before), "indices": format_indices(before), "attacks": report_attacks(runs[0][1]),
             "budget": report_budget(runs[0][1]), "broke": len(broken & set(before)),
             "command": commands[0] if len(runs) == 1 else commands,
             "seconds_per_image": sum(rep["table_timing"]["seconds_per_image"] for _, rep in runs)}
    then = follow_up_summary(args, parts, follow_ups, stage + 1)
    if then:
        entry["then"] = then["follow_up"]
    return {"follow_up": entry}


def missing_rdc_rows(rows: list[Row], done: list[tuple[Row, Evaluation, dict[str, Any]]]) -> list[str]:
    """The RDC threat models of ``rows`` that get no robustness.json row (a gradient mode was
    not selected or did not finish), as ``"l-inf 0.3 (no bpda)"``."""
    missing = []
    finished = {r.key for r, _, _ in done}
    seen: list[tuple[str, float]] = []
    for row in rows:
        threat = (row.norm, parse_fraction(row.eps))
        if row.defense != "rdc" or threat in seen:
            continue
        seen.append(threat)
        lacking = [mode for mode in RDC_GRAD_MODES
                   if f"rdc-{mode}-{row.norm}-{_slug(row.eps)}" not in finished]
        if lacking:
            missing.append(f"{NORM_LABELS[row.norm]} {row.eps} (no {', '.join(lacking)})")
    return missing


# the fields of a robustness.json row that a follow-up on its survivors changes
FOLLOW_UP_FIGURES = ("robust", "ci95", "per_grad_mode", "follow_up")
_DEFENSE_ORDER = list(RESULT_DEFENSES)
_NORM_ORDER = list(NORM_LABELS)


def result_key(row: dict[str, Any]) -> tuple[str, str, float, str, str]:
    """What makes two robustness.json rows the same measurement: (defense, norm, eps,
    model_sha256, settings_sha256); a row without settings (CNN rows) has ``""``."""
    return (row["defense"], row["norm"], float(row["eps"]), row["model_sha256"], row.get("settings_sha256") or "")


def _result_order(row: dict[str, Any]) -> tuple:
    defense = _DEFENSE_ORDER.index(row["defense"]) if row["defense"] in _DEFENSE_ORDER else len(_DEFENSE_ORDER)
    norm = _NORM_ORDER.index(row["norm"]) if row["norm"] in _NORM_ORDER else len(_NORM_ORDER)
    return (row.get("model", ""), row["model_sha256"], defense, norm, float(row["eps"]))


def follow_up_stages(follow_up: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A robustness.json ``follow_up`` entry as its list of stages (each without ``then``)."""
    stages = []
    while follow_up is not None:
        stages.append({k: v for k, v in follow_up.items() if k != "then"})
        follow_up = follow_up.get("then")
    return stages


def extends_follow_up(old: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    """Whether the follow-up chain ``old`` has more stages than ``new`` and begins with it."""
    old_stages, new_stages = follow_up_stages(old), follow_up_stages(new)
    return len(old_stages) > len(new_stages) and old_stages[:len(new_stages)] == new_stages


def _budget_signs(budget: dict[str, Any] | None, than: dict[str, Any] | None) -> set[int]:
    """For each entry (steps, targets, queries) both budgets give: -1 where ``budget`` is
    below ``than``, 1 where above, 0 where equal."""
    budget, than = budget or {}, than or {}
    return {(budget[k] > than[k]) - (budget[k] < than[k]) for k in than
            if isinstance(than.get(k), (int, float)) and isinstance(budget.get(k), (int, float))}


def _smaller_sample(stored: dict[str, Any] | None, row: dict[str, Any]) -> bool:
    """Whether ``row`` is dominated by ``stored`` (a row of the same :func:`result_key`): no
    more examples and no stronger budget entry, and fewer examples or a weaker entry. Such a
    smaller or weaker measurement never replaces the stored one (more examples, or a stronger
    attack, does)."""
    if stored is None:
        return False
    signs = _budget_signs(row.get("budget"), stored.get("budget"))
    return row["n"] <= stored["n"] and 1 not in signs and (row["n"] < stored["n"] or -1 in signs)


def _follow_up_broke(row: dict[str, Any]) -> int:
    """How many examples the follow-up stages of a robustness.json row broke."""
    broke, stage = 0, row.get("follow_up")
    while stage is not None:
        broke += stage.get("broke") or 0
        stage = stage.get("then")
    return broke


def undoes_follow_up(stored: dict[str, Any] | None, row: dict[str, Any]) -> bool:
    """Whether ``row`` (the same :func:`result_key`, other commands: another folder, more
    examples) would raise ``stored``'s figure by dropping the follow-up that broke some of its
    examples. It does not replace the stored row: what an attack broke stays broken
    (docs/architecture.md, evaluation rule 3) until a follow-up of the new row says otherwise."""
    return (stored is not None and _follow_up_broke(stored) > 0 and stored["command"] != row["command"]
            and not row.get("follow_up") and row["robust"] > stored["robust"])


def smaller_than_stored(existing: list[dict[str, Any]],
                        measured: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The (stored, measured) pairs where the measured row is a smaller sample of the stored one
    (:func:`_smaller_sample`), which :func:`merge_results` does not let replace it."""
    existing_by_key = {result_key(r): r for r in existing}
    return [(existing_by_key[result_key(row)], row) for row in measured
            if _smaller_sample(existing_by_key.get(result_key(row)), row)]


def _with_follow_up_of(row: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``old``'s follow-up and the figures after it (:data:`FOLLOW_UP_FIGURES`),
    and the older of their attack revisions (a row without one was made by revision 1)."""
    revision = min(row.get("attack_revision", 1), old.get("attack_revision", 1))
    return row | {k: old[k] for k in FOLLOW_UP_FIGURES if k in old} | {"attack_revision": revision}


def merge_results(existing: list[dict[str, Any]], measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``existing`` rows with every row that has the :func:`result_key` of a ``measured`` row
    replaced by it (unless :func:`smaller_than_stored`: then the stored row stays), and the
    other ``measured`` rows added; sorted by model, defense (CNN, DC,
    RDC), norm and eps, so the file changes only where the numbers do. A measured row without
    masking checks keeps those of the row it replaces (the same weights and settings), and one
    whose follow-up stages (none, or fewer) begin those of a row made by the same commands keeps
    that row's follow-up and the figures after it (:data:`FOLLOW_UP_FIGURES`); a row whose
    follow-up broke examples stays against a higher one without a follow-up
    (:func:`undoes_follow_up`). A row made by the same commands (and follow-ups) keeps its date."""
    existing_by_key = {result_key(r): r for r in existing}
    incoming = {}
    for row in measured:
        old = existing_by_key.get(result_key(row))
        if _smaller_sample(old, row) or undoes_follow_up(old, row):
            continue
        # checks not run by this invocation (--no-checks, --check-rows) are not checks that
        # failed to exist: the same measurement keeps the verdicts an earlier run recorded
        if (row.get("masking_checks") is None and old is not None and old.get("masking_checks")
                and old.get("budget") == row.get("budget")):  # checks of another budget say nothing of this one
            row = row | {"masking_checks": old["masking_checks"]}
        # likewise follow-ups on the survivors of the very same evaluations that this run did not
        # repeat (a run without --follow-up, or with fewer stages, that re-reads them): they stand
        if (old is not None and old["command"] == row["command"]
                and extends_follow_up(old.get("follow_up"), row.get("follow_up"))):
            row = _with_follow_up_of(row, old)
        # another chain of follow-ups on the same evaluations (neither begins the other): what the
        # stored one broke stays broken, so the lower figures stand
        elif (old is not None and old["command"] == row["command"] and old.get("follow_up")
              and row.get("follow_up") and old.get("follow_up") != row.get("follow_up")
              and not extends_follow_up(row.get("follow_up"), old.get("follow_up"))
              and old["robust"] < row["robust"]):
            row = _with_follow_up_of(row, old)
        # a re-read of the same evaluations (and follow-up) measured nothing new: its date stands
        if (old is not None and "date" in old and old["command"] == row["command"]
                and old.get("follow_up") == row.get("follow_up")):
            row = row | {"date": old["date"]}
        incoming[result_key(row)] = row
    merged = [r for r in existing if result_key(r) not in incoming] + list(incoming.values())
    return sorted(merged, key=_result_order)


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a robustness.json file ([] when it does not exist).

    Raises
    ------
    SystemExit
        When the file is not a JSON list of rows.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"robustness_table: {path}: not valid JSON ({exc})") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SystemExit(f"robustness_table: {path}: not a JSON list of rows")
    return rows


def update_results(path: str | Path, measured: list[dict[str, Any]],
                   said: set[tuple] | None = None) -> list[dict[str, Any]]:
    """Merge ``measured`` into the robustness.json at ``path`` (:func:`merge_results`) and
    write it atomically; returns the merged rows. A stored row kept against a smaller one is
    reported on stderr, once per row for a caller that passes the same ``said`` set."""
    existing = load_results(path)
    said = set() if said is None else said
    existing_by_key = {result_key(r): r for r in existing}
    for row in measured:
        old = existing_by_key.get(result_key(row))
        if undoes_follow_up(old, row) and (result_key(row), "follow-up") not in said:
            said.add((result_key(row), "follow-up"))
            print(f"robustness_table: {_display_path(Path(path))} keeps its {row['key']} row: its follow-up broke "
                  f"{_follow_up_broke(old)} example(s) that this run's row ({100 * row['robust']:.1f}% robust, no "
                  f"follow-up) would count as robust; run it with --follow-up to replace it (it is in table.md)",
                  file=sys.stderr)
    for old, row in smaller_than_stored(existing, measured):
        if (result_key(row), row["n"]) in said:
            continue
        said.add((result_key(row), row["n"]))
        same = "the same budget" if row.get("budget") == old.get("budget") else "a weaker budget"
        print(f"robustness_table: {_display_path(Path(path))} keeps its {row['key']} row of n = {old['n']}; "
              f"this run's n = {row['n']} with {same} does not replace it (it is in table.md)",
              file=sys.stderr)
    merged = merge_results(existing, measured)
    atomic_write_json(path, merged)
    return merged


# --- the README table ------------------------------------------------------------------------

def _checked_modes_note(row: dict[str, Any]) -> str:
    """``"; smooth gradients only"`` when the masking checks of an RDC row cover only some
    of the gradient modes its worst case is over; ``""`` otherwise."""
    modes = row.get("grad_modes") or []
    if row["defense"] != "rdc" or len(modes) < 2:
        return ""
    checked = {DEFENSES[key][1] for c in row["masking_checks"]["checks"] for key in DEFENSES
               if key.startswith("rdc-") and c["row"].startswith(f"{key}-")}
    if checked >= set(modes):
        return ""
    return f"; {', '.join(m for m in modes if m in checked)} gradients only"


def final_budget_convergence(row: dict[str, Any]) -> dict[str, Any] | None:
    """Evidence that a row's figure is converged at its final budget, or None.

    A robust accuracy after follow-ups counts only the digits that survived every stage, so
    a longer attack could lower it only by breaking one of them. The evidence is a follow-up
    stage of APGD-CE alone with at least twice the gradient steps of every stage before it,
    which, like every stage after it, broke none of the survivors.

    Returns
    -------
    dict or None
        ``steps`` (of that stage), ``before`` (the most steps of a stage before it) and
        ``survivors`` (how many it attacked).
    """
    stages, follow = [row], row.get("follow_up")
    while follow is not None:
        stages.append(follow)
        follow = follow.get("then")
    for i in range(1, len(stages)):
        stage = stages[i]
        steps = (stage.get("budget") or {}).get("steps")
        before = max(((s.get("budget") or {}).get("steps") or 0 for s in stages[:i]), default=0)
        if (list(stage["attacks"]) == ["apgd-ce"] and steps and before and steps >= 2 * before and stage["n"]
                and not any(s["broke"] for s in stages[i:])):
            return {"steps": steps, "before": before, "survivors": stage["n"]}
    return None


def _convergence_note(row: dict[str, Any]) -> str:
    """For a row whose doubled-iterations masking check failed: what its final budget shows."""
    failed = [c for c in row["masking_checks"]["checks"] if c["verdict"] != "PASS"]
    doubled = [c for c in failed if c["check"] == "more_iterations"]
    evidence = final_budget_convergence(row)
    first = (row.get("budget") or {}).get("steps")
    if not doubled or evidence is None or not first:
        return ""
    which = "each" if len(doubled) == len(failed) else str(len(doubled))
    # the steps the check compared are in its summary ("20 -> 40 steps: ..."), not the row's budget
    compared = {m.group(1, 2) for c in doubled if (m := re.match(r"(\d+) -> (\d+) steps", c.get("summary", "")))}
    pair = f"{first} with {2 * first}" if len(compared) != 1 else " with ".join(next(iter(compared)))
    survivors = f"{evidence['survivors']} survivor{'s' if evidence['survivors'] != 1 else ''}"
    times = "twice" if evidence["steps"] == 2 * evidence["before"] else "more than twice"
    return (f"; {which} compares {pair} steps; at the final budget, APGD-CE with "
            f"{evidence['steps']} steps, {times} the {evidence['before']} of the stages before it, broke none of "
            f"the {survivors}")


def _threat_label(norm: str, eps: float) -> str:
    return f"{NORM_LABELS.get(norm, norm)} {eps:g}"


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _grid_radius_note(rows: list[dict[str, Any]]) -> str:
    """The l-inf radius 8-bit adversarial images can use, for the l-inf radii of ``rows``
    ("" when there are none): the attacks return images as they are saved, on the 8-bit
    grid, so a pixel moves by at most floor(255 eps)/255."""
    radii = sorted({float(r["eps"]) for r in rows if r.get("norm") == "linf"})
    if not radii:
        return ""
    steps = [(math.floor(255 * eps + 1e-9), eps) for eps in radii]  # 1e-9: eps = k/255 may be a hair below k/255
    levels = ", ".join(f"{k}/255 = {k / 255:.3f} at {eps:g}" for k, eps in steps)
    return (f"Adversarial examples are 8-bit images, as saved, so an l-inf radius eps lets a pixel move by "
            f"floor(255 eps)/255 ({levels}); l2 radii hold after the rounding. ")


def readme_section(results: list[dict[str, Any]], model: str, model_digest: str, cnn: str, cnn_digest: str,
                   threats: list[tuple[str, str]] | None = None,
                   results_name: str = "benchmarks/results/robustness.json",
                   settings_digest: str | None = None) -> str:
    """The README's robustness table (markdown, without the markers), from robustness.json rows.

    Parameters
    ----------
    results
        The rows of robustness.json.
    model, model_digest, cnn, cnn_digest
        The diffusion model and the CNN the table is about, and the sha256 of their files now:
        only DC and RDC rows of ``model_digest`` and CNN rows of ``cnn_digest`` are shown.
    threats
        The threat models a full table has (default ``--threats``' default): those without a
        row are named as not measured, never given numbers.
    results_name
        How the text names the results file.
    settings_digest
        The digest of ``model``'s card's defense settings now (:func:`settings_sha256`): when
        given, DC and RDC rows measured with other settings are not shown either.
    """
    threats = threats if threats is not None else parse_threats(DEFAULT_THREATS)
    digest_of = {d: cnn_digest if d == "cnn" else model_digest for d in RESULT_DEFENSES}
    shown = [r for r in results if r.get("defense") in digest_of and r.get("model_sha256") == digest_of[r["defense"]]
             and (settings_digest is None or r["defense"] == "cnn" or r.get("settings_sha256") == settings_digest)]
    shown = sorted(shown, key=_result_order)
    regenerate = "`python benchmarks/robustness_table.py --readme`"
    if not shown:
        settings_note = f", defense settings `{settings_digest[:12]}`" if settings_digest else ""
        return (f"No row of the robustness table has been measured for the current model (`{model}`, sha256 "
                f"`{model_digest[:12]}`{settings_note}) yet, so there are no robustness figures here. Measure them with "
                f"`python benchmarks/robustness_table.py --model {model}` (hours on a CPU; "
                f"[docs/results.md](docs/results.md) has the settings and the earlier figures), which writes "
                f"`{results_name}`, then regenerate this table with {regenerate}.\n")
    hardware: list[str] = []
    for r in shown:
        if r["hardware"] not in hardware:
            hardware.append(r["hardware"])
    settings_note = f", defense settings `{settings_digest[:12]}`" if settings_digest else ""
    lines = [f"Robust accuracy of the current model `{model}` (sha256 `{model_digest[:12]}`{settings_note}; CNN `{cnn}`, "
             f"`{cnn_digest[:12]}`) on the first n MNIST test digits under `rdc eval --attack ensemble` "
             f"(APGD-CE, APGD-DLR, APGD-T, Square, transfer from the CNN). An RDC digit counts as robust only if it "
             f"survives the ensemble with every gradient mode (exact, smooth, BPDA), and a digit of a row whose "
             f"attacks name a follow-up only if it survives that too (the ensemble again, with a larger budget, "
             f"on the row's survivors). 95% Wilson intervals. {_grid_radius_note(shown)}"
             f"Generated from [`{results_name}`]({results_name}), which holds each row's commands, by {regenerate}.",
             "",
             "| defense | threat model | n | clean | robust (95% CI) | attacks | masking checks | s / image | "
             "hardware |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in shown:
        lo, hi = r["ci95"]
        attacks = describe_attacks(r)
        checks = r.get("masking_checks")
        if not checks:
            verdict = "not run"
        elif checks["passed"]:
            verdict = f"all {len(checks['checks'])} passed (n = {checks['n']}{_checked_modes_note(r)})"
        else:
            failed = sum(c["verdict"] != "PASS" for c in checks["checks"])
            verdict = (f"**{failed} of {len(checks['checks'])} failed** (n = {checks['n']}{_checked_modes_note(r)}"
                       f"{_convergence_note(r)})")
        lines.append(f"| {r['label']} | {_threat_label(r['norm'], r['eps'])} | {r['n']} | {_pct(r['clean'])}% | "
                     f"**{_pct(r['robust'])}%** ({_pct(lo)}-{_pct(hi)}) | {attacks} | {verdict} | "
                     f"{r['seconds_per_image']:.2f} | [{hardware.index(r['hardware']) + 1}] |")
    lines.append("")
    lines += [f"[{i}] {h}" + ("  " if i < len(hardware) else "") for i, h in enumerate(hardware, 1)]
    have = {(r["defense"], r["norm"], float(r["eps"])) for r in shown}
    missing = [f"{RESULT_DEFENSES[d]} {_threat_label(norm, parse_fraction(eps))}" for d in RESULT_DEFENSES
               if d not in BINARIZE for norm, eps in threats if (d, norm, parse_fraction(eps)) not in have]
    if missing:
        lines += ["", f"Not measured yet for this model: {'; '.join(missing)}."]
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with what lies between :data:`README_START` and :data:`README_END` replaced by
    ``section`` (the markers and everything outside them unchanged).

    Raises
    ------
    ValueError
        When the markers are missing, repeated or out of order.
    """
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise ValueError(f"needs exactly one {README_START} and one {README_END}")
    start = text.index(README_START) + len(README_START)
    end = text.index(README_END)
    if end < start:
        raise ValueError(f"{README_END} comes before {README_START}")
    return text[:start] + "\n" + section.rstrip("\n") + "\n" + text[end:]


def update_readme(readme: str | Path, results: str | Path, model: str = DEFAULT_MODEL, cnn: str = "mnist-cnn",
                  threats: str = DEFAULT_THREATS) -> bool:
    """Regenerate the robustness table in ``readme`` from the robustness.json at ``results``
    (:func:`readme_section` for the files ``model`` and ``cnn`` name now); returns whether
    the file changed (it is rewritten atomically, and only then).

    Raises
    ------
    SystemExit
        When ``readme`` lacks the markers or a model file is missing.
    """
    readme, results = Path(readme), Path(results)
    text = readme.read_text()
    section = readme_section(load_results(results), model, model_sha256(model), cnn, model_sha256(cnn),
                             parse_threats(threats), _display_path(results), settings_sha256(model))
    try:
        new = replace_section(text, section)
    except ValueError as exc:
        raise SystemExit(f"robustness_table: {readme}: {exc}") from exc
    if new == text:
        return False
    atomic_write_bytes(readme, new.encode())
    return True


def follow_up_table(follow_ups: FollowUps) -> list[dict[str, Any]]:
    """table.json's ``follow_ups``: per evaluation row and finished follow-up stage (1, 2, ...),
    the survivors it attacked, what it broke and its command."""
    out = []
    for key, stages in follow_ups.items():
        for stage, (ev, report) in enumerate(stages, 1):
            rows = example_rows(report)
            out.append({"row": key, "stage": stage, "indices": format_indices(r.index for r in rows), "n": len(rows),
                        "broken": [r.index for r in rows if not r.robust_correct],
                        "attacks": report_attacks(report), "budget": report_budget(report),
                        "seconds_per_image": report["table_timing"]["seconds_per_image"],
                        "command": made_by(ev, report)})
    return out


def render_markdown(summaries: list[dict[str, Any]], checks: list[dict[str, Any]], meta: dict[str, Any],
                    worst: list[dict[str, Any]] | None = None, follow: list[dict[str, Any]] | None = None) -> str:
    """table.md: the results table, the follow-ups, the checks and the commands behind every number."""
    hardware: list[str] = []
    for s in summaries:
        if s["hardware"] not in hardware:
            hardware.append(s["hardware"])
    lines = ["# Robustness rows of one robustness_table.py run", "",
             "This file holds only the rows this run measured; every row measured so far, for every model, "
             "is in benchmarks/results/robustness.json (the README's table is generated from it).", "",
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
    if follow:
        lines += ["", "## Follow-up on the survivors", "",
                  "The ensemble (or Square, APGD-CE or the threshold-flip attack alone) again, with a larger budget, "
                  "on the examples each row left robust (for the RDC: "
                  "those that survived all three gradient modes); a later stage attacks those every earlier one "
                  "left. robustness.json counts an example robust only if every follow-up left it robust too.", "",
                  "| Row | Survivors attacked | Budget | Broken | s / image |", "|---|---|---|---|---|"]
        for f in follow:
            budget = describe_attacks({"attacks": f.get("attacks", list(ENSEMBLE_ORDER)), "budget": f["budget"]})
            broken = ", ".join(map(str, f["broken"])) or "none"
            row = f["row"] if f.get("stage", 1) == 1 else f"{f['row']}, stage {f['stage']}"
            lines.append(f"| {row} | {f['n']} ({f['indices']}) | {budget} | {broken} | "
                         f"{f['seconds_per_image']:.2f} |")
    if checks:
        lines += ["", "## Gradient-masking checks", "",
                  f"APGD-CE ({meta['check_steps']} iterations, 1 restart) on the first {meta['check_n']} test images "
                  f"of each row's defense and norm; Square with {meta['check_square_queries']} queries. "
                  f"(a) robust accuracy <= {_pct(meta['large_eps_max_acc'])}% at l-inf eps {meta['large_eps_linf']} / "
                  f"l2 eps {meta['large_eps_l2']}; (b) non-increasing over eps (clean accuracy at eps 0); (c) "
                  f"white-box APGD-CE <= Square and <= transfer, each run alone; (d) doubling the APGD-CE iterations "
                  f"neither lowers robust accuracy by {100 * meta['max_change']:g} point or more nor raises it "
                  f"beyond noise (its paired 95% interval above 0).", "",
                  f"**All checks passed: {'yes' if meta['all_checks_passed'] else 'no'}**", "",
                  "| Defense | Threat model | Check | Result | Numbers |", "|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['defense']} | {NORM_LABELS[c['norm']]} {c['eps']} | {c['check']['title']} | "
                         f"**{c['check']['verdict']}** | {_cell(c['check']['summary'])} |")
    lines += ["", "## Commands", "", "Each row (run from the repository root):", ""]
    lines += [f"- {s['defense']}, {NORM_LABELS[s['norm']]} {s['eps']}: `{s['command']}`" for s in summaries]
    if follow:
        lines += ["", "Follow-ups:", ""] + [f"- {f['row']}: `{f['command']}`" for f in follow]
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
    p.add_argument("--out-dir", default="runs/robustness-table",
                   help="the rdc eval reports, logs and states, table.md and table.json")
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help="the robustness.json this run's rows are merged into ('none': do not write one)")
    p.add_argument("--threats", default=DEFAULT_THREATS,
                   help="threat models, comma-separated NORM:EPS (NORM linf or l2; EPS as rdc eval --eps takes it)")
    p.add_argument("--rows", default="*", help="comma-separated shell patterns over row keys DEFENSE-NORM-EPS, "
                   "DEFENSE one of cnn, dc, rdc-exact, rdc-smooth, rdc-bpda (e.g. 'cnn-*,rdc-*-linf-0.3'); the "
                   "RDC row of robustness.json needs all three rdc-* rows of its threat model. The optional "
                   "binary-dc rows (the DC behind input binarisation at 0.5, rdc eval --binarize) only by a "
                   "pattern that begins with binary-dc, e.g. 'binary-dc-linf-0.3'")
    p.add_argument("--n-cnn", type=whole_number(1), default=1000, help="test images of the CNN rows")
    p.add_argument("--n-dc", type=whole_number(1), default=200, help="test images of the DC rows")
    p.add_argument("--n-rdc", type=whole_number(1), default=100, help="test images of the RDC rows (exact, smooth and BPDA)")
    p.add_argument("--n-row", default="", help="comma-separated PATTERN=N: n for the rows whose key matches the "
                   "shell pattern, over --n-cnn/--n-dc/--n-rdc (later pairs win), e.g. 'rdc-*-linf-0.3=50'")
    p.add_argument("--budget", choices=BUDGETS, default="full",
                   help="the attack budget --steps, --targets, --square-queries and --check-square-queries "
                        "default to: " + "; ".join(f"{name} {', '.join(f'{k} {v}' for k, v in values.items())}"
                                                   for name, values in BUDGETS.items()))
    p.add_argument("--steps", type=int, default=None, help="APGD iterations (default: the --budget's)")
    p.add_argument("--square-queries", type=int, default=None, help="Square queries (default: the --budget's)")
    p.add_argument("--targets", type=int, default=None, help="APGD-T target classes (default: the --budget's)")
    p.add_argument("--levels", type=int, default=None, help="classifier noise levels T (default: the model card's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=whole_number(1), default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=whole_number(0), default=0, help="torch CPU threads (0: one per core)")
    p.add_argument("--jobs", type=whole_number(1), default=1,
                   help="evaluations run at once, each an rdc eval subprocess (e.g. several on one GPU)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--follow-up", nargs="?", const="", default=None, metavar="STEPS/TARGETS/QUERIES,...",
                   help="attack the survivors of every finished row again (for the RDC: the examples that survived "
                        "all three gradient modes, attacked with each) with the ensemble and the --follow-up-* "
                        "budget, or in stages with the budgets given (e.g. 100/3/1000,100/9/5000: each stage "
                        "attacks what the ones before it left; square/QUERIES: Square alone; apgd-ce/STEPS[xSTARTS]: "
                        "APGD-CE alone; flip/STEPS[xSTARTS]: the threshold-flip attack, binary-dc rows only); the row "
                        "then counts "
                        "an example robust only if every run left it robust")
    p.add_argument("--follow-up-steps", type=whole_number(1), default=100, help="APGD iterations of a one-stage follow-up")
    p.add_argument("--follow-up-targets", type=whole_number(1), default=9, help="APGD-T target classes of a one-stage follow-up")
    p.add_argument("--follow-up-square-queries", type=whole_number(1), default=5000,
                   help="Square queries of a one-stage follow-up")
    p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                   help="run the gradient-masking checks")
    p.add_argument("--check-rows", default="*", help="shell patterns: the rows (of --rows) that get the checks")
    p.add_argument("--check-n", type=whole_number(1), default=50, help="test images of each check evaluation")
    p.add_argument("--check-steps", type=whole_number(1), default=None, help="APGD iterations of the checks (default: --steps)")
    p.add_argument("--check-square-queries", type=whole_number(1), default=None,
                   help="Square queries of check (c) (default: the --budget's)")
    p.add_argument("--sweep-linf", type=eps_list, default="0.1,0.2,0.3", help="l-inf eps sweep of check (b)")
    p.add_argument("--sweep-l2", type=eps_list, default="0.5,1,1.5", help="l2 eps sweep of check (b)")
    p.add_argument("--large-eps-linf", type=eps_radius, default="0.6", help="check (a); also the end of the sweep")
    p.add_argument("--large-eps-l2", type=eps_radius, default="6")
    p.add_argument("--large-eps-max-acc", type=float, default=0.02, help="check (a): robust accuracy allowed")
    p.add_argument("--max-change", type=float, default=0.01, help="check (d): largest change allowed")
    p.add_argument("--dry-run", action="store_true",
                   help="print the rdc eval commands (and how far unfinished ones have got) and exit")
    p.add_argument("--readme", action="store_true",
                   help="only regenerate the README's robustness table from --results (for --model and --cnn); "
                        "measures nothing")
    p.add_argument("--readme-file", default=str(ROOT / "README.md"), help="the README --readme rewrites")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed options, with the attack budget's defaults filled in from ``--budget`` and
    ``follow_up`` the list of follow-up stages (:class:`FollowUpBudget`; empty without
    ``--follow-up``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in BUDGETS[args.budget].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.follow_up is None:
        args.follow_up = []
    elif args.follow_up == "":
        args.follow_up = [FollowUpBudget(args.follow_up_steps, args.follow_up_targets, args.follow_up_square_queries)]
    else:
        try:
            args.follow_up = parse_follow_up(args.follow_up)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``pkill``) unwinds like Ctrl-C, so the running ``rdc eval``
    subprocesses are stopped with this script instead of running on unattended."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.readme:
        changed = update_readme(args.readme_file, args.results, args.model, args.cnn, args.threats)
        print(f"{'updated' if changed else 'unchanged'}: the robustness table in {args.readme_file} "
              f"(from {args.results})")
        return 0
    rows = build_rows(args)
    check_follow_up_stages(rows, args.follow_up)
    add_model_digests(args)
    out_dir = Path(args.out_dir)
    results_path = None if args.results.lower() == "none" else Path(args.results)
    row_evs = [(row, row_evaluation(args, row)) for row in rows]
    check_evs = [(row, check_evaluations(args, row)) for row in select_rows(rows, args.check_rows, "--check-rows")
                 ] if args.checks else []
    if args.dry_run:
        def show(ev: Evaluation) -> None:
            print(ev.command)
            if _existing_report(ev, out_dir) is None and (progress := state_progress(ev, out_dir)) is not None:
                print(f"#   unfinished: {progress} (state {out_dir / ev.name}.state.jsonl)")

        for _, ev in row_evs:
            show(ev)
        if args.follow_up:
            print("# follow-ups: each stage's attacks on each row's survivors, once its report (and the "
                  "earlier stages') exists")
            finished = [(row, ev, rep) for row, ev in row_evs
                        if (rep := _existing_report(ev, out_dir)) is not None]
            known: FollowUps = {}
            shown: set[str] = set()  # a Square-alone stage's one run serves the RDC's three modes
            for stage in range(len(args.follow_up)):
                for row, ev in follow_up_evaluations(args, finished, known, stage):
                    if ev.name not in shown:
                        show(ev)
                        shown.add(ev.name)
                    if (rep := _existing_report(ev, out_dir)) is not None:
                        known.setdefault(row.key, []).append((ev, rep))
        if check_evs:
            print("# gradient-masking checks")
            printed: set[str] = set()
            for row, evs in check_evs:
                for ev in evs.values():
                    if ev.name not in printed:  # the eps sweep is shared by the rows of one norm
                        show(ev)
                        printed.add(ev.name)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/robustness_table.py " + " ".join(shlex.quote(a) for a in argv),
            "date": time.strftime("%Y-%m-%d"), "model": args.model, "model_sha256": args.model_sha256,
            "settings_sha256": args.settings_sha256, "cnn": args.cnn, "cnn_sha256": args.cnn_sha256, "threats": args.threats, "steps": args.steps,
            "square_queries": args.square_queries, "targets": args.targets, "seed": args.seed,
            "checks": bool(args.checks), "check_n": args.check_n, "check_steps": args.check_steps or args.steps,
            "check_square_queries": args.check_square_queries, "large_eps_linf": args.large_eps_linf,
            "large_eps_l2": args.large_eps_l2, "large_eps_max_acc": args.large_eps_max_acc,
            "max_change": args.max_change, "follow_up": bool(args.follow_up),
            "follow_up_stages": [budget.as_dict() for budget in args.follow_up]}
    summaries: list[dict[str, Any]] = []
    reports: dict[str, dict[str, Any]] = {}
    done: list[tuple[Row, Evaluation, dict[str, Any]]] = []
    checks: list[dict[str, Any]] = []
    results: list[CheckResult] = []
    follow_ups: FollowUps = {}
    said: set[tuple] = set()  # robustness.json rows kept against smaller ones, reported once

    def write() -> None:
        meta["all_checks_passed"] = all_passed(results)
        worst = worst_cases(summaries, reports)
        follow = follow_up_table(follow_ups)
        atomic_write_json(out_dir / "table.json", {"meta": meta, "rows": summaries, "worst_case": worst,
                                                   "checks": checks, "follow_ups": follow})
        atomic_write_bytes(out_dir / "table.md", render_markdown(summaries, checks, meta, worst, follow).encode())
        if results_path is not None:
            update_results(results_path, result_rows(args, done, checks, follow_ups), said)

    failed: dict[str, str] = {}
    if args.jobs > 1:
        failed = run_concurrently([ev for _, ev in row_evs] + [ev for _, evs in check_evs for ev in evs.values()],
                                  out_dir, args.jobs)
    for row, ev in row_evs:
        if ev.name in failed:
            continue
        reports[row.key] = run_evaluation(ev, out_dir)
        done.append((row, ev, reports[row.key]))
        summaries.append(row_summary(row, ev, reports[row.key], out_dir))
        write()
    for stage in range(len(args.follow_up)):  # each stage attacks what the earlier ones left
        follow_evs = follow_up_evaluations(args, done, follow_ups, stage)
        if args.jobs > 1:
            failed |= run_concurrently([ev for _, ev in follow_evs], out_dir, args.jobs)
        for row, ev in follow_evs:
            if ev.name not in failed:
                follow_ups.setdefault(row.key, []).append((ev, run_evaluation(ev, out_dir)))
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
    if results_path is not None:
        measured = result_rows(args, done, checks, follow_ups)
        print(f"merged {len(measured)} row{'s' if len(measured) != 1 else ''} "
              f"({', '.join(r['key'] for r in measured) or 'none'}) into {results_path}; regenerate the README "
              f"table with: python benchmarks/robustness_table.py --readme"
              + (f" --results {shlex.quote(str(results_path))}" if results_path != DEFAULT_RESULTS else "")
              + (f" --model {shlex.quote(args.model)}" if args.model != DEFAULT_MODEL else ""))
        for threat in missing_rdc_rows(rows, done):
            print(f"no RDC row in {results_path.name} for {threat}: it is the worst case over all three gradient "
                  f"modes")
    for c in checks:
        print(f"{c['check']['verdict']}  {c['defense']}, {NORM_LABELS[c['norm']]} {c['eps']}: {c['check']['summary']}")
    if checks:
        print("all gradient-masking checks passed" if all_passed(results)
              else "some gradient-masking checks FAILED (see table.md)")
    for name, reason in failed.items():
        print(f"not in the table: {name}: {reason} (see {out_dir / (name + '.out')})")
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        sys.exit(main())
    except BrokenPipeError:  # `--dry-run | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(1)
