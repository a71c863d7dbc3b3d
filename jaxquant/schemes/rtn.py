"""Round-to-nearest integer quantization (RTN) at tensor, channel or group granularity.

For a kernel ``W`` of shape ``(K, N) = (in_features, out_features)``, statistics are taken over the input
(contraction) axis: per tensor, per output channel (one scale per column), or per group of ``group_size``
consecutive input rows in each column (the last group may be shorter when ``group_size`` does not divide K).

Symmetric (``symmetric=True``), restricted signed range ``qmax = 2**(b-1) - 1``::

    s = max|W_g| / qmax            q = clip(round(W / s), -qmax, qmax)        W_hat = s * q

Asymmetric with an integer zero point (``range="zeropoint"``, the GPTQ/AWQ convention; the range is widened
to include 0 so that zero is exact)::

    lo = min(min W_g, 0)   hi = max(max W_g, 0)   s = (hi - lo) / (2**b - 1)   z = clip(round(-lo / s), 0, 2**b - 1)
    q = clip(round(W / s) + z, 0, 2**b - 1)        W_hat = s * (q - z)

Asymmetric on the exact min/max grid (``range="minmax"``, llama.cpp Q4_1/Q5_1 style; with ``bits=4``,
``group_size=32`` and float16 scales it reproduces llama.cpp's Q4_1 bit for bit)::

    m = min W_g   d = (max W_g - m) / (2**b - 1)   q = clip(floor((W - m) / d + 1/2), 0, 2**b - 1)   W_hat = d * q + m

``round`` is round-half-to-even. Scales are computed in float32 and stored in ``scale_dtype`` (float16 by
default, as GPTQ/AWQ checkpoints do), rounded *up* so that no in-range weight is clipped because of the
narrower format; codes are computed with the stored scale, so ``|W - W_hat| <= s/2`` holds exactly for every
weight inside the representable range.

Storage (``QArray`` fields): ``data`` = codes packed along K with :func:`jaxquant.core.packing.pack`
(symmetric codes offset by ``qmax + 1`` into unsigned; 8-bit symmetric codes are stored as plain ``int8``),
``scale`` = ``()`` / ``(N,)`` / ``(G, N)``, ``zero`` = uint8 zero points (zeropoint) or minima in ``scale_dtype``
(minmax), same shape as ``scale``. With ``layout="nk"`` (2-D kernels of 2, 4 or 8 bits) ``data`` is that packed
array transposed, ``(N, packed rows)``: each output column's codes contiguous ("K-major"), the storage the GPU
kernels read through ``ldmatrix`` instead of byte by byte; it dequantizes bit for bit alike. Optional
``aux["g_idx"]`` (int32, ``(K,)``, grouped only): input row ``k`` uses scale/zero row ``g_idx[k]`` instead of
``k // group_size`` (GPTQ act-order without static groups, made by :mod:`jaxquant.algorithms.gptq_core`;
``quantize`` never sets it; the GPU kernels do not read it, so ``qdot`` takes the XLA path for such weights).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core import packing
from jaxquant.core.formats import int_range
from jaxquant.core.layout import check_layout, codes_kn
from jaxquant.core.numerics import rounded_product, true_divide
from jaxquant.core.qarray import QArray, Scheme
from jaxquant.schemes._grouping import expand_rows, group_view, num_groups, round_scale_up

__all__ = ["IntScheme"]

_GRANULARITIES = ("tensor", "channel", "group")
_RANGES = ("zeropoint", "minmax")
_SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class IntScheme(Scheme):
    """Integer round-to-nearest quantization.

    Args:
      bits: code width, 2..8.
      group_size: inputs per group (``granularity="group"``); ``None`` means per output channel.
      symmetric: signed codes in ``[-(2**(b-1)-1), 2**(b-1)-1]`` with no zero point, else unsigned codes.
      granularity: ``"tensor"``, ``"channel"`` or ``"group"``; inferred from ``group_size`` when omitted.
      range: asymmetric only: ``"zeropoint"`` (integer zero point, range includes 0) or ``"minmax"``.
      scale_dtype: storage dtype of scales (and minmax minima): ``"float16"``, ``"bfloat16"``, ``"float32"``.
      layout: how ``data`` stores a 2-D kernel's packed codes: ``"kn"`` (packed along K, ``(packed rows, N)``,
        default) or ``"nk"`` (its transpose, K-major; 2, 4 and 8 bits, 2-D kernels only; see the module docstring
        and :mod:`jaxquant.core.layout`). Convert at quantization time or once after loading
        (:func:`jaxquant.core.layout.relayout`), never per call.
    """

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    granularity: str | None = None
    range: str = "zeropoint"
    scale_dtype: str = "float16"
    layout: str = "kn"

    kind = "int"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"IntScheme: bits must be an int in 2..8, got {self.bits!r}")
        gran = self.granularity
        if gran is None:
            gran = "channel" if self.group_size is None else "group"
            object.__setattr__(self, "granularity", gran)
        if gran not in _GRANULARITIES:
            raise ValueError(f"IntScheme: granularity must be one of {_GRANULARITIES}, got {gran!r}")
        if gran == "group":
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
                raise ValueError(
                    f"IntScheme: group_size must be a positive int for granularity='group', got {gs!r} "
                    "(use group_size=None for per-channel scales)"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"IntScheme: group_size={self.group_size} contradicts granularity={gran!r}; drop one of them"
            )
        if self.range not in _RANGES:
            raise ValueError(f"IntScheme: range must be one of {_RANGES}, got {self.range!r}")
        if self.symmetric and self.range != "zeropoint":
            raise ValueError("IntScheme: range='minmax' needs symmetric=False")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"IntScheme: scale_dtype must be one of {_SCALE_DTYPES}, got {self.scale_dtype!r}")
        check_layout("IntScheme", self.layout)
        if self.layout == "nk" and self.bits not in (2, 4, 8):
            raise ValueError(
                f"IntScheme: layout='nk' stores 2, 4 or 8-bit codes K-major; {self.bits}-bit codes are a dense bit "
                "stream along K (use layout='kn')"
            )

    def can_store(self, layout: str) -> bool:
        """Whether codes of this scheme can be stored in ``layout`` (``"nk"``: 2, 4 and 8 bits only); what
        :func:`jaxquant.core.layout.relayout` asks before converting."""
        return layout == "kn" or (layout == "nk" and self.bits in (2, 4, 8))

    # ------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        g = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        kind = "sym" if self.symmetric else ("asym-minmax" if self.range == "minmax" else "asym")
        kmajor = " K-major" if self.layout == "nk" else ""
        return f"int{self.bits} {g} {kind}{kmajor}"

    def _check_shape(self, shape):
        if self.granularity == "tensor" and self.layout == "kn":
            return
        super()._check_shape(shape)

    def _stat_size(self, k: int) -> int:
        return self.group_size if self.granularity == "group" else k

    def _to_2d(self, w: jax.Array) -> jax.Array:
        if self.granularity == "tensor" and w.ndim != 2:
            return w.reshape(-1, 1)
        return w

    def _store_stats(self, x: jax.Array, k_shape: tuple[int, ...]) -> jax.Array:
        """(G, N) stats to the public storage shape: () tensor, (N,) channel, (G, N) group."""
        if self.granularity == "tensor":
            return x.reshape(())
        if self.granularity == "channel":
            return x[0]
        return x

    def _load_stats(self, x: jax.Array, k: int, n: int) -> jax.Array:
        """Public storage shape back to (K, N) rows."""
        if self.granularity == "tensor":
            return jnp.broadcast_to(x, (k, n))
        if self.granularity == "channel":
            return jnp.broadcast_to(x[None, :], (k, n))
        return expand_rows(x, self.group_size, k)

    def _quantize(self, w: jax.Array) -> QArray:
        orig_shape, orig_dtype = tuple(w.shape), jnp.dtype(w.dtype).name
        w2 = self._to_2d(w.astype(jnp.float32))
        k, n = w2.shape
        gsize = self._stat_size(k)
        if self.granularity == "tensor":
            gv = w2.reshape(1, k * n, 1)
            gsize = k
        else:
            gv = group_view(w2, gsize)  # (G, g, N)
        qmin, qmax = int_range(self.bits, self.symmetric)
        sdt = jnp.dtype(self.scale_dtype)

        def rows(stat):  # (G, N) -> (K, N)
            if self.granularity == "tensor":
                return jnp.broadcast_to(stat.reshape(1, 1), (k, n))
            return expand_rows(stat, gsize, k)

        zero = None
        if self.symmetric:
            amax = jnp.max(jnp.abs(gv), axis=1)
            s = jnp.where(amax != 0, true_divide(amax, np.float32(qmax)), 1.0)
            s_st = round_scale_up(s, sdt)
            q = jnp.clip(jnp.round(true_divide(w2, rows(s_st.astype(jnp.float32)))), qmin, qmax)
            if self.bits == 8:
                data = q.astype(jnp.int8)
            else:
                data = packing.pack((q + (qmax + 1)).astype(jnp.uint8), self.bits)
        elif self.range == "zeropoint":
            lo = jnp.minimum(jnp.min(gv, axis=1), 0.0)
            hi = jnp.maximum(jnp.max(gv, axis=1), 0.0)
            s = jnp.where(hi != lo, true_divide(hi - lo, np.float32(qmax)), 1.0)
            s_st = round_scale_up(s, sdt)
            sf = s_st.astype(jnp.float32)
            z = jnp.clip(jnp.round(true_divide(-lo, sf)), 0, qmax)
            q = jnp.clip(jnp.round(true_divide(w2, rows(sf))) + rows(z), 0, qmax)
            data = packing.pack(q.astype(jnp.uint8), self.bits)
            zero = z.astype(jnp.uint8)
        else:  # minmax, llama.cpp Q4_1 style: codes from the float32 d, storage rounded to nearest
            lo = jnp.min(gv, axis=1)
            hi = jnp.max(gv, axis=1)
            d = true_divide(hi - lo, np.float32(qmax))
            inv = jnp.where(d == 0, 0.0, true_divide(np.float32(1.0), jnp.where(d == 0, 1.0, d)))
            q = jnp.clip(jnp.floor(rounded_product(w2 - rows(lo), rows(inv)) + np.float32(0.5)), 0, qmax)
            data = packing.pack(q.astype(jnp.uint8), self.bits)
            s_st = d.astype(sdt)
            zero = self._store_stats(lo.astype(sdt), orig_shape)
        scale = self._store_stats(s_st, orig_shape)
        if zero is not None and self.range == "zeropoint":
            zero = self._store_stats(zero, orig_shape)
        data = codes_kn(data, self.layout)  # (N, packed rows) for "nk"
        return QArray(data=data, scale=scale, zero=zero, scheme=self, shape=orig_shape, dtype=orig_dtype)

    def _dequantize(self, q: QArray) -> jax.Array:
        shape = q.shape
        if self.granularity == "tensor" and len(shape) != 2:
            k, n = math.prod(shape), 1
        else:
            k, n = shape
        _, qmax = int_range(self.bits, self.symmetric)
        g_idx = q.aux.get("g_idx") if isinstance(q.aux, dict) else None
        if g_idx is not None and self.granularity == "group":
            # GPTQ act-order with dynamic groups: row k uses group g_idx[k] (jaxquant.algorithms.gptq_core)
            def load(x):
                return jnp.take(x, g_idx, axis=0)
        else:

            def load(x):
                return self._load_stats(x, k, n)

        s = load(q.scale.astype(jnp.float32))
        data = codes_kn(q.data, self.layout)
        if self.symmetric and self.bits == 8:
            codes = data.astype(jnp.float32)
        else:
            codes = packing.unpack(data, self.bits, k).astype(jnp.float32)
            if self.symmetric:
                codes = codes - (qmax + 1)
        if self.symmetric:
            out = codes * s
        elif self.range == "zeropoint":
            out = (codes - load(q.zero.astype(jnp.float32))) * s
        else:  # the product rounded on its own (no fused multiply-add on any backend; gguf-py's Q4_1 order)
            out = rounded_product(codes, s) + self._load_stats(q.zero.astype(jnp.float32), k, n)
        return out.reshape(shape).astype(q.dtype)

    def storage_bytes(self, shape: tuple[int, ...]) -> int:
        """Analytic storage in bytes for a weight of ``shape`` (what ``QArray.nbytes`` must equal)."""
        if self.granularity == "tensor" and len(shape) != 2:
            k, n = math.prod(shape), 1
        else:
            k, n = shape
        n_stats = {"tensor": 1, "channel": n, "group": num_groups(k, self.group_size or 1) * n}[self.granularity]
        sbytes = jnp.dtype(self.scale_dtype).itemsize
        data = k * n if (self.symmetric and self.bits == 8) else packing.bits_storage(k, self.bits) * n
        zbytes = 0 if self.symmetric else (1 if self.range == "zeropoint" else sbytes)
        return data + n_stats * (sbytes + zbytes)
