"""fp8 quantization (e4m3 = ``float8_e4m3fn``, e5m2) with a per-tensor or per-output-channel scale.

::

    s = amax / FMAX            q = fp8(clip(W / s, -FMAX, FMAX))        W_hat = float32(q) * s

``FMAX`` is 448 for e4m3fn and 57344 for e5m2. The cast rounds to nearest even, exactly like ``ml_dtypes``;
values are clipped first, so overflow saturates instead of producing NaN (e4m3fn has no infinity and
ml_dtypes/XLA turn an overflowing e4m3fn cast into NaN). Scales are float32; an all-zero tensor/channel gets
``s = 1``. ``channel`` granularity takes one scale per output column of a ``(K, N)`` kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.core.formats import fp8_dtype, fp8_max
from jaxquant.core.layout import check_layout, codes_kn
from jaxquant.core.numerics import true_divide
from jaxquant.core.qarray import QArray, Scheme

__all__ = ["FP8Scheme", "fp8_quantize_values"]


def fp8_quantize_values(x: jax.Array, fmt: str, scale: jax.Array) -> jax.Array:
    """Saturating cast of ``x / scale`` to the fp8 format ``fmt`` (round to nearest even)."""
    fmax = fp8_max(fmt)
    return jnp.clip(true_divide(x.astype(jnp.float32), scale), -fmax, fmax).astype(fp8_dtype(fmt))


@dataclasses.dataclass(frozen=True)
class FP8Scheme(Scheme):
    """fp8 weights with float32 scales.

    Args:
      fmt: ``"e4m3"`` (float8_e4m3fn, max 448) or ``"e5m2"`` (max 57344).
      granularity: ``"tensor"`` (one scale) or ``"channel"`` (one scale per output column).
      layout: how ``data`` stores a 2-D kernel's codes: ``"kn"`` (``(K, N)``, default; any shape with
        ``"tensor"``) or ``"nk"`` (``(N, K)``, K-major, 2-D kernels only: the layout fp8 ``wgmma`` reads without a
        transpose; see :mod:`jaxquant.core.layout`). Both dequantize bit for bit alike; float32 dots over the codes
        agree to float32 rounding (XLA may order the sums differently).
    """

    fmt: str = "e4m3"
    granularity: str = "tensor"
    layout: str = "kn"

    kind = "fp8"

    def __post_init__(self):
        fp8_dtype(self.fmt)  # validates fmt
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(f"FP8Scheme: granularity must be 'tensor' or 'channel', got {self.granularity!r}")
        check_layout("FP8Scheme", self.layout)

    def describe(self) -> str:
        kmajor = " K-major" if self.layout == "nk" else ""
        return f"fp8 {self.fmt} per-{self.granularity}{kmajor}"

    def _check_shape(self, shape):
        if self.granularity == "channel" or self.layout == "nk":
            super()._check_shape(shape)

    def _quantize(self, w: jax.Array) -> QArray:
        shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
        wf = w.astype(jnp.float32)
        amax = jnp.max(jnp.abs(wf)) if self.granularity == "tensor" else jnp.max(jnp.abs(wf), axis=0)
        s = jnp.where(amax != 0, true_divide(amax, jnp.float32(fp8_max(self.fmt))), 1.0).astype(jnp.float32)
        data = codes_kn(fp8_quantize_values(wf, self.fmt, s), self.layout)  # (N, K) for "nk"
        return QArray(data=data, scale=s, scheme=self, shape=shape, dtype=dtype)

    def _dequantize(self, q: QArray) -> jax.Array:
        return (codes_kn(q.data, self.layout).astype(jnp.float32) * q.scale).astype(q.dtype)
