"""Small numeric helpers that make quantization reproducible across eager, jit, vmap and NumPy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rounded_product", "tree_sum", "true_divide", "true_mean"]


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


@functools.partial(jax.jit, static_argnames="axis")
def tree_sum(x: jax.Array, axis: int | None = None) -> jax.Array:
    """Sum along ``axis`` (``None``: all elements) by a fixed pairwise tree of elementwise adds.

    XLA's reduce picks its own summation order, which depends on the shape and changes under ``vmap`` (a
    batched reduce), so a float32 ``jnp.sum`` can differ by an ulp between eager/jit and vmap. Halving with
    elementwise adds fixes the order (and the rounding) everywhere.
    """
    x = x.reshape(-1) if axis is None else jnp.moveaxis(x, axis, 0)
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros_like(x[:1])])
        h = x.shape[0] // 2
        x = x[:h] + x[h:]
    return x[0]


def true_mean(x: jax.Array, axis=None) -> jax.Array:
    """Mean with a reproducible sum (:func:`tree_sum`) and a correctly rounded division (:func:`true_divide`)."""
    n = x.size if axis is None else x.shape[axis]
    return true_divide(tree_sum(x, axis=axis), jnp.asarray(n, x.dtype))


def rounded_product(a, b) -> jax.Array:
    """``a * b`` rounded to its dtype on its own, also when an addition follows.

    XLA:CPU contracts ``a*b + c`` into a fused multiply-add, which skips the rounding of the product and flips
    ``floor(x * id + 0.5)``-style rounding at exact ties (llama.cpp/gguf-py round the product first). An
    ``optimization_barrier`` does not stop it (it is gone from the compiled program); a select on the product
    does: the multiply then feeds a select, not the add, so it cannot be fused with it. NaN stays NaN.
    """
    p = jnp.asarray(a) * jnp.asarray(b)
    return jnp.where(jnp.isnan(p), jnp.asarray(np.nan, p.dtype), p)
