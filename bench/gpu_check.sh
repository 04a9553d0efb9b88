#!/usr/bin/env bash
# The one prepared GPU check (docs/design.md, "GPU checks"). Run from the repository root on the GPU
# machine (no network, no pip installs):
#
#     bash bench/gpu_check.sh
#
# Parts, each under its own `timeout`, each run whatever happened to the one before (a failure is
# recorded and the script goes on; the exit status is non-zero at the end if any part failed):
#   1. environment report (nvidia-smi, compiler and package versions, git commit)
#   2. build fastattn._C with CUDA (bench/gpu_check_cuda.sh when present: it builds and checks
#      the CUDA kernels; else setup.py build_ext)
#   3. GPU tests: `pytest -m gpu`, then the regular tests that run on CUDA (-k cuda), with Triton
#      compiled for real (TRITON_INTERPRET=0)
#   4. GPU benchmarks: python -m fastattn.bench --op all --device cuda --quick
#
# Results go to $OUT when set, else bench/results/h200/. The whole run is held to
# GPU_CHECK_BUDGET seconds (default 440, under 7.5 min): the build and the tests have caps, and
# the benchmarks get what is left (their --time-budget leaves them time to write the results).
# When $OUT is set (a device run returns at most 8 files), everything except summary.txt and
# bench/results.{json,md} is packed into artifacts.tar.gz.
set -u

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
RES=${OUT:-bench/results/h200}
BUDGET=${GPU_CHECK_BUDGET:-440}
BUILD_CAP=${GPU_CHECK_BUILD_TIMEOUT:-210}
TEST_CAP=${GPU_CHECK_TEST_TIMEOUT:-100}
mkdir -p "$RES/bench"
SUMMARY="$RES/summary.txt"
: >"$SUMMARY"
FAILED=()
T0=$SECONDS

log() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - T0))); }
cap() {  # cap N: min(N, what is left of the budget minus a reserve for the later parts)
  local reserve=${2:-0} l
  l=$(($(left) - reserve))
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

# 1. environment -----------------------------------------------------------------------------
env_report() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified files"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
  nvcc --version || echo "nvcc not found"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
else:
    print("torch sees no CUDA device")
EOF
  nproc
}
export -f env_report
export PY
run environment 60 "$RES/env.txt" bash -c env_report
cat "$RES/env.txt" >>"$SUMMARY"

# 2. build -------------------------------------------------------------------------------------
if [ -f bench/gpu_check_cuda.sh ]; then
  run build "$(cap "$BUILD_CAP" 200)" "$RES/build.log" env OUT="$RES" PYTHON="$PY" MAX_JOBS=16 \
    bash bench/gpu_check_cuda.sh
else
  run build "$(cap "$BUILD_CAP" 200)" "$RES/build.log" env MAX_JOBS=16 "$PY" setup.py build_ext --inplace
fi
"$PY" -c "import fastattn, json; print(json.dumps(fastattn.backends(), indent=1))" \
  >>"$SUMMARY" 2>&1 || log "   fastattn does not import"

# 3. tests -------------------------------------------------------------------------------------
# pytest's exit status 5 ("no tests collected") is not a failure of the code under test
pytest_run() {
  TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider "$@"
  local rc=$?
  [ $rc -eq 5 ] && { echo "(no tests selected)"; return 0; }
  return $rc
}
export -f pytest_run
TEST_T0=$SECONDS
run "tests (-m gpu)" "$(cap $((TEST_CAP * 6 / 10)) 120)" "$RES/tests_gpu.log" \
  bash -c 'pytest_run "$@"' _ -m gpu tests --junitxml="$RES/tests_gpu.xml"
run "tests (-k cuda)" "$(cap $((TEST_CAP - (SECONDS - TEST_T0))) 110)" "$RES/tests_cuda.log" \
  bash -c 'pytest_run "$@"' _ -m "not gpu" -k cuda tests --junitxml="$RES/tests_cuda.xml"
for f in "$RES"/tests_gpu.log "$RES"/tests_cuda.log; do
  [ -f "$f" ] && log "   $(basename "$f"): $(tail -n 1 "$f")"
done

# 4. benchmarks ---------------------------------------------------------------------------------
BENCH_LIMIT=$(cap 100000 5)
run benchmarks "$BENCH_LIMIT" "$RES/bench/bench.log" \
  env TRITON_INTERPRET=0 "$PY" -m fastattn.bench --op all --device cuda --quick --no-progress \
  --time-budget $((BENCH_LIMIT - (BENCH_LIMIT / 5 > 40 ? BENCH_LIMIT / 5 : 40))) --out "$RES/bench"
grep -E "^  speed-up|^== " "$RES/bench/bench.log" >>"$SUMMARY" 2>/dev/null || true

# summary and packing ---------------------------------------------------------------------------
log "== total $((SECONDS - T0))s; failed parts: ${FAILED[*]:-none}"
if [ -n "${OUT:-}" ]; then
  (cd "$RES" && find . -type f ! -name summary.txt ! -path ./bench/results.json \
     ! -path ./bench/results.md ! -name artifacts.tar.gz ! -name .packlist | sort >.packlist &&
   tar czf artifacts.tar.gz -T .packlist && xargs rm -f <.packlist && rm -f .packlist &&
   find . -mindepth 1 -type d -empty -delete) || log "packing the artifacts failed"
fi
[ ${#FAILED[@]} -eq 0 ]
