#!/usr/bin/env bash
# The GPU checks of the CUDA kernels, in one command (budget: <= 8 minutes on an H100/H200; the
# step limits below add up to 470 s):
#   1. build libgaze_kernels.so for this GPU's architecture (CMake + nvcc; or $GAZE_KERNELS_LIB, prebuilt)
#   2. the kernel suite tests/test_kernels.py (v1 and v2 cases) on the GPU backend (CuPy or
#      cuda-python; no torch), plus tests/test_bench_cuda.py
#   3. compute-sanitizer memcheck, racecheck and synccheck on a few of those cases (v1 and v2)
#   4. `gaze bench op --backend cuda` (gaze_forward_v2 vs torch SDPA flash; the dense column needs
#      torch with CUDA, "-" without it)
# Writes OUT/device_check.json (every step: command, exit status, seconds, verdict) and
# OUT/device_check.log (everything printed), plus the JUnit XML, sanitizer logs and bench JSON.
#
#   bash bench/device_check.sh [OUT]          # OUT defaults to out/device_check
#
# Needs python3 with numpy, ml_dtypes, pytest and cupy-cuda13x (or cuda-python). A device
# machine without network can get them from wheels carried along: GAZE_WHEELS=DIR (pip
# download numpy ml_dtypes pytest cuda-bindings -d DIR, on a machine of the same Python) makes
# a venv in OUT/venv from them. PYTHON=... picks the interpreter.
#
# Status: written without a GPU and NOT RUN YET (see docs/KERNELS.md); expect to fix details
# on its first run.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${1:-out/device_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/device_check.log
STEPS=$OUT/steps.tsv
: > "$LOG"
: > "$STEPS"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
echo "== gaze device check, $(date -u +%FT%TZ), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# step NAME TIMEOUT_S CMD...: runs CMD under a time limit and records the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "== [$name] $* (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$STEPS"
  echo "== [$name] exit $rc after $(( $(date +%s) - t0 ))s"
  return $rc
}
skip() {  # skip NAME REASON
  echo "== [$1] SKIPPED: $2"
  printf '%s\tskip\t0\t%s\n' "$1" "$2" >> "$STEPS"
}

# ---- environment ------------------------------------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader || echo "no nvidia-smi"
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
[ -n "$NVCC" ] && "$NVCC" --version | tail -2
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
  "$(dirname "${NVCC:-/nonexistent}")/compute-sanitizer" 2>/dev/null | head -1 || true)

PY=${PYTHON:-}
if [ -z "$PY" ] && [ -n "${GAZE_WHEELS:-}" ]; then
  python3 -m venv --system-site-packages "$OUT/venv" &&
    "$OUT/venv/bin/python" -m pip install -q --no-index --find-links "$GAZE_WHEELS" "$GAZE_WHEELS"/*.whl &&
    PY=$OUT/venv/bin/python
fi
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
echo "python: $PY ($("$PY" --version 2>&1))"
"$PY" - <<'EOF'
import importlib
for m in ("numpy", "ml_dtypes", "pytest", "cupy", "cuda.bindings", "cuda"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m}: {getattr(mod, '__version__', 'present')}")
    except Exception as e:  # report, do not stop: the steps below say what they need
        print(f"  {m}: missing ({type(e).__name__})")
EOF

# ---- 1. build ---------------------------------------------------------------------------------
LIB=${GAZE_KERNELS_LIB:-}
if [ -z "$LIB" ]; then
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  ARCH=${ARCH:-90}
  if [ -n "$NVCC" ] && command -v cmake >/dev/null; then
    step build 100 bash -c "cmake -S plugins_trt -B build/device -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_COMPILER=$NVCC -DCMAKE_CUDA_ARCHITECTURES=$ARCH && cmake --build build/device -j$(nproc)"
    LIB=$REPO/build/device/libgaze_kernels.so
  else
    skip build "no nvcc or cmake (set GAZE_KERNELS_LIB to a prebuilt libgaze_kernels.so)"
  fi
fi
export GAZE_KERNELS_LIB=$LIB

# ---- 2. kernel suite on the GPU -----------------------------------------------------------------
export GAZE_KERNEL_BACKENDS=gpu GAZE_REQUIRE_GPU=1  # a skipped GPU case fails here
if [ -n "$LIB" ] && [ -f "$LIB" ]; then
  step suite 100 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_bench_cuda.py \
    --junitxml="$OUT/kernels_gpu.xml"

  # ---- 3. compute-sanitizer on a few cases (v1: decode, prefill with gaze queries, fp32 splits,
  #         ties in a prefill chunk, 1024-region selection; v2: both routings with own_image and a
  #         300-slot spare cache (several splits), a whole-prompt call) -----------------------------
  CASES=(
    "tests/test_kernels.py::test_kernels_match_reference[gpu-float16-64-1-1-1-grid0-region0-images0-3]"
    "tests/test_kernels.py::test_kernels_match_reference[gpu-bfloat16-128-5-2-20-grid9-region9-images9-4]"
    "tests/test_kernels.py::test_fp32_split_merge[gpu-64]"
    "tests/test_kernels.py::test_exact_ties_in_prefill[gpu-12-9-float16]"
    "tests/test_kernels.py::test_many_regions[gpu-grid0-region0-float16]"
    "tests/test_kernels.py::test_v2_tables_match_reference[gpu-bfloat16-64-4-300-kv_head-own_image]"
    "tests/test_kernels.py::test_v2_tables_match_reference[gpu-float16-128-3-5-query_head-own_image]"
    "tests/test_kernels.py::test_v2_whole_prompt_then_decode[gpu]"
  )
  for tool in memcheck racecheck synccheck; do
    if [ -n "$SANITIZER" ]; then
      step "sanitizer-$tool" 60 "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 50 \
        --log-file "$OUT/sanitizer_$tool.log" "$PY" -m pytest -q -p no:cacheprovider "${CASES[@]}"
    else
      skip "sanitizer-$tool" "compute-sanitizer not found"
    fi
  done

  # ---- 4. benchmark: gaze bench op --backend cuda (the issue's grid: 729 / 4096 / 16384 visual tokens,
  #         batch 1 / 8, head dim 64 / 128, 10% kept; the library from $GAZE_KERNELS_LIB) -------------
  step bench-op 90 "$PY" -m gaze_edge.cli bench op --backend cuda --repeats 20 --json "$OUT/bench_op_cuda.json"
else
  skip suite "no libgaze_kernels.so"
fi

# ---- summary ------------------------------------------------------------------------------------
"$PY" - "$OUT" "$START" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

out, start = Path(sys.argv[1]), int(sys.argv[2])
def q(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        return f"? ({e})"
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs, cmd = line.split("\t", 3)
    verdict = "skipped" if rc == "skip" else "pass" if rc == "0" else "timeout" if rc in ("124", "137") else "fail"
    steps.append({"step": name, "verdict": verdict, "exit": rc, "seconds": int(secs), "command": cmd})
report = {
    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "gpu": q(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"]),
    "commit": q(["git", "rev-parse", "HEAD"]),
    "total_seconds": int(time.time()) - start,
    "steps": steps,
    "all_passed": all(s["verdict"] == "pass" for s in steps),
}
(out / "device_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
EOF
echo "== wrote $OUT/device_check.json and $LOG"
