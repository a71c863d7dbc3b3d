"""jaxquant: quantization of large language models in JAX.

Public API (see README)::

    import jaxquant as jq
    q = jq.quantize(w, jq.IntScheme(bits=4, group_size=128))
    w_hat = jq.dequantize(q)
    y = jq.qdot(x, q)
    qparams = jq.quantize_params(params, [(r".*_proj/kernel", jq.IntScheme(bits=4, group_size=128))])
    print(jq.report(qparams))
"""

from jaxquant.core.api import dequantize, quantize
from jaxquant.core.layout import relayout
from jaxquant.core.qarray import QArray, Scheme
from jaxquant.ops import qdot
from jaxquant.schemes import CastScheme, FP8Scheme, IntScheme, LLMInt8Scheme, NF4Scheme, TernaryScheme
from jaxquant.transform import Report, quantize_params, report

__version__ = "0.1.0"

__all__ = [
    "CastScheme",
    "FP8Scheme",
    "IntScheme",
    "LLMInt8Scheme",
    "NF4Scheme",
    "QArray",
    "Report",
    "Scheme",
    "TernaryScheme",
    "dequantize",
    "qdot",
    "quantize",
    "quantize_params",
    "relayout",
    "report",
]
