#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node (all its GPUs), the coordinator
# on the first node; jax.distributed gets its address, process count and id from SLURM.
#
#   launch/gpu_slurm.sh --nodes=4 --gpus_per_node=8 --model_dir=/shared/run [--partition=P] \
#     [--time=24:00:00] [--port=12345] [--dry-run] -- [t5x-lite train flags]
#
# --dry-run prints the sbatch script instead of submitting it.
# Every node imports t5x_lite from the checkout this script is in (PYTHONPATH), which must be on
# the filesystem the nodes share, as it is when the job starts (a queued job picks up later
# edits); the run records its commit and uncommitted diff in MODEL_DIR/provenance/.
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
NODES="" GPUS="" MODEL_DIR="" PARTITION="" TIME="24:00:00" PORT=12345 DRY_RUN=0
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --model_dir=*) MODEL_DIR="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "unknown flag $1 (train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
for flag in nodes:NODES gpus_per_node:GPUS model_dir:MODEL_DIR; do
  var=${flag#*:}
  if [ -z "${!var}" ]; then echo "missing --${flag%%:*}=" >&2; exit 2; fi
done
TRAIN_CMD="t5x-lite train $(printf '%q' "--model_dir=$MODEL_DIR")"
for arg in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do TRAIN_CMD+=" $(printf '%q' "$arg")"; done
# TRAIN_CMD goes inside '...' below (for the `bash -c` of each task): ' becomes '\''.
SQ="'\\''"
TRAIN_CMD=${TRAIN_CMD//\'/$SQ}
SCRIPT=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=t5x_lite
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
${PARTITION:+#SBATCH --partition=$PARTITION}
export PYTHONPATH=$(printf '%q' "$SRC")\${PYTHONPATH:+:\$PYTHONPATH}
COORDINATOR=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c '$TRAIN_CMD --coordinator_address='"\$COORDINATOR:$PORT"' --num_processes=\$SLURM_NTASKS --process_id=\$SLURM_PROCID'
SBATCH
)
if [ "$DRY_RUN" = 1 ]; then
  echo "sbatch <<'EOF'"
  echo "$SCRIPT"
  echo "EOF"
else
  echo "$SCRIPT" | sbatch
fi
