#!/usr/bin/env bash
# One prepared run that checks and measures everything GPU-specific on one GPU, in at most 8 minutes, and writes
# the results table gpu_check_results.md (also printed at the end). See benchmarks/gpu_check.py for the items.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine; results in gpu_check_out/
#   OUT=/tmp/gc bash benchmarks/gpu_check.sh              # results under $OUT (--out DIR does the same)
#   bash benchmarks/gpu_check.sh --smoke --out /tmp/gc    # CPU, tiny model, under a minute: the same code paths
#
# Environment: PYTHON (default python3: the machine's own, no venv), OUT (default gpu_check_out).
# Exit code: 0 when no item failed, 1 when one did, 2 when it could not start (a module missing, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
