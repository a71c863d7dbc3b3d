"""Flax NNX quantized layers, module swapping, activation observation and the layer-swap SPECs.

::

    from jaxquant.nn import Fp8Linear, LoRA, QLinear, quantize_model
    qmodel = quantize_model(nnx.clone(model), [(r"layers/\\d+/mlp/\\w+_proj", jq.NF4Scheme()),
                                               (r".*_proj", lambda m: Fp8Linear.from_linear(m))])
"""

from jaxquant.nn.layers import (
    LAYER_CLASSES,
    BitLinear,
    Fp8Linear,
    Int8OutlierLinear,
    LoRA,
    QLinear,
    QWeight,
    Stat,
    layer_from_saved,
    layer_spec,
    linear_parts,
    ternary_codes,
    variable_value,
    weight_params,
)
from jaxquant.nn.observe import InputStats, calibration_batches, observe_inputs, stateful_perplexity
from jaxquant.nn.swap import (
    get_submodule,
    is_linear,
    is_quantized_layer,
    linear_paths,
    module_path,
    path_aware,
    quantize_model,
    set_submodule,
)

__all__ = [
    "LAYER_CLASSES",
    "BitLinear",
    "Fp8Linear",
    "InputStats",
    "Int8OutlierLinear",
    "LoRA",
    "QLinear",
    "QWeight",
    "Stat",
    "calibration_batches",
    "get_submodule",
    "is_linear",
    "is_quantized_layer",
    "layer_from_saved",
    "layer_spec",
    "linear_parts",
    "linear_paths",
    "module_path",
    "observe_inputs",
    "path_aware",
    "quantize_model",
    "set_submodule",
    "stateful_perplexity",
    "ternary_codes",
    "variable_value",
    "weight_params",
]
