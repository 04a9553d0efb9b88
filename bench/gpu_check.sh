#!/usr/bin/env bash
# The one prepared GPU check (docs/design.md, "GPU checks"): a verdict in under 7 minutes on a
# fresh GPU machine (torch with CUDA preinstalled; no network, no pip installs; hypothesis and
# ninja may be missing). Run from the repository root:
#
#     bash bench/gpu_check.sh
#
# Parts, each under its own `timeout`, each run whatever happened to the one before (a failure is
# recorded and the script goes on; the exit status is non-zero at the end if any part failed):
#   0. environment report, then the GPU itself: without a CUDA device torch can use the check
#      stops here with the reason (exit 3), before building anything
#   1. build fastattn._C with the CUDA kernels for the visible GPU's architecture only, and check
#      that every CUDA binding is registered
#   2. the GPU smoke set (`pytest -m gpu_smoke tests/test_gpu_smoke.py`): every kernel family on
#      both GPU backends, Triton compiled for real (TRITON_INTERPRET=0) with autotuning pinned to
#      one config per kernel (FASTATTN_TRITON_AUTOTUNE=0)
#   3. GPU benchmarks: python -m fastattn.bench --op all --device cuda --quick
#
# Every part writes its log and result as it finishes. Results go to $OUT when set, else
# bench/results/h200/. summary.txt starts with one line per kernel family (attention, norm, int8):
# PASS/FAIL of its smoke tests and its key ratio (median benchmark speed-up of each fastattn
# backend over its baseline). The whole run is held to GPU_CHECK_BUDGET seconds (default 400):
# the build and the tests have caps, the benchmarks get what is left.
set -u

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
RES=${OUT:-bench/results/h200}
BUDGET=${GPU_CHECK_BUDGET:-400}
BUILD_CAP=${GPU_CHECK_BUILD_TIMEOUT:-200}
TEST_CAP=${GPU_CHECK_TEST_TIMEOUT:-130}
mkdir -p "$RES/bench"
SUMMARY="$RES/summary.txt"
: >"$SUMMARY"
FAILED=()
T0=$SECONDS

log() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - T0))); }
cap() {  # cap N RESERVE: min(N, what is left of the budget minus RESERVE), at least 10
  local l=$(($(left) - ${2:-0}))
  if [ "$l" -lt "$1" ]; then echo $((l > 10 ? l : 10)); else echo "$1"; fi
}
# run NAME TIMEOUT LOGFILE CMD...: runs CMD under timeout, logs, records failure, never exits
run() {
  local name=$1 limit=$2 logf=$3 t=$SECONDS rc
  shift 3
  log "== $name (timeout ${limit}s): $*"
  timeout -k 15 "$limit" "$@" >"$logf" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    log "   ok in $((SECONDS - t))s"
  else
    [ $rc -eq 124 ] && log "   TIMED OUT after ${limit}s" || log "   FAILED (exit $rc) in $((SECONDS - t))s"
    FAILED+=("$name")
    log "   --- last lines of $(basename "$logf") ---"
    tail -n 25 "$logf" | sed 's/^/   | /' >>"$SUMMARY"
  fi
  return 0
}
# family lines first: the summary so far goes below them
finish() {
  local rc=$1 head
  head=$("$PY" bench/gpu_check_summary.py "$RES" "$rc" 2>&1) || head="summary: $head"
  { echo "$head"; cat "$SUMMARY"; } >"$SUMMARY.new" && mv "$SUMMARY.new" "$SUMMARY"
  echo "$head"
  if [ -n "${OUT:-}" ]; then  # a device run returns few files: pack the logs
    (cd "$RES" && find . -type f ! -name summary.txt ! -path ./bench/results.json \
       ! -path ./bench/results.md ! -name artifacts.tar.gz ! -name .packlist | sort >.packlist &&
     tar czf artifacts.tar.gz -T .packlist && xargs rm -f <.packlist && rm -f .packlist &&
     find . -mindepth 1 -type d -empty -delete) || log "packing the artifacts failed"
  fi
  exit "$rc"
}

# 0. environment and the GPU ------------------------------------------------------------------
env_report() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
    || echo "nvidia-smi failed"
  nvcc --version | tail -n 2 || echo "nvcc not found"
  "$PY" - <<'EOF'
import importlib.util, platform, torch
from torch.utils.cpp_extension import is_ninja_available
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| ninja", is_ninja_available(), "| hypothesis", importlib.util.find_spec("hypothesis") is not None)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
EOF
  nproc
}
export -f env_report
export PY
# (a cold import of a CUDA torch and Triton can take most of a minute on a loaded machine)
run environment 120 "$RES/env.txt" bash -c env_report
cat "$RES/env.txt" >>"$SUMMARY"

# the architecture of the visible GPU ("9.0a" on Hopper: the CUDA kernels use wgmma), or why none
ARCH=$("$PY" - 2>&1 <<'EOF'
import sys, torch
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is not a CUDA build")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}" + ("a" if major == 9 else ""))
EOF
)
if [ $? -ne 0 ]; then
  log "== no GPU: $(echo "$ARCH" | tail -n 1)"
  log "   nothing was built or run: bench/gpu_check.sh needs a CUDA device"
  FAILED+=("gpu")
  finish 3
fi
log "== GPU architecture $ARCH"

# 1. build --------------------------------------------------------------------------------------
run "build (TORCH_CUDA_ARCH_LIST=$ARCH)" "$(cap "$BUILD_CAP" 150)" "$RES/build.log" \
  env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" setup.py build_ext --inplace
# the ops of every TORCH_LIBRARY_IMPL(fastattn, CUDA, m) block in csrc/cuda, as make
# check-cuda-build checks them (the in-place library: fastattn/_C*.so under the repository root)
run "CUDA kernels registered" 60 "$RES/registered.log" "$PY" tests/_check_cuda_build.py .

# 2. the GPU smoke set --------------------------------------------------------------------------
run "smoke tests (-m gpu_smoke)" "$(cap "$TEST_CAP" 70)" "$RES/tests_smoke.log" \
  env TRITON_INTERPRET=0 FASTATTN_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider \
  -m gpu_smoke tests/test_gpu_smoke.py --junitxml="$RES/tests_smoke.xml"
log "   $(tail -n 1 "$RES/tests_smoke.log")"

# 3. benchmarks ---------------------------------------------------------------------------------
BENCH_LIMIT=$(cap 100000 10)
run benchmarks "$BENCH_LIMIT" "$RES/bench/bench.log" \
  env TRITON_INTERPRET=0 "$PY" -m fastattn.bench --op all --device cuda --quick --no-progress \
  --time-budget $((BENCH_LIMIT - (BENCH_LIMIT / 5 > 30 ? BENCH_LIMIT / 5 : 30))) --out "$RES/bench"

log "== total $((SECONDS - T0))s; failed parts: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ] && finish 0 || finish 1
