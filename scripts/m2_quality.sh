#!/usr/bin/env bash
# Quality check of M2 on real digits with 100 labels (10 per class): elbo's configs/m2-mnist.toml
# beside its PyTorch twin and a classifier of the same architecture trained on the 100 labels
# alone (scripts/m2_twin.py), all on the same 100 labeled digits (the twin picks them; elbo reads
# them from the converted data, labels -1 elsewhere) and reported as test accuracy on the 10,000
# test digits, epoch by epoch and at the end. Needs a release build (cargo build --release) and
# a Python with torch and numpy (PYTHON; ../shared/reference/setup.sh makes one); fetches MNIST
# with scripts/mnist.py.
# Usage: scripts/m2_quality.sh [EPOCHS [ALPHA [SEED [LR]]]]
#   (defaults 20, 100, 0 and 2e-3, the config's)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-20}
alpha=${2:-100}
seed=${3:-0}
lr=${4:-2e-3}
py=${PYTHON:-python3}
elbo=./target/release/elbo
data=${MNIST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/elbo/mnist}
python3 scripts/mnist.py "$data"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$py" scripts/m2_twin.py "$data" "$work" "$epochs" "$seed" "$alpha" "$lr" | tee "$work/twin.jsonl"
for split in train test; do
  $elbo data convert --format npy --images "$work/x_$split.npy" --labels "$work/y_$split.npy" \
    --out "$work/$split.parquet" >/dev/null
done
start=$(date +%s)
ELBO_LOG=warn $elbo train --config configs/m2-mnist.toml --run-dir "$work/run" \
  --set data.train="$work/train.parquet" --set data.test="$work/test.parquet" \
  --set data.labeled_per_class=0 --set model.m2.alpha="$alpha" --set train.lr="$lr" \
  --set run.seed="$seed" --set train.epochs="$epochs" --set train.checkpoint_every=0 >/dev/null
seconds=$(( $(date +%s) - start ))
elbo_json=$($elbo eval --run-dir "$work/run" --iw-samples 1 --json)
"$py" - "$work/twin.jsonl" "$elbo_json" "$epochs" "$alpha" "$seconds" "$work/run/metrics.jsonl" "$lr" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
curve = [m["test_accuracy"] for m in map(json.loads, open(sys.argv[6])) if "test_accuracy" in m]
twins = [l["accuracy"] for l in lines if l["impl"] == "pytorch m2"]
print("epoch  elbo    twin   (test accuracy at the end of each epoch)")
for i, (a, b) in enumerate(zip(curve, twins)):
    print(f"{i + 1:5d}  {a:.4f}  {b:.4f}")
base = next(l for l in lines if l["impl"] == "labels-only classifier")
twin = [l for l in lines if l["impl"] == "pytorch m2"][-1]
e = json.loads(sys.argv[2])
print(f"MNIST, 100 labels, {sys.argv[3]} epochs, alpha {sys.argv[4]}, lr {sys.argv[7]}: test accuracy")
print(f"  elbo m2                   {e['accuracy']:.4f}   ({sys.argv[5]} s)")
print(f"  pytorch twin              {twin['accuracy']:.4f}   ({twin['seconds']} s)")
print(f"  labels-only classifier    {base['accuracy']:.4f}")
print(f"  elbo − labels only        {100 * (e['accuracy'] - base['accuracy']):+.1f} points")
PY
