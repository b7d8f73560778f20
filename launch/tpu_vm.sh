#!/usr/bin/env bash
# Fine-tune on a Cloud TPU VM slice: create it, install t5x_lite on every worker, run
# `t5x-lite train` on all workers at once (jax.distributed finds the pod by itself), stream the
# logs, and delete the slice at the end.
#
#   launch/tpu_vm.sh --name=NAME --zone=ZONE --type=v4-32 --model_dir=gs://BUCKET/run \
#     [--version=tpu-ubuntu2204-base] [--repo=URL[@REF]] [--keep] [--dry-run] \
#     -- [t5x-lite train flags: --gin_file=... --gin.X=V]
#
# The workers run the code you have: the git checkout this script is in (what git tracks, as it
# is now, plus untracked files that are not ignored) is packed into
# ${TMPDIR:-/tmp}/t5x_lite-NAME.tar.gz with its commit and uncommitted diff (PROVENANCE.json/
# .diff, which the run copies into MODEL_DIR/provenance/), copied to every worker and installed
# there. --repo=URL[@REF] makes the workers clone that repository (at REF) instead.
# model_dir (and DATA_DIR, INITIAL_CHECKPOINT_PATH) may be gs:// paths: orbax and the data
# sources read them through etils.epath. --dry-run prints every command instead of running it.
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
NAME="" ZONE="" TYPE="" MODEL_DIR="" VERSION="tpu-ubuntu2204-base" KEEP=0 DRY_RUN=0 REPO=""
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
# Where the workers get the code: this checkout (checked now, before anything is created), or
# --repo=URL[@REF]; the @ that starts REF comes after the host (git@host:me/t5x.git@v1 is a ref).
REF=""
if [ -z "$REPO" ]; then
  if [ "$(git -C "$SRC" rev-parse --show-toplevel 2>/dev/null)" != "$SRC" ]; then
    echo "$SRC is not a git checkout (or git is missing), so there is no list of files to ship:" \
      "launch from a clone of t5x_lite, or pass --repo=URL[@REF] for the workers to clone" >&2
    exit 2
  fi
  ARCHIVE="${TMPDIR:-/tmp}/t5x_lite-$NAME.tar.gz"
else
  case "$REPO" in *://*) REPO_PATH=${REPO#*://}; REPO_PATH=${REPO_PATH#*/} ;;
                  *:*) REPO_PATH=${REPO#*:} ;;
                  *) REPO_PATH=$REPO ;; esac
  if [[ "$REPO_PATH" == *@* ]]; then REF=${REPO##*@}; REPO=${REPO%@*}; fi
  if [ -z "$REPO" ] || [[ "$REPO_PATH" == *@ ]]; then
    echo "--repo=URL[@REF] needs a URL and a non-empty REF (got '$REPO${REF:+@$REF}')" >&2; exit 2
  fi
fi
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
# The remote command line: every value quoted once for the workers' shell.
TRAIN_CMD="t5x-lite train $(printf '%q' "--model_dir=$MODEL_DIR")"
for arg in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do TRAIN_CMD+=" $(printf '%q' "$arg")"; done
if [ -z "$REPO" ]; then
  GET="mkdir t5x_lite && tar -xzf t5x_lite.tar.gz -C t5x_lite"
elif [ -z "$REF" ]; then
  GET="git clone --depth=1 $(printf '%q' "$REPO") t5x_lite"
else
  GET="git clone $(printf '%q' "$REPO") t5x_lite && git -C t5x_lite checkout $(printf '%q' "$REF")"
fi
SETUP="python3 -m pip install -U pip && rm -rf t5x_lite && $GET && cd t5x_lite"
SETUP+=" && python3 -m pip install -e . 'jax[tpu]'"
# pip installs for the user (t5x-lite lands in ~/.local/bin, not on a non-login PATH);
# pipefail so that a failed run is not hidden by tee.
TRAIN="set -o pipefail && export PATH=\"\$HOME/.local/bin:\$PATH\" && cd t5x_lite && $TRAIN_CMD 2>&1 | tee -a train.log"

if [ -z "$REPO" ]; then
  run python3 -I "$SRC/t5x_lite/rundir/provenance.py" archive "$ARCHIVE"
fi
run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION"
# From here on the slice exists: delete it at the end even if setup or training fails
# (a preempted run is then resumed by launching the same command again).
STATUS=0
{ { [ -n "$REPO" ] || run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:t5x_lite.tar.gz" \
      --zone="$ZONE" --worker=all; } &&
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$SETUP" &&
  # Every worker runs the same command; output of all workers is streamed here.
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$TRAIN"
} || STATUS=$?
run gsutil ls "$MODEL_DIR" || true
if [ "$KEEP" = 0 ]; then
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
fi
exit "$STATUS"
