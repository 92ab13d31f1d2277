#!/usr/bin/env bash
# GPU verification for qkernels: build the extension for THIS GPU only, run the GPU tests (CUDA + Triton kernels vs
# the reference), run the quick GPU benchmark, print a summary table last.
#
#   bash scripts/gpu_check.sh            (from the repository root; no network, no pip installs)
#
# Expects torch (CUDA build), nvcc (PATH, CUDA_HOME or /usr/local/cuda) and optionally triton and pytest to be
# installed already; without pytest it falls back to `python -m pytest` and then to scripts/gpu_smoke.py.
# Budget: < 8 minutes on an H100 (every section has its own timeout; a section that fails does not stop the rest).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# under the device tool, write the logs straight into $OUT (what it brings back), so a killed run still returns them
LOG_DIR=${LOG_DIR:-${OUT:-$ROOT/gpu_check_logs}}
export PYTHONUNBUFFERED=1
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
START=$(date +%s)
# pure-Python packages the image lacks (gguf for tests/test_gguf.py) can come as wheels in .whl/ (not in git)
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qk_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/qk_site"
fi
declare -A STATUS DURATION

section() {  # section NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo
  echo "=================== $name (timeout ${limit}s) ==================="
  local t0=$(date +%s)
  set -x
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  { set +x; } 2>/dev/null
  DURATION[$name]=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then STATUS[$name]=ok; elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STATUS[$name]="TIMEOUT"; else STATUS[$name]="FAIL(rc=$rc)"; fi
  return "$rc"
}

echo "=================== environment ==================="
set -x
date -u
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || nvidia-smi || true
which nvcc && nvcc --version | tail -2
$PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
$PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not installed"
$PY -c "import pytest; print('pytest', pytest.__version__)" || echo "pytest: not installed"
{ set +x; } 2>/dev/null

# GPU_CHECK_CAP=9.0 (say) skips the device query: a dry run of the script's plumbing on a machine without a GPU
CAP=${GPU_CHECK_CAP:-$($PY -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}')")} || {
  echo "no CUDA device visible to torch"; exit 2; }
MAJOR=${CAP%%.*}
# arch-specific ("a") targets for Hopper and datacenter Blackwell, as the CI build uses; plain SASS elsewhere
case "$MAJOR" in 9|10) ARCH="${CAP}a" ;; *) ARCH="$CAP" ;; esac
echo "device capability $CAP -> TORCH_CUDA_ARCH_LIST=$ARCH"

# ---- build -------------------------------------------------------------------------------------------------------
section build 200 env QKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" "$PY" setup.py build_ext --inplace
$PY -c "import qkernels, torch; print('extension', qkernels.HAS_EXTENSION, 'archs', torch.ops.qkernels.cuda_build_archs())" || STATUS[build]="FAIL(import)"

# ---- tests -------------------------------------------------------------------------------------------------------
# every GPU-marked test of the suite (the ones CI skips); xdist spreads the Triton JIT compiles over the CPU cores
if $PY -c "import pytest" 2>/dev/null; then
  XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
  TOUT=""; $PY -c "import pytest_timeout" 2>/dev/null && TOUT="--timeout=100"
  section tests 200 "$PY" -m pytest -q -m gpu $XDIST $TOUT --maxfail=40 --no-header -rfEs -p no:cacheprovider tests
else
  echo "pytest not available: running scripts/gpu_smoke.py instead"
  section tests 200 "$PY" scripts/gpu_smoke.py
fi

# ---- benchmarks --------------------------------------------------------------------------------------------------
section bench 100 "$PY" -m benchmarks.bench_gpu_gemm --quick --csv "$LOG_DIR/bench_quick.csv"
section bench_gguf 45 "$PY" -m benchmarks.bench_gguf --gpu
section bench_float 45 "$PY" -m benchmarks.bench_float_formats --device cuda --repeats 20

# ---- summary (last) ----------------------------------------------------------------------------------------------
echo
echo "=================== benchmark (speedup vs bf16 F.linear) ==================="
sed -n '/^# speedup vs bf16/,$p' "$LOG_DIR/bench.log" 2>/dev/null || echo "(no benchmark table)"
echo
echo "=================== gpu_check summary ($(( $(date +%s) - START ))s total, logs in $LOG_DIR) ==================="
printf "%-16s %-14s %s\n" section status seconds
for s in build tests bench bench_gguf bench_float; do
  [ -n "${STATUS[$s]:-}" ] && printf "%-16s %-14s %s\n" "$s" "${STATUS[$s]}" "${DURATION[$s]}"
done
for s in "${!STATUS[@]}"; do [ "${STATUS[$s]}" = ok ] || exit 1; done
exit 0
