"""Calibrated post-training quantization: GPTQ, AWQ, SmoothQuant.

Layer level (pure functions, jit/vmap friendly)::

    from jaxquant.algorithms import gptq_core, awq_layer
    q = gptq_core.gptq(w, h, IntScheme(4, 128, symmetric=False), act_order=True, static_groups=True)
    q, s = awq_layer(w, h, mean_abs, IntScheme(4, 128, symmetric=False))      # x @ w ~ (x / s) @ dequantize(q)

Model level: :func:`gptq_model`, :func:`awq_model`, :func:`smoothquant_model` (statistics from
:mod:`jaxquant.calibrate`), and the SPECs of :mod:`jaxquant.algorithms.specs`.

``jaxquant.algorithms.gptq`` and ``jaxquant.algorithms.awq`` are the modules (the layer functions are
``gptq_core.gptq`` = ``gptq.gptq`` and ``awq.awq_layer``), so that ``import jaxquant.algorithms.gptq`` keeps
meaning the module.
"""

from jaxquant.algorithms.awq import AWQConfig, AWQRecord, awq_layer, awq_model, fold_scales, search_clip, search_scale
from jaxquant.algorithms.gptq import GPTQConfig, LayerRecord, gptq_model, split_columns
from jaxquant.algorithms.gptq_core import GPTQStats, gptq_with_stats
from jaxquant.algorithms.smoothquant import SmoothQuantConfig, smooth_scales, smoothquant_model

__all__ = [
    "AWQConfig",
    "AWQRecord",
    "GPTQConfig",
    "GPTQStats",
    "LayerRecord",
    "SmoothQuantConfig",
    "awq_layer",
    "awq_model",
    "fold_scales",
    "gptq_model",
    "gptq_with_stats",
    "search_clip",
    "search_scale",
    "smooth_scales",
    "smoothquant_model",
    "split_columns",
]
