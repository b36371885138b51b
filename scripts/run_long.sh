#!/usr/bin/env bash
# The papers' headline claims at real length, one run after another (full Fashion-MNIST, 60,000 images).
#
#   OUT=runs/long scripts/run_long.sh          # start, or continue after an interruption: the same command
#
# Each run saves an arm's row as the arm finishes and fit() checkpoints inside the arm (every epoch and
# every 100 steps), and is started with --resume, so rerunning this script continues where it stopped.
# Runs at nice 19 with THREADS torch threads each (default 1): meant for a shared machine, in the background:
#   nohup scripts/run_long.sh > runs/long/queue.log 2>&1 &
# Logs: $OUT/{lc,partial}.log and $OUT/ensembles_s{0,1,2}.log; results: $OUT/lc/accuracy_vs_expansion.json,
# $OUT/partial.json, $OUT/ensembles_s{0,1,2}.json (each grows by one row per finished arm).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/long}
PY=${PY:-python}
THREADS=${THREADS:-1}
EPOCHS=${EPOCHS:-15}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

run() {  # run NAME ARGS...: one script at nice 19, its output in $OUT/NAME.log; a failure does not stop the queue
  local name=$1; shift
  echo "$(date -u +%FT%TZ) start $name: $*"
  local rc=0
  nice -n 19 "$PY" "$@" --threads "$THREADS" --resume >> "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then  # rc kept apart: $? inside a string after $(date) would be date's status
    echo "$(date -u +%FT%TZ) done $name"
  else
    echo "$(date -u +%FT%TZ) FAILED $name (exit $rc): see $OUT/$name.log"
  fi
}

# (a) LC paper: frozen random LCResNet-20-16x{1,8,128} (1x1s + BN + head learned) vs learned ResNet-20-16,
#     the paper's recipe (batch 256, lr 1e-2, weight decay 1e-2, cosine, label smoothing, crop/flip)
run lc scripts/reproduce_lc.py --paper --epochs "$EPOCHS" --expansions 1,8,128 --frozen-only --learned-resnet \
    --train-subset 0 --test-subset 0 --out "$OUT/lc"
# (b) partial learning: Filters(0.1) + BN + head vs everything learned, the project's recipe
run partial scripts/reproduce_partial.py --epochs "$EPOCHS" --spec "Filters(0.1)+BatchNorm()+Head()" \
    --spec "Full()" --train-subset 0 --out "$OUT/partial.json"
# (c) the partial-learning paper's Table 4, its recipe: the full net trains 1 epoch, then K=5 members of each
#     slice kind train 1 more epoch each from it (FC / Filters 0.1, 0.4, 0.7 / Full), seeds 0, 1 and 2
for seed in 0 1 2; do
  run "ensembles_s$seed" scripts/reproduce_ensembles.py --members 5 --warm-start-epochs 1 --epochs 1 \
      --train-subset 0 --test-subset 0 --seed "$seed" --out "$OUT/ensembles_s$seed.json"
done
echo "$(date -u +%FT%TZ) queue finished"
