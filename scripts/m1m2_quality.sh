#!/usr/bin/env bash
# Quality check of M1+M2 on real digits with 100 labels (10 per class): trains M1
# (configs/m1-mnist.toml) on all of MNIST's training digits, then M2 on its features
# (configs/m1m2-mnist.toml) for each labeled subset, and reports the classifier's test accuracy
# on the 10,000 test digits epoch by epoch. A subset's SEED picks the same 100 labeled digits as
# scripts/m2_quality.sh's (scripts/mnist_subset.py), so the figures sit beside M2's on pixels.
# Needs a release build (cargo build --release) and a Python with numpy (PYTHON); fetches MNIST
# with scripts/mnist.py. M1_RUN=DIR reuses a trained M1 run instead of training one.
# Usage: scripts/m1m2_quality.sh [SEED ...]   (default: 0 1 2)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then seeds=("$@"); else seeds=(0 1 2); fi
py=${PYTHON:-python3}
elbo=./target/release/elbo
data=${MNIST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/elbo/mnist}
python3 scripts/mnist.py "$data"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

m1=${M1_RUN:-}
if [ -z "$m1" ]; then
  m1=$work/m1
  for split in train t10k; do
    $elbo data convert --format idx --images "$data/$split-images-idx3-ubyte.gz" \
      --labels "$data/$split-labels-idx1-ubyte.gz" --out "$work/mnist-$split.parquet" >/dev/null
  done
  start=$(date +%s)
  ELBO_LOG=warn $elbo train --config configs/m1-mnist.toml --run-dir "$m1" \
    --set data.train="$work/mnist-train.parquet" --set data.test="$work/mnist-t10k.parquet" \
    --set train.checkpoint_every=0 >/dev/null
  echo "M1 trained in $(( $(date +%s) - start )) s"
fi
echo "M1 ($m1) on the test digits:" $($elbo eval --run-dir "$m1" --iw-samples 1 --json)

for seed in "${seeds[@]}"; do
  sub=$work/subset-$seed
  "$py" scripts/mnist_subset.py "$data" "$sub" "$seed"
  for split in train test; do
    $elbo data convert --format npy --images "$sub/x_$split.npy" --labels "$sub/y_$split.npy" \
      --out "$sub/$split.parquet" >/dev/null
  done
  start=$(date +%s)
  ELBO_LOG=warn $elbo train --config configs/m1m2-mnist.toml --run-dir "$sub/run" \
    --set model.m2.features_from="$m1" --set data.train="$sub/train.parquet" \
    --set data.test="$sub/test.parquet" --set data.labeled_per_class=0 \
    --set run.seed="$seed" --set train.checkpoint_every=0 >/dev/null
  seconds=$(( $(date +%s) - start ))
  "$py" - "$sub/run/metrics.jsonl" "$($elbo eval --run-dir "$sub/run" --iw-samples 1 --json)" \
    "$seed" "$seconds" <<'PY'
import json, sys
curve = [m["test_accuracy"] for m in map(json.loads, open(sys.argv[1])) if "test_accuracy" in m]
print(f"subset {sys.argv[3]}: test accuracy by epoch", " ".join("%.4f" % a for a in curve))
accuracy = json.loads(sys.argv[2])["accuracy"]
print(f"subset {sys.argv[3]}: M1+M2 test accuracy {accuracy:.4f} ({sys.argv[4]} s)")
PY
done
