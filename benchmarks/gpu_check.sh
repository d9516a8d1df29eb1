#!/usr/bin/env bash
# One call on a lent GPU (about 8 minutes; run it through the device tool): build the CUDA extension, run the GPU
# tests, time every provider at the representative sizes, print a short table last. Full logs and CSV/JSON go to
# $OUT (the device tool's output folder) or ./gpu_results.
#   device run:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

echo "== build (ACTION_KERNELS_BUILD=cuda, no network: --no-build-isolation)"
ACTION_KERNELS_BUILD=cuda $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
$PY -m action_kernels.env_report | tee "$OUT/env_report.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== GPU tests (pytest -m cuda)"
timeout 240 $PY -m pytest -q -m cuda tests/test_gpu.py -x >"$OUT/tests.log" 2>&1
echo "tests exit code: $?" | tee -a "$OUT/tests.log"
tail -n 5 "$OUT/tests.log"

echo "== benchmark (bf16)"
timeout 300 $PY benchmarks/bench_loss.py --device cuda --dtype bf16 --repeats 5 --out "$OUT" \
  --ops soft --sizes "65536,4096,128;65536,65536,128;65536,16384,512" >"$OUT/bench_soft.log" 2>&1
timeout 150 $PY benchmarks/bench_loss.py --device cuda --dtype bf16 --repeats 3 --out "$OUT" \
  --ops topk,anatomical >"$OUT/bench_rest.log" 2>&1
echo "== results (full logs in $OUT)"
grep -E "^(op|soft|topk|anatomical|  |ceilings)" "$OUT/bench_soft.log" "$OUT/bench_rest.log" | cut -c1-200 | tail -n 60
