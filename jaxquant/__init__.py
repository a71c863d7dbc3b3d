"""jaxquant: quantization of large language models in JAX.

Public API (see README)::

    import jaxquant as jq
    q = jq.quantize(w, jq.IntScheme(bits=4, group_size=128))
    w_hat = jq.dequantize(q)
    y = jq.qdot(x, q)
"""

from jaxquant.core.api import dequantize, quantize
from jaxquant.core.qarray import QArray, Scheme
from jaxquant.ops import qdot
from jaxquant.schemes import IntScheme

__version__ = "0.1.0"

__all__ = ["IntScheme", "QArray", "Scheme", "dequantize", "qdot", "quantize"]
