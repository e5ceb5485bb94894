#!/usr/bin/env bash
# Quality check of the conditional VAE on real digits: the classic 784-400-20 recipe of
# configs/vae-mnist.toml and the same recipe conditioned on the digit (configs/cvae-mnist.toml),
# trained on MNIST-5k (the first 5,000 training digits) and evaluated on the 10,000 test digits
# by the IWAE bound, k = 1000 (the CVAE's bounds −log p(x|y)). Needs a release build
# (cargo build --release); fetches MNIST with scripts/mnist.py into $MNIST_DIR.
# Usage: scripts/cvae_vs_vae.sh [EPOCHS [SEEDS]]    e.g. scripts/cvae_vs_vae.sh 100 "0 1 2"
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-100}
seeds=${2:-0}
elbo=./target/release/elbo
data=${MNIST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/elbo/mnist}
python3 scripts/mnist.py "$data" 5000
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$elbo data convert --format idx --images "$data/train5000-images-idx3-ubyte.gz" \
  --labels "$data/train5000-labels-idx1-ubyte.gz" --out "$work/train.parquet" >/dev/null
$elbo data convert --format idx --images "$data/t10k-images-idx3-ubyte.gz" \
  --labels "$data/t10k-labels-idx1-ubyte.gz" --out "$work/test.parquet" >/dev/null
printf "%-6s %-14s %-14s %s\n" seed "VAE nll_iw" "CVAE nll_iw" "CVAE − VAE"
for seed in $seeds; do
  declare -A nll
  for kind in vae cvae; do
    run="$work/$kind-$seed"
    ELBO_LOG=warn $elbo train --config "configs/$kind-mnist.toml" --run-dir "$run" \
      --set data.train="$work/train.parquet" --set data.test="$work/test.parquet" \
      --set train.epochs="$epochs" --set run.seed="$seed" --set train.checkpoint_every=0 >/dev/null
    nll[$kind]=$($elbo eval --run-dir "$run" --iw-samples 1000 --json |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["nll_iw"])')
  done
  python3 -c "import sys; v, c = float(sys.argv[2]), float(sys.argv[3]); print(f'{sys.argv[1]:<6} {v:<14.2f} {c:<14.2f} {c - v:+.2f} nats')" \
    "$seed" "${nll[vae]}" "${nll[cvae]}"
done
