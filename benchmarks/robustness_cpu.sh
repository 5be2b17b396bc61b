#!/usr/bin/env bash
# The robustness rows of the default model at the reduced budget a 2-core CPU affords, in one
# resumable command: the protocol by which the shipped weights' l-inf 0.3 rows (stage 3) and
# every DC and RDC row of the third-stage weights were measured on the 2-core VM (by direct
# benchmarks/robustness_table.py commands, recorded in robustness.json; the shipped weights'
# l-inf 0.1 and l2 1.5 rows with the same protocol at more digits on an H200, which
# benchmarks/robustness_gpu.sh reproduces); for re-measuring on a CPU whenever the bundled
# weights or their defense settings change.
#
#   bash benchmarks/robustness_cpu.sh [MODEL]      (default: mnist-embedding)
#
# Reduced ensemble of `rdc eval --attack ensemble`: APGD-CE, APGD-DLR and APGD-T with
# STEPS (20) iterations and 1 target class, Square with 100 queries, transfer from the
# CNN; two evaluations at a time, one thread each. In order (each stage merges its rows
# into benchmarks/results/robustness.json as it finishes, so an interrupted run keeps
# every finished stage and re-running resumes the unfinished one from its state):
#
#   1. DC at l-inf 0.1 and l2 1.5 on N_DC (100) test digits, with the gradient-masking
#      checks on CHECK_N_DC (50) digits  (~3 h on the 2-core VM, estimated; 129 s on an H200 with
#      --device cuda and larger batches, see docs/results.md)
#   2. RDC (exact, smooth and BPDA gradients) at l-inf 0.1 and l2 1.5 on N_RDC (60) digits,
#      with the checks of every gradient mode on CHECK_N_RDC (10) digits
#      (~3.5 h for the rows and ~3 h for the checks on a normal day of the VM; twice on a slow one;
#      on an H200 with --device cuda the rows at n = 100 and the checks at n = 50 took ~10 min;
#      robustness.json keeps such a row of more examples: a smaller one never replaces it)
#   3. DC at l-inf 0.3 on N_DC_LARGE (100) digits and RDC on N_RDC_LARGE (50), with the checks
#      of every row on CHECK_N_LARGE (50) digits, then a follow-up on the survivors in the
#      stages FOLLOW_UP_LARGE (100/3/1000,100/9/5000,apgd-ce/200: 100 steps, 3 targets and
#      Square 1000, then the full ensemble on what that left, then APGD-CE alone with twice its
#      steps, the convergence check at the final budget; empty for none), as measured for the
#      shipped weights (~1 h for the rows, ~1 h for the checks, ~1 h, ~2 h and ~0.5 h for the
#      three follow-up stages on the 2-core VM, docs/results.md)
#   4. the README table regenerated from robustness.json
#
# The CNN rows (full ensemble) do not depend on the diffusion model and are not re-run.
# Environment: N_DC, N_RDC, N_DC_LARGE, N_RDC_LARGE, CHECK_N_DC, CHECK_N_RDC, CHECK_N_LARGE,
# FOLLOW_UP_LARGE, STEPS,
# OUT_DIR (default benchmarks/results/robustness-runs), JOBS (2); DRY_RUN=1 prints the
# `rdc eval` commands of every stage and measures nothing. A full-budget run is
# `python benchmarks/robustness_table.py` with its defaults (hours per row on this CPU).
set -euo pipefail
model="${1:-mnist-embedding}"
out_dir="${OUT_DIR:-benchmarks/results/robustness-runs}"
common=(--model "$model" --budget reduced --steps "${STEPS:-20}" --threads 1
        --jobs "${JOBS:-2}" --batch-size 5 --out-dir "$out_dir")
dry=()
if [[ -n "${DRY_RUN:-}" ]]; then dry=(--dry-run); fi
table() { echo "+ python benchmarks/robustness_table.py $*"; python benchmarks/robustness_table.py "$@" "${dry[@]}"; }

table "${common[@]}" --rows 'dc-linf-0.1,dc-l2-1.5' --n-row "dc-*=${N_DC:-100}" \
    --check-n "${CHECK_N_DC:-50}"
table "${common[@]}" --rows 'rdc-*-linf-0.1,rdc-*-l2-1.5' --n-row "rdc-*=${N_RDC:-60}" \
    --check-rows 'rdc-*' --check-n "${CHECK_N_RDC:-10}"
stages="${FOLLOW_UP_LARGE-100/3/1000,100/9/5000,apgd-ce/200}"  # set but empty: no follow-up
follow_up=()
if [[ -n "$stages" ]]; then follow_up=(--follow-up "$stages"); fi
table "${common[@]}" --rows 'dc-linf-0.3,rdc-*-linf-0.3' \
    --n-row "dc-*=${N_DC_LARGE:-100},rdc-*=${N_RDC_LARGE:-50}" --check-n "${CHECK_N_LARGE:-50}" "${follow_up[@]}"
if [[ -z "${DRY_RUN:-}" ]]; then table --model "$model" --readme; fi
