#!/usr/bin/env bash
# Pilot at equal training time: which training noise-level distribution makes the better
# diffusion classifier? Two fine-tunes of the same starting model, side by side, one CPU
# thread each, same seed, data order, learning-rate schedule and wall time. The default
# pair (the pilot that made the second-stage weights):
#   * edm:   ln sigma ~ N(-1.2, 1.2^2), EDM's distribution (3% of draws above sigma 2.9);
#   * shift: ln sigma ~ N(-0.2, 1.3^2), more draws at the classifier's levels (17% above 2.9).
# Each is then judged on the validation split only:
#   * the diffusion classifier's accuracy on the first validation digits
#     (scripts/classifier_sweep.py, with and without progressive class elimination);
#   * class-conditional sample agreement: 20 samples per class, judged by the CNN.
#
#   bash benchmarks/noise_pilot.sh [INIT [MINUTES [EPOCHS]]]
#       INIT: the starting checkpoint, default runs/gen-embedding/model.safetensors: the
#       first-stage model, made by the first of the bundled card's training_commands (the
#       pilot that chose the shipped weights started from it, then bundled as mnist-embedding)
#       defaults: 92 minutes, 12 epochs (the cosine schedule ends at the last epoch;
#       12 epochs take about 80 minutes on one thread of the development machine)
#
# Environment (defaults reproduce the second-stage pilot):
#   PILOT_VARIANTS  "name=training options;name=training options" (two or more)
#   PILOT_PREFIX    run directories are PREFIX-name (default runs/noise-pilot)
#   PILOT_LR        peak learning rate (default 1e-3)
#   PILOT_SEED      seed (default 1)
#   PILOT_SWEEP     classifier_sweep options after --model (default: first-stage grid, 500 digits)
#
# Outputs in PREFIX-name/. Resumable: re-running continues an interrupted training from
# its state and redoes only the measurements.
set -euo pipefail
init="${1:-runs/gen-embedding/model.safetensors}"
minutes="${2:-92}"
epochs="${3:-12}"
prefix="${PILOT_PREFIX:-runs/noise-pilot}"
variants="${PILOT_VARIANTS:-edm=;shift=--p-mean -0.2 --p-std 1.3}"
sweep="${PILOT_SWEEP:---n 500 --levels 8 --grid log --weighting edm --sigma-min 0.2 --sigma-max 10,20 --screen 4 --keep 2,3 --threads 1}"
common=(--init-from "$init" --epochs "$epochs" --batch-size 128 --lr "${PILOT_LR:-1e-3}" --lr-schedule cosine
        --warmup-steps 200 --seed "${PILOT_SEED:-1}" --threads 1 --max-minutes "$minutes" --checkpoint-minutes 5)
declare -A noise=()
names=()
IFS=';' read -ra specs <<< "$variants"
for spec in "${specs[@]}"; do
    names+=("${spec%%=*}")
    noise[${spec%%=*}]="${spec#*=}"
done
for name in "${names[@]}"; do
    dir="$prefix-$name"
    mkdir -p "$dir"
    # shellcheck disable=SC2086  # the noise options are meant to split into words
    rdc train "${common[@]}" ${noise[$name]} --out "$dir" --log "$dir/train.jsonl" > "$dir/train.out" 2>&1 &
done
wait
for name in "${names[@]}"; do
    dir="$prefix-$name"
    # shellcheck disable=SC2086
    python scripts/classifier_sweep.py --model "$dir/model.safetensors" $sweep \
        --json "$dir/sweep.json" > "$dir/sweep.txt" 2>&1 &
done
wait
for name in "${names[@]}"; do
    dir="$prefix-$name"
    python benchmarks/sample_agreement.py --model "$dir/model.safetensors" --n 20 --threads 1 \
        --json "$dir/agreement.json" --out-dir "$dir/samples" > "$dir/agreement.txt" 2>&1 &
done
wait
for name in "${names[@]}"; do
    echo "== $name"
    cat "$prefix-$name/sweep.txt"
    python -c "import json,sys; a=json.load(open(sys.argv[1])); print('samples judged their class:', a['correct'], '/', a['total'])" \
        "$prefix-$name/agreement.json"
done
