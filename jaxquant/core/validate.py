"""Input validation shared by every quantizer: clear errors instead of silent wrong answers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_weight", "is_concrete"]


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds concrete values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_weight(w: Any, name: str = "w", allow_nonfinite: bool = False) -> jax.Array:
    """Validate a weight array and return it as a ``jax.Array``.

    Raises:
      TypeError: ``w`` is not an array, or not of a floating dtype.
      ValueError: ``w`` is empty, or (when its values are concrete) contains NaN or Inf.
    """
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        try:
            w = np.asarray(w)
        except Exception as e:  # pragma: no cover - defensive
            raise TypeError(f"{name} must be an array, got {type(w).__name__}") from e
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating array (float32, bfloat16, float16), got dtype {w.dtype}; "
            f"cast it first, e.g. {name}.astype(jnp.float32)"
        )
    if np.dtype(w.dtype).itemsize == 1:
        raise TypeError(f"{name} is already an 8-bit float ({w.dtype}); dequantize or upcast it first")
    if w.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}); nothing to quantize")
    w = jnp.asarray(w)
    if not allow_nonfinite and is_concrete(w) and not bool(jnp.isfinite(w).all()):
        n_bad = int((~jnp.isfinite(w)).sum())
        raise ValueError(
            f"{name} contains {n_bad} NaN/Inf value(s); quantization would spread them over whole groups. "
            "Fix or mask the weights first (e.g. jnp.nan_to_num), or pass allow_nonfinite=True to accept "
            "NaN scales for the affected groups"
        )
    return w
