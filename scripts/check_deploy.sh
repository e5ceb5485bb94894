#!/usr/bin/env bash
# Renders the Kubernetes overlays (deploy/overlays/*) with `kubectl kustomize` and validates
# every object against the Kubernetes schemas with `kubernetes-validate --strict` (PyPI, in a
# venv cached in DIR, default ~/.cache/elbo-k8s-validate); a warning counts as a failure.
#
#   scripts/check_deploy.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-$HOME/.cache/elbo-k8s-validate}"
version="1.37.0"
if ! command -v kubectl >/dev/null 2>&1; then
  echo "error: kubectl is not on PATH (it renders deploy/ with its built-in kustomize)" >&2
  exit 1
fi
if [ "$("$dir/venv/bin/kubernetes-validate" --version 2>/dev/null)" != "$version" ]; then
  rm -rf "$dir/venv"
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi
rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
for overlay in deploy/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" >"$rendered/$name.yaml"
  out="$("$dir/venv/bin/kubernetes-validate" --strict --quiet "$rendered/$name.yaml" 2>&1)" || {
    echo "$out" >&2
    echo "error: deploy/overlays/$name does not validate" >&2
    exit 1
  }
  if [ -n "$out" ]; then
    echo "$out" >&2
    echo "error: deploy/overlays/$name: warnings (they count as failures)" >&2
    exit 1
  fi
  echo "deploy/overlays/$name: $(grep -c '^kind:' "$rendered/$name.yaml") objects valid"
done
