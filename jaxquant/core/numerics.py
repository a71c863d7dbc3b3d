"""Small numeric helpers that make quantization reproducible across eager, jit and NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["true_divide", "true_mean"]


def true_divide(a, b) -> jax.Array:
    """Correctly rounded IEEE ``a / b``, also when ``b`` is a scalar or a broadcast.

    XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal, which is 1 ulp
    off for about half of all inputs (e.g. ``x / 448``). Quantizers divide by scales, and a 1-ulp change can
    flip a rounding decision, so eager, jit and NumPy references (gguf-py, ml_dtypes) would disagree. Making
    the divisor a full array behind an optimization barrier keeps the true division.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    dtype = jnp.result_type(a, b)
    return a.astype(dtype) / jax.lax.optimization_barrier(jnp.broadcast_to(b.astype(dtype), shape))


def true_mean(x: jax.Array, axis=None) -> jax.Array:
    """Mean with a correctly rounded final division (see :func:`true_divide`)."""
    n = x.size if axis is None else x.shape[axis]
    return true_divide(jnp.sum(x, axis=axis), jnp.asarray(n, x.dtype))
