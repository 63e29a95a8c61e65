#!/usr/bin/env bash
# Issue 33's kill figure, on the CPU: ROUNDS rounds of each fault of tests/test_faults.py (the
# process killed outright, killed while writing a checkpoint, a Ray Train worker killed, SIGTERM,
# SIGINT), each at a step drawn from SEED; pytest's count of passed rounds is the kills survived.
#   bash bench/faults.sh [ROUNDS] [SEED]      # from the project's root, in its environment
set -euo pipefail
cd "$(dirname "$0")/.."
RAYBOOTH_FAULT_ROUNDS="${1:-4}" RAYBOOTH_FAULT_SEED="${2:-1}" python -m pytest -q -p no:cacheprovider tests/test_faults.py
