#!/usr/bin/env bash
# List every checkpoint of a run: name, step, epoch, losses, size, age, status.
#
#   ./list_checkpoints.sh                         # checkpoints/, metadata only (fast, even for multi-GB files)
#   ./list_checkpoints.sh --verify                # also check each file's content hash (reads every byte)
#   ./list_checkpoints.sh --checkpoint_dir runs/big/checkpoints
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
exec "$PYTHON" src/list_checkpoints.py "$@"
