"""Public ops: validation, dispatch and autograd around the kernels."""
