#!/usr/bin/env bash
# Train on this host (all local accelerators, or the CPU).
#   launch/local.sh [--dry-run] --model_dir=DIR [t5x-lite train flags: --gin_file=... --gin.X=V]
# --dry-run prints the exact commands instead of running them.
# t5x_lite is imported from the checkout this script is in (PYTHONPATH), whatever t5x-lite is
# installed; the run records its commit and uncommitted diff in MODEL_DIR/provenance/.
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
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
# XLA:CPU allocates each step's temporaries afresh (one 1.5 GB block for flan-t5-small at batch
# 8), from a thread's malloc arena, which can only mmap a block that big and munmaps it after
# the step. On this VM a page freed for more than a few seconds is handed back to the host and
# is slow to fault in again: steps after an 8 s pause (eval, checkpoint) took 5.1-7.1 s instead
# of 2.6-2.8. One arena, no mmap and no trimming keep the block in the heap from step to step
# (0 page faults a step instead of ~1.7k); huge pages make the first faults 2 MB each. A
# GLIBC_TUNABLES you set yourself is kept.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}"
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
run env PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" t5x-lite train "${ARGS[@]}"
