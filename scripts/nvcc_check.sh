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
if [ ! -x "$real" ]; then
  echo "error: ELBO_REAL_NVCC=$real is not an executable nvcc" >&2
  exit 2
fi
compile=0 lib=0 out=
args=("$@")
for ((i = 0; i < $#; i++)); do
  case "${args[i]}" in
  -c) compile=1 ;;
  --lib) lib=1 ;;
  -o) out="${args[i + 1]:-}" ;;
  esac
done

# The source is the last argument; a leading / lets one pattern match relative paths too.
if [ "$compile" = 1 ] && [ -n "$out" ]; then
  case "/${*: -1}" in
  */src/moe/*.cu | */src/mmq_gguf/*.cu | */src/mmvq_gguf.cu)
    empty="$(mktemp -d)"
    trap 'rm -rf "$empty"' EXIT
    echo '/* a stand-in: see scripts/nvcc_check.sh */' >"$empty/stand_in.cu"
    "$real" "${@:1:$#-1}" "$empty/stand_in.cu"
    touch "$out.stand-in"
    exit
    ;;
  esac
fi

if [ "$lib" = 1 ]; then
  # The stand-ins go whether or not archiving succeeds: cudaforge has already recorded them
  # as compiled.
  status=0
  "$real" "$@" || status=$?
  for a in "$@"; do
    if [ -f "$a.stand-in" ]; then
      rm -f "$a" "$a.stand-in"
    fi
  done
  exit "$status"
fi
exec "$real" "$@"
