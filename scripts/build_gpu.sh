#!/usr/bin/env bash
# Builds the CUDA binaries that scripts/gpu_check.sh runs on a GPU machine, on a machine
# without a GPU: NVIDIA's toolkit and cuDNN from PyPI (scripts/cuda_root.sh, cached in
# CACHE_DIR, default ~/.cache/elbo-cuda), then `elbo` and the GPU tests (engine/tests/gpu.rs)
# twice: with `--features cuda` (elbo, gpu-tests) and with `--features cudnn`, whose
# convolutions run through cuDNN (elbo-cudnn, gpu-tests-cudnn; CUDNN=0 skips them). Each is
# stripped and xz-compressed into target/gpu-bin (the kernels' PTX makes them ~70 MB each;
# ~10 MB compressed). CUDA_COMPUTE_CAP (default 90: Hopper) picks the GPU generation the kernels
# are compiled for. They build in target/gpu, so the CPU build in target/release (which the
# other scripts run) is left as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
variants=(cuda:) root_args=()
case "${CUDNN:-1}" in
  1) variants+=(cudnn:-cudnn) root_args=(--cudnn) ;;
  0) ;;
  *)
    echo "error: CUDNN is '$CUDNN'; expected 1 (build the cuDNN variant too) or 0" >&2
    exit 2
    ;;
esac
eval "$(scripts/cuda_root.sh "${CACHE_DIR:-$HOME/.cache/elbo-cuda}" "${root_args[@]}")"
export LIBRARY_PATH="$CUDA_ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
rm -rf target/gpu-bin
mkdir -p target/gpu-bin
build=(--release --locked --target-dir target/gpu)
for variant in "${variants[@]}"; do
  features="${variant%%:*}" suffix="${variant#*:}"
  cargo build "${build[@]}" --features "$features" --bin elbo
  tests="$(cargo test "${build[@]}" --features "$features" -p elbo-engine --test gpu \
    --no-run --message-format json | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')"
  for pair in "target/gpu/release/elbo:elbo$suffix" "$tests:gpu-tests$suffix"; do
    src="${pair%%:*}" name="${pair##*:}"
    strip -o "target/gpu-bin/$name" "$src"
    xz -T0 -6 "target/gpu-bin/$name"
  done
done
ls -l target/gpu-bin
