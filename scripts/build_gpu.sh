#!/usr/bin/env bash
# Builds the CUDA binaries that scripts/gpu_check.sh runs on a GPU machine, on a machine
# without a GPU: NVIDIA's toolkit from PyPI (scripts/cuda_root.sh, cached in CACHE_DIR, default
# ~/.cache/elbo-cuda), then `elbo` and the GPU tests (engine/tests/gpu.rs) with
# `--features cuda`, stripped and xz-compressed into target/gpu-bin (the kernels' PTX makes them
# ~70 MB each; ~10 MB compressed). CUDA_COMPUTE_CAP (default 90: Hopper) picks the
# GPU generation the kernels are compiled for.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda_root.sh "${CACHE_DIR:-$HOME/.cache/elbo-cuda}")"
export LIBRARY_PATH="$CUDA_ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release --locked --features cuda --bin elbo
tests="$(cargo test --release --locked --features cuda -p elbo-engine --test gpu --no-run \
  --message-format json | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')"
rm -rf target/gpu-bin
mkdir -p target/gpu-bin
for pair in "target/release/elbo:elbo" "$tests:gpu-tests"; do
  src="${pair%%:*}" name="${pair##*:}"
  strip -o "target/gpu-bin/$name" "$src"
  xz -T0 -6 "target/gpu-bin/$name"
done
ls -l target/gpu-bin
