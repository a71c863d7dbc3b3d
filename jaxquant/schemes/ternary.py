"""Ternary weights, BitNet b1.58 "absmean" quantization (Ma et al. 2024, eq. 1-3).

::

    s = mean |W|  (per tensor, or per output column)       q = clip(round(W / max(s, eps)), -1, 1)
    W_hat = s * q

Codes ``q + 1`` in {0, 1, 2} are packed either 2 bits each (``packing="2bit"``, 4 per byte, what a GPU
kernel wants) or base 3 (``packing="base3"``, 5 per byte = 1.6 bits). Scales are float32. :func:`repack`
converts between the two exactly (the GPU kernels read 2-bit codes; base 3 is the smaller storage).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.core import packing
from jaxquant.core.numerics import true_divide, true_mean
from jaxquant.core.qarray import QArray, Scheme

__all__ = ["TernaryScheme", "repack"]


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


def _repack_one(q: QArray, to: str) -> QArray:
    s = q.scheme
    if not isinstance(s, TernaryScheme) or s.packing == to:
        return q
    n = math.prod(q.shape) if s.granularity == "tensor" else q.shape[0]
    t = packing.unpack(q.data, 2, n) if s.packing == "2bit" else packing.unpack_trits(q.data, n)
    data = packing.pack(t, 2) if to == "2bit" else packing.pack_trits(t)
    return dataclasses.replace(q, data=data, scheme=dataclasses.replace(s, packing=to))


def repack(tree: Any, to: str) -> Any:
    """Store every :class:`TernaryScheme` QArray in ``tree`` (a QArray or any pytree) with ``packing=to``.

    Exact: the same codes and scale, so ``dequantize`` and every product give the same results; it equals quantizing
    the original weights with ``packing=to``. Base 3 (1.6 bits per weight) is the smaller storage; the GPU kernels
    read 2-bit codes (a base-3 weight takes the XLA path, which unpacks it on every call), so convert once after
    loading: ``repack(params, "2bit")``. Other leaves are returned as they are. Raises ``ValueError`` for an
    unknown packing.
    """
    if to not in ("2bit", "base3"):
        raise ValueError(f"repack: to must be '2bit' or 'base3', got {to!r}")
    return jax.tree.map(
        lambda leaf: _repack_one(leaf, to) if isinstance(leaf, QArray) else leaf,
        tree,
        is_leaf=lambda leaf: isinstance(leaf, QArray),
    )
