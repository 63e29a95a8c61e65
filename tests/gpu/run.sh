#!/usr/bin/env bash
# The GPU checks, in one command on a machine with a CUDA GPU (CI has none):
#   bash tests/gpu/run.sh [MODEL_DIR]     # default: a tiny model written for the run
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-}"
if [ -z "$model" ]; then
    model="$(mktemp -d)/tiny"
    python -m raybooth tiny-model --output_dir "$model" >/dev/null
fi
python tests/gpu/gpu_check.py "$model"
python tests/gpu/options_check.py "$model"
echo "gpu checks passed"
