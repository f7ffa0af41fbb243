#!/usr/bin/env bash
# Installs megatron_pack with its test extras and runs the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
"${PYTHON:-$(command -v python || command -v python3)}" -m pytest -q tests "$@"
