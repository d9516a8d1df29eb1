"""Static kernel report: ahead-of-time compilation of the launchers' kernels, their cubins' numbers, and a static
time estimate. Run `python -m tools.kernel_report --help`; the model is in docs/kernel-report.md."""
