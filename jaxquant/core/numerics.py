"""Small numeric helpers that make quantization reproducible across eager, jit, vmap and NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["true_divide", "true_mean"]


def true_divide(a, b) -> jax.Array:
    """Correctly rounded IEEE ``a / b``, also when ``b`` is a scalar or a broadcast.

    XLA rewrites a division by a broadcast value into a multiplication by its reciprocal, which is 1 ulp off
    for about half of all inputs (e.g. ``x / 448``). Quantizers divide by scales, and a 1-ulp change can flip
    a rounding decision, so eager, jit, vmap and NumPy references (gguf-py, ml_dtypes) would disagree.
    The divisor is therefore made a full array behind an optimization barrier, and tied to ``a``
    (``b + 0 * a``, which XLA may not fold for floats) so that under ``vmap`` it is batched like ``a`` rather
    than re-broadcast after the barrier. A non-finite ``a`` thus gives NaN rather than +-inf; quantizers reject
    non-finite weights by default.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    dtype = jnp.result_type(a, b)
    a = jnp.broadcast_to(a.astype(dtype), shape)
    tie = jax.lax.stop_gradient(a) * np.array(0, np.dtype(dtype))
    b_full = jax.lax.optimization_barrier(jnp.broadcast_to(b.astype(dtype), shape) + tie)
    return a / b_full


def true_mean(x: jax.Array, axis=None) -> jax.Array:
    """Mean with a correctly rounded final division (see :func:`true_divide`)."""
    n = x.size if axis is None else x.shape[axis]
    return true_divide(jnp.sum(x, axis=axis), jnp.asarray(n, x.dtype))
