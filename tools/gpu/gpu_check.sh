#!/usr/bin/env bash
# The whole GPU check in one call on a lent GPU, within 8 minutes of device time (GPU_CHECK_BUDGET_S, 470 s of
# steps + the table; call it with timeout_s=480): environment, CUDA extension build, the static kernel report
# (triton as installed there), the GPU tests, the benchmark with its two measured ceilings, the multi-process check
# (DDP over NCCL, gloo on CUDA tensors, SyncBatchNorm), then a short table. Every step has its own time limit, cut
# to what is left of the budget (a step with nothing left is not run and says so), so the table always comes. Each
# step writes its results under $OUT as soon as it finishes, so a timeout still returns what ran. At most 8 files
# land in $OUT (the device tool's limit): summary.md, steps.log, env.txt, kernel_report.json, kernel_report.txt,
# tests.log, bench_results.tar.gz, ddp.log.
#   device run:  bash tools/gpu/gpu_check.sh             (through the device tool; torch, triton, pybind11, pytest)
#   rehearsal:   bash tools/gpu/gpu_check.sh --dry-run   (this CPU: every step and output file at tiny sizes)
set -uo pipefail
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash tools/gpu/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
# Compiled kernels, never the CPU interpreter: tests/conftest.py sets TRITON_INTERPRET=1 only when torch sees no
# CUDA device, and this makes sure nothing inherited turns it on.
export TRITON_INTERPRET=0
PY=${PYTHON:-python3}
STEPS="$OUT/steps.log"
SUMMARY="$OUT/summary.md"
: > "$STEPS"
printf '| step | exit | seconds | limit |\n|---|---|---|---|\n' > "$SUMMARY"

# step NAME LIMIT_S COMMAND...: runs it with a time limit (the real run's; the rehearsal allows SCALE times more,
# for a shared 2-core CPU) cut to what is left of BUDGET_S since the start, its output appended to steps.log, one
# summary row
SCALE=$([ $DRY = 1 ] && echo 4 || echo 1)
BUDGET_S=$(( ${GPU_CHECK_BUDGET_S:-470} * SCALE ))
T0=$(date +%s)
step() {
  local name=$1 limit=$(( $2 * SCALE )) start rc left note=""
  shift 2
  left=$(( BUDGET_S - ( $(date +%s) - T0 ) ))
  if [ $left -lt 1 ]; then
    echo "== $name: not run, nothing left of the ${BUDGET_S} s budget" | tee -a "$STEPS"
    echo "| $name | not run (budget spent) | 0 | 0 of $limit |" >> "$SUMMARY"
    return 124
  fi
  if [ $left -lt $limit ]; then note=" of $limit (budget)"; limit=$left; fi
  start=$(date +%s)
  echo "== $name (limit ${limit} s$note): $*" | tee -a "$STEPS"
  timeout "$limit" "$@" >> "$STEPS" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$STEPS"
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (time limit)') | $(( $(date +%s) - start )) | $limit$note |" >> "$SUMMARY"
  return $rc
}

if [ $DRY = 1 ]; then
  echo "gpu_check DRY RUN on $(uname -m), no GPU: tiny sizes, CPU benchmark" | tee "$OUT/env.txt"
  BUILD_MODE=none          # the real run builds the CUDA flavour; here only the build command's path runs
  REPORT_ARGS=(--arch sm_90 --ops soft_contrastive --dtypes bf16 --dims 64 --jobs 2)
  BENCH_SOFT=(--device cpu --dtype fp32 --repeats 1 --no-memory --ops soft --sizes "300,200,32" --providers naive,chunked,triton,cuda)
  BENCH_REST=(--device cpu --dtype fp32 --repeats 1 --no-memory --ops topk,anatomical --sizes "300,200,32" --providers naive,chunked,class_graph,triton,cuda)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1
  BUILD_MODE=cuda
  REPORT_ARGS=(--arch sm_90 --dtypes bf16,fp32 --dims 128,512 --jobs "$(nproc)")
  BENCH_SOFT=(--device cuda --dtype bf16 --repeats 5 --ops soft --providers triton,cuda,chunked
              --sizes "65536,4096,128;65536,65536,128;65536,16384,512")
  BENCH_REST=(--device cuda --dtype bf16 --repeats 3 --ops topk,anatomical)
fi

# 1. build (no network there: no build isolation, no dependency resolution); the rehearsal only resolves the
#    build (pip --dry-run), so it leaves the installed package alone
step build 120 env ACTION_KERNELS_BUILD=$BUILD_MODE $PY -m pip install -q --no-build-isolation --no-deps \
  $([ $DRY = 1 ] && echo --dry-run) -e .
if [ $? != 0 ] && [ $DRY = 0 ]; then echo "BUILD FAILED: later steps use what is importable" | tee -a "$STEPS"; fi
$PY -m action_kernels.env_report >> "$OUT/env.txt" 2>&1

# 2. the static kernel report, compiled by the triton installed here (the device's, on a real run)
step kernel_report 90 $PY -m tools.kernel_report "${REPORT_ARGS[@]}" --json "$OUT/kernel_report.json" \
  --markdown "$OUT/kernel_report.txt"

# 3. GPU tests (skip themselves without a CUDA device)
step gpu_tests 150 $PY -m pytest -q -m cuda tests/test_gpu.py -p no:cacheprovider -rfE
grep -E "passed|failed|skipped|error|FAILED|ERROR" "$STEPS" | tail -n 20 > "$OUT/tests.log"

# 4. benchmark: every provider at the target sizes with the measured ceilings (a bf16 GEMM, a device copy)
BENCH=$(mktemp -d)
step bench_soft 150 $PY benchmarks/bench_loss.py "${BENCH_SOFT[@]}" --out "$BENCH"
step bench_topk 90 $PY benchmarks/bench_loss.py "${BENCH_REST[@]}" --out "$BENCH"
tar -czf "$OUT/bench_results.tar.gz" -C "$BENCH" . && rm -rf "$BENCH"

# 5. multi-process training (tools/gpu/ddp_check.py: 4 fp32 iterations per run against one process, about 2
#    minutes on a GPU: an estimate, not yet timed on one; rows as runs finish). The rehearsal runs its gloo part on
#    this CPU (about 25 s on 2 cores) with nibabel made unimportable, as it is on the lent machine.
DDP=$(mktemp -d)
if [ $DRY = 1 ]; then
  mkdir -p "$DDP/no_nibabel/nibabel"
  echo "raise ImportError('nibabel is not installed on the lent GPU machine (gpu_check --dry-run)')" \
    > "$DDP/no_nibabel/nibabel/__init__.py"
  step ddp 150 env PYTHONPATH="$DDP/no_nibabel${PYTHONPATH:+:$PYTHONPATH}" $PY tools/gpu/ddp_check.py --device cpu \
    --out "$DDP/out"
else
  step ddp 150 $PY tools/gpu/ddp_check.py --out "$DDP/out"
fi
{ sed -n '/^== ddp /,/^== ddp: /p' "$STEPS"; cat "$DDP/out/ddp_check.json" 2>/dev/null; } > "$OUT/ddp.log"
rm -rf "$DDP"

# 6. the short table, last
{
  echo
  echo "## results ($([ $DRY = 1 ] && echo 'DRY RUN, CPU' || echo 'GPU'))"
  echo
  grep -E "^(op  |soft  |topk  |anatomical )" "$STEPS" | cut -c1-200
  grep -E "^ceilings|GEMM floor" "$STEPS" | cut -c1-200
  echo
  echo "kernel report (static ESTIMATES):"
  awk '/^Triton: static ESTIMATE per mode/ {on = 1; next} on && /^\|/ {print; seen = 1; next} seen {exit}' \
    "$OUT/kernel_report.txt" | grep -E "^\|( arch|---)|\| bf16 \|" | head -n 16
  echo
  echo "tests: $(tail -n 1 "$OUT/tests.log")"
  echo
  echo "multi-process check (max |difference| from one process computing the same step):"
  grep -E "^(run  |(gloo|nccl|syncbn)-[0-9a-z]+ )" "$OUT/ddp.log"
} >> "$SUMMARY"
cat "$SUMMARY"
