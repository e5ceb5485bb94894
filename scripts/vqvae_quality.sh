#!/usr/bin/env bash
# Quality check of the VQ-VAE on full MNIST: configs/vqvae-mnist.toml trained for 1,000 steps
# beside its PyTorch twin (scripts/vqvae_twin.py, the same recipe), test NMSE and codes used on
# the 10,000 test digits; the same with the codebook k-means initialised on the first batch
# (model.vqvae.init = "kmeans", the twin's --kmeans 10); then the recovery of a codebook
# initialised far from the data (model.vqvae.init_offset = 10) over 500 steps, with dead-code
# restarts and without, and with k-means (which does not start from those codes).
# Needs a release build (cargo build --release) and a Python with torch and numpy (PYTHON;
# ../shared/reference/setup.sh makes one); fetches MNIST with scripts/mnist.py.
# Usage: scripts/vqvae_quality.sh [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${1:-0}
py=${PYTHON:-python3}
elbo=./target/release/elbo
data=${MNIST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/elbo/mnist}
python3 scripts/mnist.py "$data"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for split in train t10k; do
  $elbo data convert --format idx --images "$data/$split-images-idx3-ubyte.gz" \
    --labels "$data/$split-labels-idx1-ubyte.gz" --out "$work/$split.parquet" >/dev/null
done

# elbo RUN STEPS [--set k=v …]: trains configs/vqvae-mnist.toml, prints `elbo eval --json`.
run() {
  local name=$1 steps=$2
  shift 2
  local start
  start=$(date +%s)
  ELBO_LOG=warn $elbo train --config configs/vqvae-mnist.toml --run-dir "$work/$name" \
    --set data.train="$work/train.parquet" --set data.test="$work/t10k.parquet" \
    --set run.seed="$seed" --set train.checkpoint_every=0 --max-steps "$steps" "$@" >/dev/null
  local seconds=$(( $(date +%s) - start ))
  $elbo eval --run-dir "$work/$name" --json |
    "$py" -c "import json, sys; print(json.dumps({'seconds': $seconds, 'eval': json.load(sys.stdin)}))"
}

{
  echo "{\"elbo\": \"recipe\", \"run\": $(run recipe 1000)}"
  echo "{\"twin\": \"recipe\", \"run\": $("$py" scripts/vqvae_twin.py train "$data" 1000 "$seed")}"
  echo "{\"elbo\": \"k-means\", \"run\": $(run kmeans 1000 --set model.vqvae.init=kmeans)}"
  echo "{\"twin\": \"k-means\", \"run\": $("$py" scripts/vqvae_twin.py train "$data" 1000 "$seed" --kmeans 10)}"
  echo "{\"elbo\": \"far, restart\", \"run\": $(run far 500 --set model.vqvae.init_offset=10)}"
  echo "{\"elbo\": \"far, no restart\", \"run\": $(run far-off 500 --set model.vqvae.init_offset=10 \
    --set model.vqvae.restart_threshold=0)}"
  echo "{\"twin\": \"far, restart\", \"run\": $("$py" scripts/vqvae_twin.py train "$data" 500 "$seed" --offset 10)}"
  echo "{\"twin\": \"far, no restart\", \"run\": $("$py" scripts/vqvae_twin.py train "$data" 500 "$seed" --offset 10 --no-restart)}"
  echo "{\"elbo\": \"far, k-means\", \"run\": $(run far-km 500 --set model.vqvae.init_offset=10 \
    --set model.vqvae.init=kmeans)}"
} | tee "$work/results.jsonl"

"$py" - "$work/results.jsonl" <<'PY'
import json, sys
print("MNIST VQ-VAE (K 128, D 16, 7×7 grid), test set of 10,000")
print(f"{'':28} {'steps':>5} {'NMSE':>7} {'MSE':>8} {'codes used':>10} {'perplexity':>10} {'seconds':>7}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    who = "elbo" if "elbo" in r else "pytorch twin"
    what = r.get("elbo") or r.get("twin")
    run = r["run"]
    e = run.get("eval", run)
    steps = 1000 if what in ("recipe", "k-means") else 500
    print(f"{who + ', ' + what:28} {steps:>5} {e['nmse']:>7.4f} {e['mse']:>8.5f} "
          f"{e['codes_used']:>10} {e['perplexity']:>10.1f} {run['seconds']:>7}")
PY
