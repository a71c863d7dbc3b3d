"""Flax NNX quantized layers and module swapping."""

from jaxquant.nn.layers import (
    BitLinear,
    Fp8Linear,
    Int8OutlierLinear,
    LoRA,
    QLinear,
    QWeight,
    Stat,
    linear_parts,
    variable_value,
)
from jaxquant.nn.swap import is_linear, module_path, quantize_model

__all__ = [
    "BitLinear",
    "Fp8Linear",
    "Int8OutlierLinear",
    "LoRA",
    "QLinear",
    "QWeight",
    "Stat",
    "is_linear",
    "linear_parts",
    "module_path",
    "quantize_model",
    "variable_value",
]
