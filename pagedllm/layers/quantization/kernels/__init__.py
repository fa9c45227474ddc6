"""Kernels and the shared integer-weight core of the quantization methods."""
