"""``quantize`` / ``dequantize``: the two entry points every scheme is used through."""

from __future__ import annotations

import functools

import jax

from jaxquant.core.qarray import QArray, Scheme
from jaxquant.core.validate import check_weight

__all__ = ["dequantize", "quantize"]


@functools.partial(jax.jit, static_argnums=1)
def _quantize_compiled(w: jax.Array, scheme: Scheme) -> QArray:
    return scheme._quantize(w)


def quantize(w: jax.Array, scheme: Scheme, *, allow_nonfinite: bool = False) -> QArray:
    """Quantize a floating array with ``scheme``.

    Args:
      w: weight, usually a ``(in_features, out_features)`` kernel like a Flax ``Dense``/``nnx.Linear`` kernel;
        float32, bfloat16 or float16.
      scheme: a :class:`~jaxquant.core.qarray.Scheme` instance (``IntScheme``, ``NF4Scheme``, ...). Schemes are
        hashable: ``jax.jit(quantize, static_argnums=1)`` works.
      allow_nonfinite: accept NaN/Inf in ``w`` (they propagate into the affected scales). By default they raise.
        The check needs concrete values; under ``jit``/``vmap`` it cannot run and NaN propagates.

    Returns:
      A :class:`QArray`; ``dequantize`` of it has ``w``'s shape and dtype.

    Raises:
      TypeError: ``scheme`` is not a Scheme, or ``w`` is not a floating array.
      ValueError: ``w`` is empty, has the wrong rank for the scheme, or holds NaN/Inf.
    """
    if not isinstance(scheme, Scheme):
        raise TypeError(
            f"scheme must be a jaxquant Scheme instance (e.g. IntScheme(bits=4, group_size=128)), "
            f"got {type(scheme).__name__}"
        )
    w = check_weight(w, allow_nonfinite=allow_nonfinite)
    scheme._check_shape(tuple(w.shape))
    # compiled once per (shape, dtype, scheme): one XLA program instead of dozens of eager dispatches; inside
    # a user's jit/vmap this is simply inlined
    return _quantize_compiled(w, scheme)


def dequantize(q: QArray) -> jax.Array:
    """Reconstruct the array a :class:`QArray` stands for, in its original shape and dtype."""
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize expects a QArray, got {type(q).__name__}")
    return q.scheme._dequantize(q)
