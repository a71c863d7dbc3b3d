"""Pallas (Triton) GPU kernels for jaxquant's quantized matmuls, each beside its plain-XLA reference.

Kernels (one module each): :mod:`~pallas_kernels.int4_matmul` (W4A16, W8A16, W2A16 weight-only integers),
:mod:`~pallas_kernels.nf4_matmul` (NF4, bitsandbytes layout, double quantization),
:mod:`~pallas_kernels.int8_outlier_matmul` (LLM.int8 outlier split),
:mod:`~pallas_kernels.fp8_matmul` (fp8 W8A16 and W8A8 with fused activation quantization),
:mod:`~pallas_kernels.ternary_matmul` (BitNet b1.58 W1.58A16 and W1.58A8).
Block sizes per device: :mod:`~pallas_kernels.tuning`. CPU-side checks (CUDA lowering, cubin compilation with
PyPI triton): :mod:`~pallas_kernels._triton_tools`. This package depends only on JAX; ``jaxquant.qdot`` is the
only place that chooses a kernel.
"""

from pallas_kernels._common import BlockConfig

__all__ = ["BlockConfig"]
