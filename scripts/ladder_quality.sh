#!/usr/bin/env bash
# Quality check of the ladder VAE on full MNIST at an equal budget: configs/ladder-mnist.toml
# beside the one-layer VAE of configs/vae-mnist.toml, both for EPOCHS epochs with the same
# optimiser and batch, and the ladder's PyTorch twin (scripts/ladder_twin.py, the same recipe):
# test IW bound (k = 1000, −log p(x) in nats), −ELBO, and the ladder's KL and active units per
# layer. Needs a release build (cargo build --release) and a Python with torch and numpy
# (PYTHON; ../shared/reference/setup.sh makes one); fetches MNIST with scripts/mnist.py.
# BATCH_NORM=1 builds the ladder and its twin with batch norm in every hidden dense layer.
# Usage: [BATCH_NORM=1] scripts/ladder_quality.sh [EPOCHS [SEED]]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-10}
seed=${2:-0}
py=${PYTHON:-python3}
bn=${BATCH_NORM:-0}
elbo=./target/release/elbo
data=${MNIST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/elbo/mnist}
python3 scripts/mnist.py "$data"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for split in train t10k; do
  $elbo data convert --format idx --images "$data/$split-images-idx3-ubyte.gz" \
    --labels "$data/$split-labels-idx1-ubyte.gz" --out "$work/$split.parquet" >/dev/null
done

# run NAME CONFIG [--set K=V…]: trains CONFIG for the budget, prints its `elbo eval --json` on
# one line.
run() {
  local name=$1 config=$2 start seconds
  shift 2
  start=$(date +%s)
  ELBO_LOG=warn $elbo train --config "$config" --run-dir "$work/$name" "$@" \
    --set data.train="$work/train.parquet" --set data.test="$work/t10k.parquet" \
    --set run.seed="$seed" --set train.epochs="$epochs" --set train.checkpoint_every=0 >/dev/null
  seconds=$(( $(date +%s) - start ))
  $elbo eval --run-dir "$work/$name" --iw-samples 1000 --json |
    "$py" -c "import json, sys; print(json.dumps({'name': '$name', 'seconds': $seconds, **json.load(sys.stdin)}))"
}

{
  run vae configs/vae-mnist.toml
  if [ "$bn" = 1 ]; then
    run ladder configs/ladder-mnist.toml --set model.ladder.batch_norm=true
  else
    run ladder configs/ladder-mnist.toml
  fi
  BN=$bn "$py" scripts/ladder_twin.py train "$data" "$epochs" "$seed" | tail -1
} | tee "$work/results.jsonl"

"$py" - "$work/results.jsonl" "$epochs" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"MNIST, {sys.argv[2]} epochs, test set of 10,000 (nats)")
print(f"{'':22} {'IW bound k=1000':>15} {'−ELBO':>8} {'KL per layer':>18} {'active units':>13}")
for r in rows:
    name = {"vae": "elbo VAE (1 layer)", "ladder": "elbo ladder"}.get(r.get("name"), "pytorch twin ladder")
    kl = " / ".join(f"{k:.1f}" for k in r.get("kl_layers", [r.get("kl", float("nan"))]))
    au = " / ".join(str(int(a)) for a in r.get("active_units_layers", [r.get("active_units", 0)])) if "active_units" in r or "active_units_layers" in r else "-"
    print(f"{name:22} {r['nll_iw']:>15.2f} {r['neg_elbo']:>8.2f} {kl:>18} {au:>13}")
PY
