#!/usr/bin/env bash
# Installs megatron_pack and its dependencies into the current Python.
# torch goes first: with no torch present, pip would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}
if ! $PY -c "import torch" >/dev/null 2>&1; then
    $PY -m pip install -q "$TORCH_SPEC"
fi
$PY -m pip install -q "pybind11>=2.12" "setuptools>=64" wheel
$PY -m pip install -q --no-build-isolation -e ".[${EXTRAS}]"
