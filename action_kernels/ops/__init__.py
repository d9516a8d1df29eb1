"""Public ops, one file per op: each holds its torch.library op(s), the autograd route they register (which the
op's drop-in autograd Function calls too), and the functional (checks from _validation, a backend from dispatch,
kernels from that backend's package)."""
