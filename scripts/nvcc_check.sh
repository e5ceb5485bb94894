#!/usr/bin/env bash
# nvcc for builds that link nothing (`cargo check`, `cargo clippy --features cuda`): CI's CUDA
# stage sets NVCC to this script and ELBO_REAL_NVCC to the toolkit's nvcc.
#
# Every kernel candle loads as PTX — the ones elbo's ops run on a GPU — is compiled by the real
# nvcc, unchanged. candle-kernels also compiles quantized-LLM kernels (GGUF matmuls and MoE:
# src/moe/, src/mmq_gguf/, src/mmvq_gguf.cu) into a static library, libmoe.a, that elbo never
# calls: 17 of nvcc's 18 minutes on 2 cores. Here each of those compiles, with the same flags,
# as an empty file instead. A check build never reads the library. So that no later build that
# links can pick the stand-ins up, they are deleted once the library is archived: the build
# helper (cudaforge) recompiles an object that is missing, so the next build with the real nvcc
# compiles every kernel again.
set -euo pipefail
real="${ELBO_REAL_NVCC:?ELBO_REAL_NVCC must name the toolkit nvcc this script stands in for}"
args=("$@")
last="${args[${#args[@]} - 1]:-}"
compile=0 lib=0 out=
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
  -c) compile=1 ;;
  --lib) lib=1 ;;
  -o) out="${args[i + 1]:-}" ;;
  esac
done

if [ "$compile" = 1 ] && [ -n "$out" ]; then
  case "$last" in
  src/moe/*.cu | src/mmq_gguf/*.cu | src/mmvq_gguf.cu | */src/moe/*.cu | */src/mmq_gguf/*.cu | */src/mmvq_gguf.cu)
    empty="$(mktemp -d)"
    trap 'rm -rf "$empty"' EXIT
    echo '/* a stand-in: see scripts/nvcc_check.sh */' >"$empty/stand_in.cu"
    args[${#args[@]} - 1]="$empty/stand_in.cu"
    "$real" "${args[@]}"
    touch "$out.stand-in"
    exit
    ;;
  esac
fi

if [ "$lib" = 1 ]; then
  "$real" "$@"
  for a in "$@"; do
    if [ -f "$a.stand-in" ]; then
      rm -f "$a" "$a.stand-in"
    fi
  done
  exit
fi
exec "$real" "$@"
