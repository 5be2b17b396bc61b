#!/usr/bin/env bash
# The attack sanity figures of the README (issue 3): APGD-CE l-inf against the CNN, the
# diffusion classifier alone (DC) and the full RDC, over an eps sweep, plus the 100-step
# figures at eps 0.3 and the timing of `rdc attack` on one digit.
#
#   bash benchmarks/attack_sanity.sh [OUT_DIR]      (default: runs/eval; resumable)
#   N=10 bash benchmarks/attack_sanity.sh DIR        (DC and RDC on the first 10 digits)
#
# N (default 50) is the number of test digits of the DC and RDC evaluations, N_CNN (default
# 200) that of the CNN's, THREADS (default 0: OMP_NUM_THREADS if set, else one per usable core) the torch threads of each
# command. Every evaluation keeps per-example state in OUT_DIR, so an interrupted run
# resumes; a finished one is not recomputed. With the defaults this takes
# hours on a 2-core CPU for a class-embedding model (48 network evaluations per
# classification); N=10 takes about an hour.
set -euo pipefail
out=${1:-runs/eval}
n=${N:-50}
n_cnn=${N_CNN:-200}
threads=${THREADS:-0}
mkdir -p "$out"

run() {  # run NAME ARGS...: one `rdc eval` with its report, log and state under $out
    local name=$1; shift
    if [[ -f "$out/$name.json" ]]; then echo "have $out/$name.json"; return; fi
    echo "+ rdc eval $* ($name)"
    rdc eval --dataset mnist --split test "$@" --threads "$threads" --state "$out/$name.state.jsonl" \
        --out "$out/$name.json" --log "$out/$name.log"
}

# 100-step attacks at eps 0.3 (the headline figures)
run cnn-apgd-ce-0.3-s100-n$n_cnn --n $n_cnn --defense cnn --attack apgd-ce --eps 0.3 --steps 100
run dc-apgd-ce-0.3-s100-n$n --n $n --defense dc --attack apgd-ce --eps 0.3 --steps 100 --batch-size 25
run rdc-apgd-ce-0.3-s100-n$n --n $n --defense rdc --grad exact --attack apgd-ce --eps 0.3 --steps 100 --batch-size 25

# eps sweeps: robust accuracy must not increase with eps
for eps in 0.1 0.2; do
    run cnn-apgd-ce-$eps-s100-n$n_cnn --n $n_cnn --defense cnn --attack apgd-ce --eps $eps --steps 100
done
for eps in 0.1 0.2 0.3; do
    run dc-apgd-ce-$eps-s20-n$n --n $n --defense dc --attack apgd-ce --eps $eps --steps 20 --batch-size 25
    run rdc-apgd-ce-$eps-s20-n$n --n $n --defense rdc --grad exact --attack apgd-ce --eps $eps --steps 20 --batch-size 25
done

# gradient-masking checks of the full RDC at eps 0.3 (docs/architecture.md, evaluation rules): a large eps must
# break it, BPDA and a transfer attack from the CNN must not beat the exact white-box
# attack, and doubling the iterations must not change the result much; `smooth` replaces
# the zero derivative of the LM's sign steps by that of tanh (see core/rdc.py)
run rdc-apgd-ce-0.6-s20-n$n --n $n --defense rdc --grad exact --attack apgd-ce --eps 0.6 --steps 20 --batch-size 25
run rdc-apgd-ce-0.3-s40-n$n --n $n --defense rdc --grad exact --attack apgd-ce --eps 0.3 --steps 40 --batch-size 25
run rdc-bpda-apgd-ce-0.3-s100-n$n --n $n --defense rdc --grad bpda --attack apgd-ce --eps 0.3 --steps 100 --batch-size 25
run rdc-smooth-apgd-ce-0.3-s100-n$n --n $n --defense rdc --grad smooth --attack apgd-ce --eps 0.3 --steps 100 --batch-size 25
run rdc-transfer-0.3-s100-n$n --n $n --defense rdc --attack transfer --eps 0.3 --steps 100 --batch-size 25

# `rdc attack` on the first test digit: wall time, per-step cost and peak memory
python - "$out/digit.png" <<'PY'
import sys
from rdc_studio.core.data import load_dataset
from rdc_studio.core.images import save_png_atomic
data = load_dataset("mnist", "test")
save_png_atomic(data.float_images(slice(0, 1))[0].numpy(), sys.argv[1])
PY
/usr/bin/time -v rdc attack "$out/digit.png" --threads "$threads" --defense rdc --attack apgd-ce --eps 0.3 --steps 100 --grad exact \
    --out "$out/digit-adv.png" --report "$out/digit-attack.json" 2> "$out/digit-attack.time"
grep -E "Maximum resident|Elapsed" "$out/digit-attack.time"
python - "$out" "$n" <<'PY'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
print(f"{'evaluation':34s} {'n':>4s} {'clean':>6s} {'robust':>6s}  95% CI        s/img")
for p in sorted(out.glob("*-0.[0-9]-s*-n*.json")):
    r = json.loads(p.read_text())
    lo, hi = r["robust_ci95"]
    print(f"{p.stem:34s} {r['n']:4d} {r['clean_acc']:6.3f} {r['robust_acc']:6.3f}  {lo:.3f}-{hi:.3f}  {r['seconds_per_image']:6.1f}")

# the full RDC at eps 0.3: the per-example worst case over its white-box attacks
from rdc_studio.core.evaluate import wilson_interval
states = sorted(out.glob(f"rdc-*apgd-ce-0.3-s100-n{n}.state.jsonl"))
survived = None
for path in states:
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    ok = {r["index"] for r in rows if r["robust_correct"]}
    survived = ok if survived is None else survived & ok
if survived is not None:
    lo, hi = wilson_interval(len(survived), n)
    print(f"RDC eps 0.3, worst case over {', '.join(p.name.split('-apgd')[0] for p in states)}: "
          f"{len(survived) / n:.3f} (95% CI {lo:.3f}-{hi:.3f}) on n={n}")
PY
