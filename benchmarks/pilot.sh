#!/usr/bin/env bash
# Pilot at equal training time: class-embedding U-Net vs multi-head U-Net, both trained
# with the denoising loss alone (no cross-entropy term) for the same wall time, one CPU
# thread each, side by side; then each is judged by
#   * class-conditional sample agreement: 20 samples per class, judged by the CNN baseline;
#   * validation accuracy of its diffusion classifier (first 500 validation digits).
#
#   bash benchmarks/pilot.sh [MINUTES]      # default 30; outputs in runs/pilot-*/
#
# Resumable: re-running continues an interrupted training (its state is in the run
# directory) and redoes only the measurements.
set -euo pipefail
minutes="${1:-30}"
common=(--channels 32,64,96 --emb-dim 128 --epochs 100 --batch-size 128 --lr 2e-3
        --warmup-steps 200 --seed 0 --threads 1 --max-minutes "$minutes" --checkpoint-minutes 5)
mkdir -p runs/pilot-embedding runs/pilot-multihead
rdc train --arch embedding "${common[@]}" --out runs/pilot-embedding \
    --log runs/pilot-embedding/train.jsonl > runs/pilot-embedding/train.out 2>&1 &
rdc train --arch multihead --head-channels 16,8 "${common[@]}" --out runs/pilot-multihead \
    --log runs/pilot-multihead/train.jsonl > runs/pilot-multihead/train.out 2>&1 &
wait
for arch in embedding multihead; do
    dir="runs/pilot-$arch"
    python benchmarks/sample_agreement.py --model "$dir/model.safetensors" --n 20 --threads 1 \
        --json "$dir/agreement.json" --out-dir "$dir/samples" &
done
wait
for arch in embedding multihead; do
    dir="runs/pilot-$arch"
    rdc eval --model "$dir/model.safetensors" --split val --n 500 --defense dc --attack none \
        --levels 16 --sigma-max 2 --threads 1 --out "$dir/val500.json" &
done
wait
for arch in embedding multihead; do
    python - "runs/pilot-$arch" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
agree = json.loads((d / "agreement.json").read_text())
val = json.loads((d / "val500.json").read_text())
print(d.name, "samples judged their class:", f"{agree['correct']}/{agree['total']}", "val accuracy:", val["clean_acc"])
EOF
done
