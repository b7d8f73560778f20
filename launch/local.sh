#!/usr/bin/env bash
# Train on this host (all local accelerators, or the CPU).
#   launch/local.sh [--dry-run] --model_dir=DIR [t5x-lite train flags: --gin_file=... --gin.X=V]
# --dry-run prints the exact commands instead of running them.
set -euo pipefail
DRY_RUN=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
run t5x-lite train "${ARGS[@]}"
