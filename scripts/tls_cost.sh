#!/usr/bin/env bash
# What TLS costs, measured side by side in interleaved rounds: the ring all-reduce's bus
# bandwidth (`elbo bench allreduce`, 2 ranks, 25 MiB) and training steps of two workers joined by
# the ring (`elbo bench train --workers 2`: the MLP VAE 784-400-20, global batch 128), each in
# plaintext and over mutual TLS with a throwaway CA and a P-256 certificate for 127.0.0.1 (made
# with openssl). Prints every round, then the medians, their ranges and TLS/plaintext.
# Needs a release build (cargo build --release) and openssl.
# Usage: scripts/tls_cost.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
elbo=./target/release/elbo
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=elbo bench CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=elbo" \
  -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$dir/ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 1 -extfile "$dir/ext" -out "$dir/tls.crt" 2>/dev/null
tls=(--tls-cert "$dir/tls.crt" --tls-key "$dir/tls.key" --tls-ca "$dir/ca.crt" --tls-mutual)
field() { python3 -c "import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index('{'):])['$1'])"; }
: >"$dir/figures"
for round in $(seq "$rounds"); do
  for mode in plain tls; do
    extra=()
    [ "$mode" = tls ] && extra=("${tls[@]}")
    bw=$("$elbo" bench allreduce --world 2 --json "${extra[@]}" | field busbw_gbps)
    sps=$("$elbo" bench train --workers 2 --steps 200 --json "${extra[@]}" | field samples_per_s)
    echo "round $round $mode: all-reduce busbw $bw GB/s, 2-worker training $sps samples/s"
    echo "$mode $bw $sps" >>"$dir/figures"
  done
done
python3 - "$dir/figures" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def col(mode, i):
    return [float(r[i]) for r in rows if r[0] == mode]
for name, i, unit in [("all-reduce busbw", 1, "GB/s"), ("2-worker training", 2, "samples/s")]:
    p, t = col("plain", i), col("tls", i)
    ratios = [b / a for a, b in zip(p, t)]
    print(f"{name}: plaintext {statistics.median(p):.3g} {unit} ({min(p):.3g}-{max(p):.3g}), "
          f"TLS {statistics.median(t):.3g} ({min(t):.3g}-{max(t):.3g}), "
          f"TLS/plaintext {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
PY
