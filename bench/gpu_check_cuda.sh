#!/usr/bin/env bash
# CUDA part of bench/gpu_check.sh, run from the repository root on the GPU machine (no network):
#
#     OUT=/some/dir bash bench/gpu_check_cuda.sh
#
#   1. builds fastattn._C with the CUDA kernels (setup.py build_ext --inplace,
#      TORCH_CUDA_ARCH_LIST="8.0;9.0a" unless set) -> $OUT/cuda_build.log (bench/gpu_check.sh
#      keeps this fragment's own output in $OUT/build.log)
#   2. bench/cuda_kernels_check.py: every CUDA op against fastattn.reference, then timings
#      against the PyTorch baselines -> $OUT/cuda_kernels_check.{json,md}
#   3. compute-sanitizer (when installed) on the tiny cases: memcheck on every op, racecheck on
#      attention -> $OUT/sanitizer_{memcheck,racecheck}.log
#
# Each part runs under its own timeout whatever happened to the one before, and its outcome is
# appended to $OUT/cuda_status.txt. The whole fragment is held to CUDA_CHECK_BUDGET seconds
# (default 200). Exit status: non-zero when any part failed.
set -u

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/h200}
BUDGET=${CUDA_CHECK_BUDGET:-200}
mkdir -p "$OUT"
STATUS="$OUT/cuda_status.txt"
: >"$STATUS"
T0=$SECONDS
FAILED=()

left() { echo $((BUDGET - (SECONDS - T0))); }
cap() {  # cap N RESERVE: min(N, what is left minus RESERVE), at least 5
  local l=$(($(left) - ${2:-0}))
  [ "$l" -lt "$1" ] && echo $((l > 5 ? l : 5)) || echo "$1"
}
# part NAME TIMEOUT LOG CMD...: never exits the script
part() {
  local name=$1 limit=$2 logf=$3 t=$SECONDS rc
  shift 3
  echo "== $name (timeout ${limit}s): $*" | tee -a "$STATUS"
  timeout -k 10 "$limit" "$@" >"$logf" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "   ok in $((SECONDS - t))s" | tee -a "$STATUS"
  else
    [ $rc -eq 124 ] && echo "   TIMED OUT after ${limit}s" | tee -a "$STATUS" ||
      echo "   FAILED (exit $rc) in $((SECONDS - t))s" | tee -a "$STATUS"
    FAILED+=("$name")
    tail -n 20 "$logf" | sed 's/^/   | /' | tee -a "$STATUS"
  fi
  return 0
}

# 1. build ------------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-16}
part "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" "$(cap 150 40)" "$OUT/cuda_build.log" \
  "$PY" setup.py build_ext --inplace
grep -E "ptxas|error|warning" "$OUT/cuda_build.log" | grep -v "^ptxas info" | head -n 20 \
  >>"$STATUS" || true
"$PY" - >>"$STATUS" 2>&1 <<'EOF' || FAILED+=("extension import")
import torch
import fastattn._C  # noqa: F401
ops = ["attention_fwd", "attention_bwd", "attention_kvcache", "layer_norm_fwd", "layer_norm_bwd",
       "quantize_per_token", "int8_gemm", "int8_weight_only_linear"]
have = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", "CUDA") for op in ops}
print("   CUDA kernels registered:", have)
assert all(have.values()), "some ops have no CUDA kernel"
EOF

# 2. correctness + timings ----------------------------------------------------------------------
CHECK_LIMIT=$(cap 110 25)
part "cuda kernels check" "$CHECK_LIMIT" "$OUT/cuda_kernels_check.log" \
  "$PY" bench/cuda_kernels_check.py --out "$OUT" --time-budget $((CHECK_LIMIT * 2 / 5))
grep -E "checks ok" "$OUT/cuda_kernels_check.log" | tee -a "$STATUS"

# 3. compute-sanitizer --------------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || true)
for d in "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")" /usr/local/cuda/bin \
         /usr/local/cuda/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$d/compute-sanitizer" ] && SAN="$d/compute-sanitizer"
done
if [ -z "$SAN" ]; then
  echo "== compute-sanitizer not found: skipped" | tee -a "$STATUS"
elif [ "$(left)" -lt 30 ]; then
  echo "== compute-sanitizer skipped: budget spent" | tee -a "$STATUS"
else
  part "compute-sanitizer memcheck" "$(cap 60 15)" "$OUT/sanitizer_memcheck.log" \
    "$SAN" --tool memcheck --error-exitcode 3 --print-limit 20 \
    "$PY" bench/cuda_kernels_check.py --sanitize --out "$OUT/sanitize"
  if [ "$(left)" -ge 25 ]; then
    part "compute-sanitizer racecheck (attention)" "$(cap 60 5)" "$OUT/sanitizer_racecheck.log" \
      "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 3 --print-limit 20 \
      "$PY" bench/cuda_kernels_check.py --sanitize --only attention --out "$OUT/sanitize_race"
  else
    echo "== racecheck skipped: budget spent" | tee -a "$STATUS"
  fi
fi

echo "== cuda fragment: $((SECONDS - T0))s; failed parts: ${FAILED[*]:-none}" | tee -a "$STATUS"
[ ${#FAILED[@]} -eq 0 ]
