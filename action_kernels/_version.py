"""The version of the action-kernels distribution (both packages, action_kernels and action), written only here:
pyproject.toml reads it (setuptools' dynamic version, parsed without importing the package)."""
__version__ = "0.2.0"
