#!/usr/bin/env bash
# Quality check on real digits: elbo vs PyTorch, same model, optimiser, batch size, epochs and
# data; both report the test NLL by the IWAE bound with k = 1000. Fails if they differ by more
# than 1 nat. Needs a Python with torch, numpy and mlxtend (PYTHON, default python3), and a
# release build (cargo build --release).
# Usage: scripts/quality_vs_torch.sh [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-30}
py=${PYTHON:-python3}
elbo=./target/release/elbo
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

torch_json=$("$py" scripts/quality_vs_torch.py "$work" "$epochs")
$elbo data convert --format npy --images "$work/x_train.npy" --labels "$work/y_train.npy" --shape 1,28,28 --out "$work/train.parquet" >/dev/null
$elbo data convert --format npy --images "$work/x_test.npy" --labels "$work/y_test.npy" --shape 1,28,28 --out "$work/test.parquet" >/dev/null
ELBO_LOG=warn $elbo train --config configs/vae-mnist.toml --run-dir "$work/run" \
  --set data.train="$work/train.parquet" --set data.test="$work/test.parquet" \
  --set train.epochs="$epochs" --set model.log_var_clamp=30 --set train.checkpoint_every=0 >/dev/null
elbo_json=$($elbo eval --run-dir "$work/run" --iw-samples 1000 --json)

echo "pytorch: $torch_json"
echo "elbo:    $(echo "$elbo_json" | tr -d '\n ')"
"$py" - "$torch_json" "$elbo_json" <<'PY'
import json, sys
t, e = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = e["nll_iw"] - t["nll_iw"]
print(f"test NLL (IW, k=1000): elbo {e['nll_iw']:.2f}  pytorch {t['nll_iw']:.2f}  difference {d:+.2f} nats")
sys.exit(0 if abs(d) <= 1.0 else 1)
PY
