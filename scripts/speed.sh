#!/usr/bin/env bash
# Speed of a model's training step beside its PyTorch twin, interleaved: ROUNDS rounds (default
# 5), each `elbo bench train` on a fixed synthetic batch and then the twin's step on a fixed
# batch of the same shape, 2 threads each; prints each round's samples/s and ratio, then the
# median ratio and its range.
#   vae          the MLP VAE 784-400-20, batch 128    beside ../shared/reference/torch_vae_step.py
#   ladder       configs/ladder-mnist.toml, batch 100   beside scripts/ladder_twin.py step
#   ladder-bn    the same with batch norm in every hidden layer (BN=1 for the twin)
#   vqvae        configs/vqvae-mnist.toml, batch 128    beside scripts/vqvae_twin.py step
#   m2           configs/m2-mnist.toml, batch 200       beside scripts/m2_step.py
#   prior        configs/vqvae-prior-mnist.toml, batch 128 beside scripts/code_prior_twin.py step
#                (needs the trained VQ-VAE at runs/vqvae-mnist that the config names)
#   conv-S-B     the conv VAE at S px (28, 32 or 64), batch B, beside
#                ../shared/reference/torch_conv_vae_step.py (dense 256, z 10)
# Needs a release build (cargo build --release) and a Python with torch (PYTHON;
# ../shared/reference/setup.sh makes one). Run it on an otherwise idle machine.
# Usage: scripts/speed.sh MODEL [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/speed.sh vae|ladder|ladder-bn|vqvae|m2|prior|conv-SIDE-BATCH [ROUNDS]"
model=${1:?$usage}
rounds=${2:-5}
if ! [[ $rounds =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage: ROUNDS is a positive count, found '$rounds'" >&2
  exit 2
fi
py=${PYTHON:-python3}
elbo=./target/release/elbo
shared=../shared/reference
case $model in
  vae)
    ours=($elbo bench train --batch-size 128 --steps 200)
    twin=(env BS=128 STEPS=200 THREADS=2 "$py" "$shared/torch_vae_step.py") ;;
  ladder | ladder-bn)
    bn=0 steps=200 extra=()
    if [ "$model" = ladder-bn ]; then bn=1 steps=50 extra=(--set model.ladder.batch_norm=true); fi
    ours=($elbo bench train --config configs/ladder-mnist.toml --shape 1,28,28 --batch-size 100
      --steps "$steps" "${extra[@]}")
    twin=(env BN=$bn "$py" scripts/ladder_twin.py step 100 200 2) ;;
  vqvae)
    ours=($elbo bench train --config configs/vqvae-mnist.toml --shape 1,28,28 --batch-size 128
      --steps 60)
    twin=("$py" scripts/vqvae_twin.py step 128 60 2) ;;
  m2)
    ours=($elbo bench train --config configs/m2-mnist.toml --shape 1,28,28 --batch-size 200
      --steps 100)
    twin=("$py" scripts/m2_step.py 200 100 2) ;;
  prior)
    [ -d runs/vqvae-mnist ] || {
      echo "prior: train the VQ-VAE first: elbo train --config configs/vqvae-mnist.toml" >&2
      exit 2
    }
    ours=($elbo bench train --config configs/vqvae-prior-mnist.toml --shape 1,28,28
      --batch-size 128 --steps 10)
    twin=("$py" scripts/code_prior_twin.py step 128 10 2) ;;
  conv-*-*)
    IFS=- read -r _ side batch <<< "$model"
    case $side in 28 | 32 | 64) ;; *) echo "$usage: SIDE is 28, 32 or 64" >&2; exit 2 ;; esac
    [[ $batch =~ ^[1-9][0-9]*$ ]] || { echo "$usage: BATCH is a positive count" >&2; exit 2; }
    steps=$([ "$side" = 64 ] && echo 30 || echo 50)
    ours=($elbo bench train --shape "1,$side,$side" --set model.architecture=conv
      --set 'model.hidden=[256]' --set model.latent_dim=10 --batch-size "$batch" --steps "$steps")
    twin=(env SIDE="$side" BS="$batch" STEPS="$steps" THREADS=2 "$py" "$shared/torch_conv_vae_step.py") ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
# The twins print JSON, or (the shared references) a line with "N samples/s".
rate() {
  python3 -c "
import json, re, sys
text = sys.stdin.read()
try:
    print(round(json.loads(text)['samples_per_s']))
except ValueError:
    print(round(float(re.findall(r'([0-9.]+) samples/s', text)[-1])))"
}
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for round in $(seq "$rounds"); do
  a=$("${ours[@]}" --json 2>/dev/null | rate)
  b=$("${twin[@]}" | rate)
  echo "$a $b" >> "$results"
  echo "round $round: elbo $a, twin $b samples/s"
done
python3 - "$results" "$model" <<'PY'
import statistics, sys
pairs = [tuple(map(int, l.split())) for l in open(sys.argv[1])]
ratios = sorted(a / b for a, b in pairs)
print(f"{sys.argv[2]}: elbo / twin {statistics.median(ratios):.2f}x median "
      f"({ratios[0]:.2f}-{ratios[-1]:.2f}, {len(ratios)} interleaved rounds; elbo "
      f"{min(a for a, _ in pairs)}-{max(a for a, _ in pairs)}, twin "
      f"{min(b for _, b in pairs)}-{max(b for _, b in pairs)} samples/s)")
PY
