#!/usr/bin/env bash
# Fine-tune on a Cloud TPU VM slice: create it, install t5x_lite on every worker, run
# `t5x-lite train` on all workers at once (jax.distributed finds the pod by itself), stream the
# logs, and delete the slice at the end.
#
#   launch/tpu_vm.sh --name=NAME --zone=ZONE --type=v4-32 --model_dir=gs://BUCKET/run \
#     [--version=tpu-ubuntu2204-base] [--repo=https://github.com/you/t5x_lite.git] \
#     [--keep] [--dry-run] -- [t5x-lite train flags: --gin_file=... --gin.X=V]
#
# model_dir (and DATA_DIR, INITIAL_CHECKPOINT_PATH) may be gs:// paths: orbax and the data
# sources read them through etils.epath. --dry-run prints every command instead of running it.
set -euo pipefail
NAME="" ZONE="" TYPE="" MODEL_DIR="" VERSION="tpu-ubuntu2204-base" KEEP=0 DRY_RUN=0
REPO="https://github.com/t5x-lite/t5x_lite.git"
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --model_dir=*) MODEL_DIR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --keep) KEEP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "unknown flag $1 (train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
for var in NAME ZONE TYPE MODEL_DIR; do
  if [ -z "${!var}" ]; then echo "missing --$(echo "$var" | tr '[:upper:]' '[:lower:]')=" >&2; exit 2; fi
done
# The slice's disks go with it (and each worker has its own): checkpoints must go to a bucket.
case "$MODEL_DIR" in
  gs://?*) ;;
  *) echo "--model_dir must be a gs:// path (got '$MODEL_DIR'): the workers' disks are deleted with the slice" >&2; exit 2 ;;
esac
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
# The remote command line: every value quoted once for the workers' shell.
TRAIN_CMD="t5x-lite train $(printf '%q' "--model_dir=$MODEL_DIR")"
for arg in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do TRAIN_CMD+=" $(printf '%q' "$arg")"; done
SETUP="python3 -m pip install -U pip && git clone --depth=1 $(printf '%q' "$REPO") t5x_lite && cd t5x_lite && python3 -m pip install -e . 'jax[tpu]'"
# pip installs for the user (t5x-lite lands in ~/.local/bin, not on a non-login PATH);
# pipefail so that a failed run is not hidden by tee.
TRAIN="set -o pipefail && export PATH=\"\$HOME/.local/bin:\$PATH\" && cd t5x_lite && $TRAIN_CMD 2>&1 | tee -a train.log"

run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION"
# From here on the slice exists: delete it at the end even if setup or training fails
# (a preempted run is then resumed by launching the same command again).
STATUS=0
{ run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$SETUP" &&
  # Every worker runs the same command; output of all workers is streamed here.
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$TRAIN"
} || STATUS=$?
run gsutil ls "$MODEL_DIR" || true
if [ "$KEEP" = 0 ]; then
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
fi
exit "$STATUS"
