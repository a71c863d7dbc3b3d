"""Plain float storage in a narrower float dtype (bf16 / f16) as a scheme, for size/quality baselines.

``W_hat = float(W.astype(dtype))``: round to nearest even, no scale.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.core.qarray import QArray, Scheme

__all__ = ["CastScheme"]


@dataclasses.dataclass(frozen=True)
class CastScheme(Scheme):
    """Store weights in ``dtype`` (``"bfloat16"`` or ``"float16"``); dequantize back to the original dtype."""

    dtype: str = "bfloat16"

    kind = "cast"

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"CastScheme: dtype must be 'bfloat16' or 'float16', got {self.dtype!r}")

    def describe(self) -> str:
        return self.dtype

    def _check_shape(self, shape):
        return None

    def _quantize(self, w: jax.Array) -> QArray:
        return QArray(
            data=w.astype(self.dtype),
            scale=None,
            scheme=self,
            shape=tuple(w.shape),
            dtype=jnp.dtype(w.dtype).name,
        )

    def _dequantize(self, q: QArray) -> jax.Array:
        return q.data.astype(q.dtype)
