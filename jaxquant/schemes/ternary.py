"""Ternary weights, BitNet b1.58 "absmean" quantization (Ma et al. 2024, eq. 1-3).

::

    s = mean |W|  (per tensor, or per output column)       q = clip(round(W / max(s, eps)), -1, 1)
    W_hat = s * q

Codes ``q + 1`` in {0, 1, 2} are packed either 2 bits each (``packing="2bit"``, 4 per byte, what a GPU
kernel wants) or base 3 (``packing="base3"``, 5 per byte = 1.6 bits). Scales are float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxquant.core import packing
from jaxquant.core.numerics import true_divide, true_mean
from jaxquant.core.qarray import QArray, Scheme

__all__ = ["TernaryScheme"]


@dataclasses.dataclass(frozen=True)
class TernaryScheme(Scheme):
    """BitNet b1.58 ternary weights.

    Args:
      granularity: ``"tensor"`` (the paper's single scale) or ``"channel"``.
      packing: ``"2bit"`` or ``"base3"``.
      eps: lower bound of the scale (guards all-zero weights).
    """

    granularity: str = "tensor"
    packing: str = "2bit"
    eps: float = 1e-5

    kind = "ternary"

    def __post_init__(self):
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(f"TernaryScheme: granularity must be 'tensor' or 'channel', got {self.granularity!r}")
        if self.packing not in ("2bit", "base3"):
            raise ValueError(f"TernaryScheme: packing must be '2bit' or 'base3', got {self.packing!r}")
        if not self.eps > 0:
            raise ValueError(f"TernaryScheme: eps must be > 0, got {self.eps!r}")

    def describe(self) -> str:
        return f"ternary per-{self.granularity} {self.packing}"

    def _check_shape(self, shape):
        if self.granularity == "channel":
            super()._check_shape(shape)

    def _codes_2d(self, w: jax.Array) -> jax.Array:
        return w if self.granularity == "channel" else w.reshape(-1)

    def _quantize(self, w: jax.Array) -> QArray:
        shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
        wf = self._codes_2d(w.astype(jnp.float32))
        s = true_mean(jnp.abs(wf), axis=None if self.granularity == "tensor" else 0)
        s = jnp.maximum(s, self.eps)
        t = (jnp.clip(jnp.round(true_divide(wf, s)), -1, 1) + 1).astype(jnp.uint8)
        data = packing.pack(t, 2) if self.packing == "2bit" else packing.pack_trits(t)
        return QArray(data=data, scale=s.astype(jnp.float32), scheme=self, shape=shape, dtype=dtype)

    def _dequantize(self, q: QArray) -> jax.Array:
        n = math.prod(q.shape) if self.granularity == "tensor" else q.shape[0]
        t = packing.unpack(q.data, 2, n) if self.packing == "2bit" else packing.unpack_trits(q.data, n)
        out = (t.astype(jnp.float32) - 1.0) * q.scale
        return out.reshape(q.shape).astype(q.dtype)
