#!/usr/bin/env bash
# Resume the last run from its newest valid checkpoint (latest.pt, falling back to older ones if it is damaged),
# with automatic restarts: if a worker dies, torchrun restarts all of them and they resume on their own.
#
#   ./resume_training.sh                          # as many processes as the run had, checkpoints/ in this folder
#   NGPU=2 ./resume_training.sh --learning_rate 3e-4    # extra flags are passed through (and listed in a warning)
#
# Environment: NGPU (processes; default: the run's own number, read from its newest checkpoint, else 4),
# CHECKPOINT_DIR (default checkpoints), MAX_RESTARTS (default 3), SHUTDOWN_TIMEOUT (seconds torchrun waits for the
# final save after Ctrl+C/SIGTERM, default 300), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints}
if [ -z "${NGPU:-}" ]; then
  NGPU=$("$PYTHON" src/list_checkpoints.py --checkpoint_dir "$CHECKPOINT_DIR" --world_size 2>/dev/null || echo 4)
fi
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
# Restarted workers must not read the previous round's rendezvous data (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" --max-restarts="$MAX_RESTARTS" \
  --shutdown-timeout="$SHUTDOWN_TIMEOUT" src/train_improved.py --checkpoint_dir "$CHECKPOINT_DIR" --resume latest "$@"
