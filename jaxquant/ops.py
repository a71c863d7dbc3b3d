"""``qdot``: the one matmul entry point for float and quantized weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.core.api import dequantize
from jaxquant.core.qarray import QArray

__all__ = ["qdot"]


def qdot(x: jax.Array, w: jax.Array | QArray) -> jax.Array:
    """``x @ dequantize(w)`` through the fastest available backend.

    Args:
      x: activations ``(..., K)``.
      w: a float ``(K, N)`` kernel or a :class:`QArray` of logical shape ``(K, N)``.

    Returns:
      ``(..., N)`` in ``x``'s dtype, accumulated in float32.

    Schemes may provide their own matmul (``scheme._qdot(x, q)``), e.g. LLM.int8's outlier split with an
    int8 x int8 -> int32 product; otherwise the weight is dequantized and multiplied (the XLA path).
    """
    x = jnp.asarray(x)
    if not isinstance(w, QArray):
        w = jnp.asarray(w)
        if w.ndim != 2 or x.shape[-1] != w.shape[0]:
            raise ValueError(f"qdot: x {tuple(x.shape)} and w {tuple(w.shape)} do not contract (need w 2-D, K first)")
        return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if len(w.shape) != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"qdot: x {tuple(x.shape)} and QArray {w.shape} do not contract (need (K, N) with K = x.shape[-1])"
        )
    custom = getattr(w.scheme, "_qdot", None)
    if custom is not None:
        return custom(x, w)
    wd = dequantize(w).astype(x.dtype)
    return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)
