#!/usr/bin/env bash
# Quality check of the prior over VQ codes on full MNIST: configs/vqvae-mnist.toml trained for
# 1,000 steps, then configs/vqvae-prior-mnist.toml on its codes for EPOCHS epochs, beside the same
# pipeline in PyTorch (scripts/code_prior_twin.py on the codes of scripts/vqvae_twin.py's
# VQ-VAE): test bits per code position (bits/dim) and NLL of the 10,000 test digits' codes, and
# the unigram baseline (log2 of the test codes' perplexity: each position's code drawn from the
# codes' frequencies). Writes elbo's samples through the prior and through the unigram baseline
# to OUT (default: code-prior-samples/). Needs a release build (cargo build --release) and a
# Python with torch and numpy (PYTHON; ../shared/reference/setup.sh makes one); fetches MNIST
# with scripts/mnist.py.
# Usage: scripts/code_prior_quality.sh [EPOCHS [SEED [OUT]]]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-3}
seed=${2:-0}
out=${3:-code-prior-samples}
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
common=(--set data.train="$work/train.parquet" --set data.test="$work/t10k.parquet"
  --set run.seed="$seed" --set train.checkpoint_every=0)

ELBO_LOG=warn $elbo train --config configs/vqvae-mnist.toml --run-dir "$work/vq" \
  "${common[@]}" --max-steps 1000 >/dev/null
vq=$($elbo eval --run-dir "$work/vq" --json)
start=$(date +%s)
ELBO_LOG=warn $elbo train --config configs/vqvae-prior-mnist.toml --run-dir "$work/prior" \
  "${common[@]}" --set model.code_prior.vq_run="$work/vq" --set train.epochs="$epochs" >/dev/null
seconds=$(( $(date +%s) - start ))
prior=$($elbo eval --run-dir "$work/prior" --json)
mkdir -p "$out"
$elbo sample --run-dir "$work/prior" --n 64 --seed "$seed" --out "$out/prior.png" >/dev/null
$elbo sample --run-dir "$work/vq" --n 64 --seed "$seed" --out "$out/unigram.png" >/dev/null
twin=$("$py" scripts/code_prior_twin.py train "$data" 1000 "$epochs" "$seed")

"$py" - "$vq" "$prior" "$seconds" "$twin" "$epochs" <<'PY'
import json, math, sys
vq, prior, seconds, twin, epochs = (json.loads(sys.argv[1]), json.loads(sys.argv[2]),
                                    sys.argv[3], json.loads(sys.argv[4]), sys.argv[5])
print(f"MNIST, VQ-VAE 1,000 steps (7×7 codes, K 128), prior {epochs} epochs; test set of 10,000")
print(f"{'':34} {'bits/dim':>8} {'nats/digit':>10} {'seconds':>7}")
print(f"{'elbo code_prior':34} {prior['bits_per_dim']:>8.3f} {prior['nll']:>10.2f} {seconds:>7}")
print(f"{'pytorch twin':34} {twin['bits_per_dim']:>8.3f} {twin['nll']:>10.2f} {twin['seconds']:>7}")
unigram = math.log2(vq["perplexity"])
print(f"{'unigram (elbo VQ codes, test)':34} {unigram:>8.3f} {unigram * 49 * math.log(2):>10.2f}")
print(f"elbo VQ: NMSE {vq['nmse']:.4f}, {vq['codes_used']} codes used")
PY
