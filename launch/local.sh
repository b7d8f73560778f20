#!/usr/bin/env bash
# Train on this host (all local accelerators, or the CPU).
#   launch/local.sh [--dry-run] --model_dir=DIR [t5x-lite train flags: --gin_file=... --gin.X=V]
# --dry-run prints the exact commands instead of running them.
set -euo pipefail
DRY_RUN=0 HAS_MODEL_DIR=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --model_dir=?*|--model_dir) HAS_MODEL_DIR=1; ARGS+=("$arg") ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [ "$HAS_MODEL_DIR" = 0 ]; then echo "missing --model_dir=DIR" >&2; exit 2; fi
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
run t5x-lite train "${ARGS[@]}"
