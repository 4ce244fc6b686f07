#!/usr/bin/env bash
# Device side of the GPU validation (bench/gpu/README.md): run from the repository root.
#
#   bash bench/gpu/run.sh stash              keep the carried piece(s) of .gpu-carry/ for the next call
#   bash bench/gpu/run.sh prepare [ARGS...]  stash, check every piece, unpack, validate.py --prepare-only ARGS
#                                            (checkpoint and package kept in $WORK for the measure call)
#   bash bench/gpu/run.sh measure [ARGS...]  validate.py ARGS on what prepare left in $WORK (the measure
#                                            phase; rerun it as often as the budget allows)
#   bash bench/gpu/run.sh run [ARGS...]      stash, unpack and validate.py ARGS: everything in one call
#
# Pieces are kept in $STASH (outside the working tree, which each call replaces) while the machine
# stays warm between back-to-back calls. Results go to $OUT (the folder whose files the remote run
# sends back) when it is set, else to ./gpu-validation-out.
set -euo pipefail
cd "$(dirname "$0")/../.."

# the project's per-user cache folder (as the runtime's: $BLIPDIFFUSION_TRT_CACHE, else ~/.cache/...)
BASE="${BLIPDIFFUSION_TRT_CACHE:-$HOME/.cache/blipdiffusion-trt}/gpu-validation"
STASH="${STASH:-$BASE/carry}"
SITE="${SITE:-$BASE/site}"
WORK="${WORK:-$BASE/work}"  # checkpoint and package: ~30 GB at full size, never in $OUT
RESULTS="${OUT:-$PWD/gpu-validation-out}"
mkdir -p "$STASH" "$RESULTS"

stash() {
  [ -f .gpu-carry/SHA256SUMS ] || { echo "error: .gpu-carry/SHA256SUMS was not carried"; exit 3; }
  cp .gpu-carry/SHA256SUMS "$STASH/"
  local found=0
  for piece in .gpu-carry/site.tar.xz.part-*; do
    [ -f "$piece" ] || continue
    (cd .gpu-carry && sha256sum --check --status --ignore-missing SHA256SUMS) \
      || { echo "error: $piece does not match SHA256SUMS: carry it again"; exit 3; }
    cp "$piece" "$STASH/" && found=1 && echo "stashed $(basename "$piece")"
  done
  [ "$found" = 1 ] || { echo "error: no .gpu-carry/site.tar.xz.part-* was carried"; exit 3; }
}

unpack() {
  local missing
  missing="$( (cd "$STASH" && sha256sum --check --quiet SHA256SUMS 2>&1) | grep -v '^sha256sum:' \
             | sed -n 's/: .*//p' | sort -u | tr '\n' ' ' || true)"
  if [ -n "$missing" ]; then
    echo "error: pieces missing or damaged here: ${missing}(the machine was given back between calls?); carry them again"
    exit 3
  fi
  rm -rf "$SITE" && mkdir -p "$SITE"
  cat "$STASH"/site.tar.xz.part-* | python3 -c '
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz") as archive:
    archive.extractall(sys.argv[1], filter="data")
' "$SITE"
  echo "unpacked: $(tr '\n' ' ' < "$SITE/CARRIED_WHEELS.txt")"
}

case "${1:-}" in
  stash)
    stash ;;
  run|prepare|measure)
    command=$1
    if [ "$command" != measure ] || [ ! -f "$SITE/CARRIED_WHEELS.txt" ]; then
      if ls .gpu-carry/site.tar.xz.part-* >/dev/null 2>&1; then stash; fi
      unpack
    fi
    shift
    case "$command" in
      prepare) set -- --prepare-only "$@" ;;
      measure)
        checkpoint="$WORK/full-controlnet-checkpoint" package="$WORK/full-controlnet-package"
        if [[ " $* " != *" --checkpoint "* ]]; then
          [ -d "$checkpoint" ] && [ -f "$package/manifest.json" ] \
            || { echo "error: nothing prepared in $WORK (the machine was given back since prepare?): run prepare again"; exit 3; }
          set -- --checkpoint "$checkpoint" --package "$package" "$@"
        fi ;;
    esac
    # the carried pins first, then this checkout (not installed); the machine's own packages after
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    set +e
    log="$RESULTS/validate.log"; [ -f "$log" ] && log="$RESULTS/validate-2.log"
    python3 bench/gpu/validate.py --out "$RESULTS" --work "$WORK" "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    exit "$status" ;;
  *)
    echo "usage: bash bench/gpu/run.sh stash | prepare [validate.py arguments] | measure [validate.py arguments] | run [...]"; exit 2 ;;
esac
