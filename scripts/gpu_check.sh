#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, its driver and PyTorch (CUDA), and no Rust
# toolchain: give it the binaries `scripts/build_gpu.sh` built on another machine.
#
#   scripts/gpu_check.sh [BIN_DIR]   # BIN_DIR (default target/gpu-bin): elbo.xz, gpu-tests.xz
#                                    # and, if built, elbo-cudnn.xz, gpu-tests-cudnn.xz
#
# 1. the GPU tests: every model kind's loss and gradients equal the CPU's, 20 training steps
#    track the CPU's, sampling runs;
# 2. `elbo train` on the GPU: 20 steps track the same run on the CPU, and two workers sharing
#    the GPU train what one process trains;
# 3. `elbo bench train --device cuda:0` for the MLP VAE and the conv VAE at batch 128 and 1024,
#    interleaved with the same models in PyTorch eager on the same GPU (scripts/torch_gpu_step.py),
#    and the ratios.
# With the cuDNN build (`--features cudnn`) beside it, its GPU tests run too, at full FP32
# (NVIDIA_TF32_OVERRIDE=0: the CPU's numerics), and the conv benchmarks time it in each round
# as a third contender, with cuDNN's default math — TF32 allowed, as in PyTorch's convolutions.
# Writes logs and a summary to $OUT (default /tmp/elbo-gpu-check); exits non-zero if a check
# failed. One run takes a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
packed="${1:-target/gpu-bin}"
out="${OUT:-/tmp/elbo-gpu-check}"
rounds="${ROUNDS:-3}"
bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
mkdir -p "$out"
unpack() {
  python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' \
    "$packed/$1.xz" "$bin/$1" && chmod +x "$bin/$1" || {
    echo "error: cannot unpack $packed/$1.xz (build it with scripts/build_gpu.sh)" >&2
    exit 1
  }
}
unpack elbo
unpack gpu-tests
cudnn=0
if [ -f "$packed/elbo-cudnn.xz" ] || [ -f "$packed/gpu-tests-cudnn.xz" ]; then
  unpack elbo-cudnn
  unpack gpu-tests-cudnn
  cudnn=1
fi
summary="$out/summary.txt"
: >"$summary"
failed=0
say() { echo "$*" | tee -a "$summary"; }
check() {
  local name="$1"
  shift
  local start=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then
    say "ok    $name ($((SECONDS - start)) s)"
  else
    say "FAIL  $name ($((SECONDS - start)) s): see $name.log"
    tail -n 15 "$out/$name.log" | sed 's/^/      /' | tee -a "$summary"
    failed=1
  fi
}

# CUDA's user-space libraries (cuBLAS, cuRAND, NVRTC, cuDNN) come with PyTorch's wheels here.
libs="$(python3 - <<'EOF'
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ELBO_CACHE_DIR="$out/cache" NO_COLOR=1
say "== $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
say "== torch $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda)')"

check version "$bin/elbo" --version
check gpu-tests timeout 300 "$bin/gpu-tests" --test-threads 1 --nocapture
if [ "$cudnn" = 1 ]; then
  check version-cudnn "$bin/elbo-cudnn" --version
  check gpu-tests-cudnn env NVIDIA_TF32_OVERRIDE=0 timeout 300 "$bin/gpu-tests-cudnn" \
    --test-threads 1 --nocapture
fi

# `elbo train`: CPU, GPU, two workers sharing the GPU; 20 steps each, then compared.
train() {
  local dir="$out/runs/$1"
  shift
  rm -rf "$dir"
  timeout 120 "$bin/elbo" train --config configs/vae-sprites.toml --run-dir "$dir" --max-steps 20 \
    --set train.log_every=1 --set data.sprites.n=4000 "$@"
}
check train-cpu train cpu --device cpu
check train-gpu train gpu --device cuda:0
check train-gpu-2-workers train gpu2 --device cuda:0 --set cluster.workers=2
check train-compare python3 - "$out/runs" <<'EOF'
import array, glob, json, os, struct, sys
runs = sys.argv[1]

def losses(run):
    rows = [json.loads(l) for l in open(os.path.join(runs, run, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r and r.get("split", "train") == "train"]

def params(run):
    ck = sorted(glob.glob(os.path.join(runs, run, "checkpoints", "*", "model.safetensors")))[-1]
    raw = open(ck, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for k, v in sorted(header.items()):
        if k != "__metadata__":
            out[k] = array.array("f", data[v["data_offsets"][0]:v["data_offsets"][1]])
    return out

def gap(a, b):
    return max(abs(x - y) / (1 + abs(x)) for k in a for x, y in zip(a[k], b[k]))

cpu, gpu, gpu2 = (losses(r) for r in ("cpu", "gpu", "gpu2"))
print("loss by step, cpu:", [round(x, 2) for x in cpu])
print("loss by step, gpu:", [round(x, 2) for x in gpu])
print("loss by step, gpu, 2 workers:", [round(x, 2) for x in gpu2])
track = max(abs(a - b) / (1 + abs(a)) for a, b in zip(cpu, gpu))
pc, pg, pg2 = params("cpu"), params("gpu"), params("gpu2")
g_cpu, g_workers = gap(pc, pg), gap(pg, pg2)
print(f"loss gap cpu/gpu {track:.2e}; parameters after 20 steps: cpu/gpu {g_cpu:.2e}, "
      f"gpu 1/2 workers {g_workers:.2e}")
assert len(cpu) == len(gpu) == len(gpu2) >= 20, (len(cpu), len(gpu), len(gpu2))
assert track < 2e-3 and g_cpu < 1e-2 and g_workers < 1e-4
EOF
grep -h "loss gap" "$out/train-compare.log" | tee -a "$summary"

# Benchmarks, interleaved rounds: elbo (and elbo-cudnn, for the conv VAE) then PyTorch, per model
# and batch size. A contender that fails fails the round; the others keep their pairs.
bench() {
  local model="$1" bs="$2" round="$3"
  local args=() contenders=(elbo) steps=200 status=0 contender
  if [ "$model" = conv ]; then
    args=(--shape 1,64,64 --set model.architecture=conv --set 'model.hidden=[256]'
      --set model.latent_dim=10)
    steps=30
    [ "$cudnn" = 1 ] && contenders+=(elbo-cudnn)
  fi
  for contender in "${contenders[@]}"; do
    timeout 120 "$bin/$contender" bench train --device cuda:0 --batch-size "$bs" --steps "$steps" \
      --json "${args[@]}" >"$out/bench-$contender-$model-$bs-$round.json" || status=1
  done
  timeout 120 python3 scripts/torch_gpu_step.py "$model" "$bs" "$steps" 64 \
    >"$out/bench-torch-$model-$bs-$round.json" || return 1
  return "$status"
}
rm -f "$out"/bench-*.json
for model in mlp conv; do
  for bs in 128 1024; do
    for round in $(seq 1 "$rounds"); do
      check "bench-$model-$bs-$round" bench "$model" "$bs" "$round"
    done
  done
done
python3 - "$out" "$rounds" <<'EOF' | tee -a "$summary"
import glob, json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
names = {"elbo": "elbo", "elbo-cudnn": "elbo with cuDNN"}
for model in ("mlp", "conv"):
    for bs in (128, 1024):
        for contender, name in names.items():
            ratios, parts = [], []
            for r in range(1, rounds + 1):
                try:
                    e = json.load(open(os.path.join(out, f"bench-{contender}-{model}-{bs}-{r}.json")))
                    t = json.load(open(os.path.join(out, f"bench-torch-{model}-{bs}-{r}.json")))
                except (OSError, ValueError):
                    continue
                ratios.append(e["samples_per_s"] / t["samples_per_s"])
                parts.append((e["ms_per_step"], e["ms_compute"], e["ms_reduce"], e["ms_update"],
                              t["ms_per_step"]))
            if not ratios:
                ran = glob.glob(os.path.join(out, f"bench-{contender}-{model}-{bs}-*"))
                if contender == "elbo" or ran:
                    print(f"{model} vae, batch {bs}: {name}/torch: no result")
                continue
            ms = [p[0] for p in parts]
            print(f"{model} vae, batch {bs}: {name}/torch {statistics.median(ratios):.2f}x "
                  f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}); {name} ms/step "
                  f"{statistics.median(ms):.3f} (compute "
                  f"{statistics.median(p[1] for p in parts):.3f}, reduce "
                  f"{statistics.median(p[2] for p in parts):.3f}, update "
                  f"{statistics.median(p[3] for p in parts):.3f}), torch ms/step "
                  f"{statistics.median(p[4] for p in parts):.3f}")
EOF
rm -rf "$out/cache"
exit "$failed"
