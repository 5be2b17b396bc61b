#!/usr/bin/env bash
# Every DC and RDC row of the robustness table, with its gradient-masking checks, measured on
# a GPU lease in calls that each end before a time limit and resume where the last one stopped.
#
#   bash benchmarks/robustness_gpu.sh [SECONDS]      (default 540: inside a 10-minute command)
#
# One `benchmarks/robustness_table.py` run over the rows dc-* and rdc-* (exact, smooth and
# BPDA gradients) at l-inf 0.1, l-inf 0.3 and l2 1.5, N (100) test digits each, and the checks
# of every row on CHECK_N (50) digits; the reduced ensemble (APGD-CE, APGD-DLR and APGD-T with
# STEPS (20) iterations and 1 target class, Square with 100 queries, transfer from the CNN),
# JOBS (8) `rdc eval` processes at once on DEVICE (cuda), one CPU thread and batches of BATCH
# (25) each. The reports land in OUT_DIR (benchmarks/results/robustness-runs, where the
# committed ones live, so finished evaluations are reused and the states of cut-off ones
# resume), the rows are merged into RESULTS (benchmarks/results/robustness.json) and the
# README table is regenerated from it once every evaluation has finished.
#
# After SECONDS the run is stopped (its states keep every finished digit) and the script
# exits 124: run it again, carrying OUT_DIR, to resume. PACK=FILE.tgz writes OUT_DIR (less its
# lock files), RESULTS and the README into FILE.tgz at the end, finished or not, to be
# unpacked in the repository root of the machine the results go to.
#
# On a GPU machine with its own torch: `pip install --no-deps --no-build-isolation -e .` and
# MNIST under RDC_DATA_ROOT first. By the H200 timings of 2026-12-04 (docs/results.md) the
# RDC rows at l-inf 0.1 and l2 1.5 with their checks take about 11 minutes and the DC rows
# with theirs about 2, so the whole protocol needs two or three calls.
# FOLLOW_UP=1 then attacks every selected row's survivors again with the full ensemble (100
# steps, 9 targets, Square 5000; `robustness_table.py --follow-up`): minutes for the DC rows
# on an H200 (ROWS='dc-*'), hours for the RDC's. FOLLOW_UP=STEPS/TARGETS/QUERIES,... runs the
# follow-up in stages instead, each on what the ones before it left.
# Environment: MODEL (mnist-embedding), N, N_DC (N), N_RDC (N), CHECK_N, STEPS, JOBS, BATCH,
# DEVICE, OUT_DIR, RESULTS, README (README.md), ROWS ('dc-*,rdc-*': shell patterns over the
# row keys), FOLLOW_UP, PACK; DRY_RUN=1 prints the `rdc eval` commands and measures nothing.
set -euo pipefail
cd "$(dirname "$0")/.."  # relative paths (OUT_DIR, RESULTS, PACK) are taken from the repository root
seconds="${1:-540}"
if ! [[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]]; then
    echo "SECONDS must be a positive whole number, not '$seconds'" >&2
    exit 2
fi
out_dir="${OUT_DIR:-benchmarks/results/robustness-runs}"
results="${RESULTS:-benchmarks/results/robustness.json}"
readme="${README:-README.md}"
model="${MODEL:-mnist-embedding}"
args=(--model "$model" --device "${DEVICE:-cuda}" --out-dir "$out_dir" --results "$results"
      --rows "${ROWS:-dc-*,rdc-*}" --n-row "dc-*=${N_DC:-${N:-100}},rdc-*=${N_RDC:-${N:-100}}"
      --budget reduced --steps "${STEPS:-20}"
      --check-n "${CHECK_N:-50}" --threads 1 --jobs "${JOBS:-8}" --batch-size "${BATCH:-25}")
if [[ "${FOLLOW_UP:-}" == 1 ]]; then
    args+=(--follow-up)
elif [[ -n "${FOLLOW_UP:-}" ]]; then  # stages, e.g. FOLLOW_UP=100/3/1000,100/9/5000
    args+=(--follow-up "$FOLLOW_UP")
fi
if [[ -n "${DRY_RUN:-}" ]]; then
    exec python benchmarks/robustness_table.py "${args[@]}" --dry-run
fi

pack() {
    [[ -n "${PACK:-}" ]] || return 0
    local present=() path
    for path in "$out_dir" "$results" "$readme"; do [[ -e "$path" ]] && present+=("$path"); done
    ((${#present[@]})) || { echo "nothing to pack into $PACK" >&2; return 0; }
    tar czf "$PACK" --exclude='*.lock' "${present[@]}"
    echo "packed ${present[*]} into $PACK"
}
trap pack EXIT

echo "+ python benchmarks/robustness_table.py ${args[*]}   (stopped after ${seconds} s)"
start=$(date +%s)
status=0
# SIGTERM unwinds robustness_table like Ctrl-C (it stops its rdc eval processes); KILL 30 s
# later only if that hangs.
timeout -s TERM -k 30 "$seconds" python benchmarks/robustness_table.py "${args[@]}" || status=$?
echo "robustness_table exit status $status after $(( $(date +%s) - start )) s"
if ((status == 124 || status == 137)); then  # 137: the KILL 30 s later (state lines are written whole)
    echo "stopped at the time limit: run this command again (with $out_dir) to resume" >&2
    exit 124
fi
if ((status != 0)); then exit "$status"; fi
python benchmarks/robustness_table.py --readme --results "$results" --model "$model" --readme-file "$readme"
