#!/usr/bin/env bash
# Wheels for running `bench/gpu_check.py --parts pretrain` on a CUDA machine that has PyTorch and
# transformers but no package index (e.g. a lent GPU machine that is sent a copy of this checkout,
# at most 64 MiB with it): Ray (without its Java jars, RLlib and dashboard client, xz-compressed:
# ~29 MB instead of 79), DeepSpeed built as a pure-Python wheel (its ops JIT-build there with nvcc)
# and the small packages that image lacks. Writes .whl/ (ignored by git). vLLM's CUDA build does
# not fit (hundreds of MB and its own torch), so the ppo and serve parts need an image with vLLM.
#
# Usage (here):  scripts/setup.sh && scripts/gpu_wheels.sh            (PYTHON_VERSION=3.12 by default)
# There:         python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#                  && tar xJf .whl/ray-stripped.tar.xz -C /tmp/site \
#                  && PYTHONPATH=/tmp/site:$PWD python3 -m bench.gpu_check --parts pretrain [--compile]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_VERSION:-3.12}
TAG="cp${PY/./}"
out=.whl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out" && mkdir -p "$out"
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$1" "${@:2}"
}

# Ray, stripped of what a training run never loads, as one xz tarball of the unpacked wheel.
download "$work" "ray==$(version ray)"
mkdir "$work/ray" && (cd "$work/ray" && python3 -m zipfile -e "$work"/ray-*-"$TAG"-*.whl .)
chmod +x "$work"/ray/ray/core/src/ray/{gcs/gcs_server,raylet/raylet}  # zipfile drops the executable bits
rm -rf "$work"/ray/ray/{jars,rllib,llm} "$work"/ray/ray/dashboard/client/build
tar -C "$work/ray" -cf - . | xz -T2 -8 > "$out/ray-stripped.tar.xz"

# DeepSpeed as a pure-Python wheel (no op prebuilt), and the packages such an image lacks.
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w "$out"
pins=()
for name in pydantic pydantic_core annotated-types typing-inspection hjson jsonschema \
            jsonschema-specifications referencing rpds-py tensorboardX; do
    pins+=("$name==$(version "$name")")
done
download "$out" "${pins[@]}"
du -sh "$out"
