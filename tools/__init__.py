"""Developer tools beside the packages, run from a checkout and never installed (pyproject.toml installs only
`action_kernels` and `action`; neither imports anything from here):

  kernel_report/   python -m tools.kernel_report: the static AOT report of every kernel, its estimate model and the
                   launch-table tuner (python -m tools.kernel_report.tune); docs/kernel-report.md
  gpu/             the scripts a lent GPU machine runs: gpu_check.sh (the whole GPU check), gpu_train.sh +
                   gpu_train.py (the GPU training check), gpu_data.py (the compact ACDC copy that travels with the
                   call), ddp_check.py (the multi-process check), cuda_precision.py (the CUDA kernels' error against
                   float64); docs/gpu-check.md
"""
