"""NormalFloat-4 (NF4, QLoRA) blockwise quantization, numerically compatible with bitsandbytes.

Layout (bitsandbytes' ``quantize_4bit(W_torch, quant_type="nf4")`` where ``W_torch = W.T`` is the
``(out_features, in_features)`` weight of a torch ``Linear``): the weight is flattened row-major in the torch
orientation, i.e. ``W.T.reshape(-1)``, so that each block of ``block_size`` consecutive values runs along the
input axis of one output channel (when ``block_size`` divides K). Per block::

    a = max |x_block|  (float32)        c_i = argmin_j |x_i * (1/a) - NF4_CODE[j]|  (ties -> lower code)
    x_hat_i = NF4_CODE[c_i] * a

Codes are packed two per byte, the even element in the **high** nibble (bitsandbytes' order).

Double quantization (``double_quant=True``, QLoRA Sec. 3): the float32 absmax values are themselves quantized:
``offset = mean(a)``, then ``a - offset`` is quantized 8-bit blockwise (blocks of 256) with bitsandbytes'
signed "dynamic" code (a dynamic-exponent 8-bit map, Dettmers 2016), with one float32 absmax per 256 blocks.
That costs ``8/64 + 32/(64*256)`` bits per weight for the absmax instead of ``32/64``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.formats import NF4_CODE, NF4_MIDPOINTS
from jaxquant.core.numerics import rounded_product, true_divide, true_mean
from jaxquant.core.qarray import QArray, Scheme

__all__ = ["DYNAMIC_CODE", "NF4Scheme", "dequantize_dynamic8", "quantize_dynamic8"]


def _dynamic_code(max_exponent_bits: int = 7) -> np.ndarray:
    """The signed 8-bit dynamic-exponent code (256 sorted float32 values in [-1, 1]).

    For exponent level ``i = 0..6`` the interval [0.1, 1] is cut into ``2**i`` equal pieces; the piece
    midpoints scaled by ``10**(i - 6)`` and their negatives are code values; 0 and 1 complete the 256 values.
    """
    vals: list[float] = []
    for i in range(max_exponent_bits):
        edges = np.linspace(0.1, 1.0, 2**i + 1, dtype=np.float32)
        mids = (edges[:-1] + edges[1:]) / np.float32(2.0)
        mag = np.float32(10.0 ** (i - (max_exponent_bits - 1)))
        vals += (mids * mag).tolist()
        vals += (-(mids * mag)).tolist()
    vals += [0.0, 1.0]
    return np.sort(np.array(vals, dtype=np.float32))


_NF4_ZERO_CODE = int(np.flatnonzero(NF4_CODE == 0.0)[0])

DYNAMIC_CODE = _dynamic_code()
_DYN_MID = ((DYNAMIC_CODE[1:] + DYNAMIC_CODE[:-1]) / 2).astype(np.float32)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    n = x.shape[0]
    pad = (-n) % block
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,), x.dtype)])
    return x.reshape(-1, block)


def quantize_dynamic8(x: jax.Array, block: int = 256) -> tuple[jax.Array, jax.Array]:
    """Blockwise 8-bit quantization of a 1-D float32 array with the signed dynamic code.

    Returns ``(codes uint8 (n,), absmax float32 (ceil(n/block),))``; nearest code, ties to the lower code.
    """
    n = x.shape[0]
    xb = _blocks(x, block)
    amax = jnp.max(jnp.abs(xb), axis=1)
    safe = jnp.where(amax > 0, amax, 1.0)
    normed = true_divide(xb, safe[:, None])
    codes = jnp.searchsorted(jnp.asarray(_DYN_MID), normed, side="left")
    return codes.reshape(-1)[:n].astype(jnp.uint8), amax


def dequantize_dynamic8(codes: jax.Array, absmax: jax.Array, block: int = 256) -> jax.Array:
    """Inverse of :func:`quantize_dynamic8`."""
    n = codes.shape[0]
    vals = _blocks(jnp.asarray(DYNAMIC_CODE)[codes.astype(jnp.int32)], block)
    # rounded_product: the NF4 double-quant caller adds an offset, which XLA:CPU would fuse into an FMA under
    # jit (one rounding instead of two), making jitted and eager dequantization differ by an ulp
    return rounded_product(vals, absmax[:, None]).reshape(-1)[:n]


@dataclasses.dataclass(frozen=True)
class NF4Scheme(Scheme):
    """NF4 blockwise quantization (bitsandbytes layout).

    Args:
      block_size: values per absmax block (bitsandbytes: 64).
      double_quant: quantize the absmax values too (QLoRA double quantization).
    """

    block_size: int = 64
    double_quant: bool = False

    kind = "nf4"

    def __post_init__(self):
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0 or bs % 2:
            raise ValueError(f"NF4Scheme: block_size must be a positive even int, got {bs!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"NF4Scheme: double_quant must be a bool, got {self.double_quant!r}")

    def describe(self) -> str:
        return f"nf4 b{self.block_size}" + (" dq" if self.double_quant else "")

    def _check_shape(self, shape):
        if len(shape) not in (1, 2):
            raise ValueError(f"NF4Scheme quantizes 1-D or 2-D (in, out) arrays, got shape {shape}")

    @staticmethod
    def _flat(w: jax.Array) -> jax.Array:
        return (w.T if w.ndim == 2 else w).reshape(-1)

    def _quantize(self, w: jax.Array) -> QArray:
        shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
        flat = self._flat(w.astype(jnp.float32))
        n = flat.shape[0]
        xb = _blocks(flat, self.block_size)
        amax = jnp.max(jnp.abs(xb), axis=1)
        safe = jnp.where(amax > 0, amax, 1.0)
        # bitsandbytes normalises with x * (1/absmax) (reciprocal rounded to float32, then a product), not a
        # correctly rounded x / absmax; doing the same keeps codes bit-identical next to decision boundaries
        inv = true_divide(np.float32(1.0), safe)
        codes = jnp.searchsorted(jnp.asarray(NF4_MIDPOINTS), xb * inv[:, None], side="left")
        codes = codes.reshape(-1)[:n].astype(jnp.uint8)
        if n % 2:  # pad with the code of 0.0 (7), as bitsandbytes does
            codes = jnp.concatenate([codes, jnp.full((1,), _NF4_ZERO_CODE, jnp.uint8)])
        pairs = codes.reshape(-1, 2)
        data = (pairs[:, 0] << jnp.uint8(4)) | pairs[:, 1]
        if not self.double_quant:
            return QArray(data=data, scale=amax, scheme=self, shape=shape, dtype=dtype)
        offset = true_mean(amax)
        qa, amax2 = quantize_dynamic8(amax - offset)
        aux = {"absmax_scale": amax2, "absmax_offset": offset.astype(jnp.float32)}
        return QArray(data=data, scale=qa, aux=aux, scheme=self, shape=shape, dtype=dtype)

    def absmax(self, q: QArray) -> jax.Array:
        """Per-block float32 absmax (dequantized when double quantization is on)."""
        if not self.double_quant:
            return q.scale
        return dequantize_dynamic8(q.scale, q.aux["absmax_scale"]) + q.aux["absmax_offset"]

    def _dequantize(self, q: QArray) -> jax.Array:
        n = math.prod(q.shape)
        codes = jnp.stack([q.data >> jnp.uint8(4), q.data & jnp.uint8(15)], axis=1).reshape(-1)
        vals = _blocks(jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)], self.block_size)
        flat = (vals * self.absmax(q)[:, None]).reshape(-1)[:n]
        if len(q.shape) == 2:
            k, m = q.shape
            out = flat.reshape(m, k).T
        else:
            out = flat
        return out.astype(q.dtype)
