#!/usr/bin/env bash
# Resume the last run from its newest valid checkpoint (latest.pt, falling back to older ones if it is damaged).
#
#   ./resume_training.sh                          # 4 GPUs, checkpoints/ in this folder
#   NGPU=2 ./resume_training.sh --learning_rate 3e-4    # extra flags are passed through (and listed in a warning)
#
# Environment: NGPU (processes, default 4), CHECKPOINT_DIR (default checkpoints),
# SHUTDOWN_TIMEOUT (seconds torchrun waits for the final save after Ctrl+C/SIGTERM, default 300).
set -euo pipefail
cd "$(dirname "$0")"
NGPU=${NGPU:-4}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
exec torchrun --standalone --nproc_per_node="$NGPU" --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
  src/train_improved.py --checkpoint_dir "$CHECKPOINT_DIR" --resume latest "$@"
