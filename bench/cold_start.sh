#!/usr/bin/env bash
# Cold start on ml-100k: for items and for users, write the cold dataset, train the default
# model on it and evaluate the cold ids only (model, popularity, random; EASE and ALS n/a).
# Usage: bash bench/cold_start.sh [WORK_DIR [MODES]]   (MODES: "items users" by default;
# writes bench/results/cold_ml100k_MODE.{json,txt})
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=${1:-artifacts/cold}
modes=${2:-items users}
retrieval=.venv/bin/retrieval
mkdir -p "$work" bench/results
[ -f "$work/data/schema.json" ] || $retrieval data prepare ml-100k --out "$work/data"
for mode in $modes; do
    data="$work/data-cold-$mode" model="$work/model-cold-$mode"
    [ -f "$data/schema.json" ] || $retrieval data cold "$mode" --data "$work/data" --out "$data"
    [ -f "$model/manifest.json" ] || $retrieval train --data "$data" --out "$model" --no-progress
    $retrieval evaluate --model "$model" --data "$data" --cold "$mode" --k 10,20,50,100 \
        --json "bench/results/cold_ml100k_$mode.json" --no-progress \
        | tee "bench/results/cold_ml100k_$mode.txt"
done
