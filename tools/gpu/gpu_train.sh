#!/usr/bin/env bash
# The GPU training check (tools/gpu/gpu_train.py): the supervised baseline and the ACTION pipeline on ACDC at
# 256x256, sized from step times measured on the GPU in its first seconds to fit --budget seconds (default 300),
# scored on the 40 test volumes with BatchNorm re-estimated on clean unlabelled slices; per-class table last.
#   prepare here once:  python tools/gpu/gpu_data.py prepare            (-> gpu_data/acdc, ignored, about 60 MiB)
#   device run:         bash tools/gpu/gpu_train.sh                    (carry: ["gpu_data"]; timeout_s 360)
#   on this CPU:        bash tools/gpu/gpu_train.sh --dry-run          (tiny sizes and data; what CI runs)
# Results go to $OUT (the device tool's output folder) or bench_results/gpu_train/, each as soon as it exists.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
if [ "$DRY" = 0 ]; then
  export TRITON_INTERPRET=0  # the GPU's compiled kernels, never the interpreter
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# no install step: the repository is on PYTHONPATH (no build, no network); the CUDA extension is used only when a
# previous call (tools/gpu/gpu_check.sh) built it in this tree, and the runs pick the Triton kernels by default
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" $PY tools/gpu/gpu_train.py "$@"
