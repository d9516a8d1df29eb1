"""Launchers of the CUDA kernels of csrc/, one module per op. The extension loader lives in
action_kernels._extension; its names are re-exported here, where the launchers import them."""
from action_kernels._extension import (
    REBUILD_HINT,
    device_supported,
    extension,
    flavours,
    host_module,
    launch_context,
    rows_arg,
)

__all__ = ["REBUILD_HINT", "device_supported", "extension", "flavours", "host_module", "launch_context", "rows_arg"]
