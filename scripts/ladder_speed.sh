#!/usr/bin/env bash
# Speed of the ladder VAE's training step beside its PyTorch twin, interleaved: ROUNDS rounds
# (default 5), each `elbo bench train` of configs/ladder-mnist.toml (batch 100, 28 px) and then
# `scripts/ladder_twin.py step` (2 threads); prints each round's samples/s and ratio, then the
# median ratio and its range. BATCH_NORM=1 times both with batch norm in every hidden layer.
# Needs a release build (cargo build --release) and a Python with torch (PYTHON;
# ../shared/reference/setup.sh makes one). Run it on an otherwise idle machine.
# Usage: [BATCH_NORM=1] scripts/ladder_speed.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
py=${PYTHON:-python3}
bn=${BATCH_NORM:-0}
elbo=./target/release/elbo
extra=()
steps=200
if [ "$bn" = 1 ]; then
  extra=(--set model.ladder.batch_norm=true)
  steps=50
fi
rate() { python3 -c "import json, sys; print(round(json.load(sys.stdin)['samples_per_s']))"; }
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for round in $(seq "$rounds"); do
  ours=$($elbo bench train --config configs/ladder-mnist.toml --shape 1,28,28 --batch-size 100 \
    --steps "$steps" "${extra[@]}" --json 2>/dev/null | rate)
  twin=$(BN=$bn "$py" scripts/ladder_twin.py step 100 200 2 | rate)
  echo "$ours $twin" >> "$results"
  echo "round $round: elbo $ours, twin $twin samples/s"
done
python3 - "$results" <<'PY'
import statistics, sys
pairs = [tuple(map(int, l.split())) for l in open(sys.argv[1])]
ratios = sorted(a / b for a, b in pairs)
print(f"elbo / twin: {statistics.median(ratios):.2f}x median ({ratios[0]:.2f}-{ratios[-1]:.2f}, "
      f"{len(ratios)} interleaved rounds)")
PY
