"""LLM.int8() (Dettmers et al. 2022): int8 vector-wise weights with a mixed-precision outlier split.

Weight side (``quantize``): for a ``(K, N)`` kernel, one absmax scale per output column (vector-wise)::

    s_w[n] = max_k |W[k, n]| / 127          W_q = round(W / s_w)  (int8, -127..127)

Optionally, chosen input rows (known outlier feature dimensions, ``outlier_rows``) are also kept in
float16 (``aux["outlier_weight"]``, shape ``(len(outlier_rows), N)``), which replace their int8 rows whenever
those rows take part in the float part of the product.

Activation side (``qdot``), per call: the outlier feature dims are ``O = {k : max_rows |x[:, k]| > threshold}``.
With ``x_o`` = x restricted to columns in O (others zeroed) and ``x_r = x - x_o``::

    s_x[m] = max_k |x_r[m, k]| / 127     x_q = round(x_r / s_x)
    y = (x_q @ W_q)_int32 * s_x[:, None] * s_w[None, :]   +   x_o @ W_float

where ``W_float`` is the dequantized weight (with the float16 outlier rows where stored). ``threshold=None``
gives the paper's "vector-wise" int8 baseline without the split; ``granularity="tensor"`` with
``threshold=None`` gives the naive absmax per-tensor W8A8 baseline (one scale for W, one for x).
Under ``jit`` the outlier set is a mask; the XLA path gathers at most ``max(16, K / 32)`` outlier dims into a
small float product (a dense masked matmul only when there are more), instead of dequantizing the whole weight
to float32 for a dense ``(M, K) x (K, N)`` product.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.core.layout import check_layout, codes_kn, dot_codes
from jaxquant.core.numerics import true_divide
from jaxquant.core.qarray import QArray, Scheme

__all__ = ["LLMInt8Scheme"]


def _absmax_int8(x: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    s = jnp.where(amax != 0, true_divide(amax, jnp.float32(127.0)), 1.0)
    return jnp.clip(jnp.round(true_divide(x, s)), -127, 127).astype(jnp.int8), s


@dataclasses.dataclass(frozen=True)
class LLMInt8Scheme(Scheme):
    """LLM.int8() weights (int8 per output channel) and the outlier-split matmul.

    Args:
      threshold: activation magnitude above which a feature dim is an outlier (paper: 6.0); ``None`` disables
        the split (plain int8 x int8).
      outlier_rows: input rows whose float16 weights are stored beside the int8 weights.
      granularity: ``"channel"`` (vector-wise: per output column of W, per row of x) or ``"tensor"``.
      layout: how ``data`` stores the int8 codes: ``"kn"`` (``(K, N)``, default) or ``"nk"`` (``(N, K)``, K-major:
        the layout the GPU kernels' 8-bit tensor-core dots read without a transpose; see
        :mod:`jaxquant.core.layout`). Both dequantize bit for bit alike and give the same int8 products; the float
        outlier product agrees to float32 rounding (XLA may order its sums differently).
    """

    threshold: float | None = 6.0
    outlier_rows: tuple[int, ...] = ()
    granularity: str = "channel"
    layout: str = "kn"

    kind = "llm_int8"

    def __post_init__(self):
        if self.threshold is not None and not (isinstance(self.threshold, int | float) and self.threshold > 0):
            raise ValueError(f"LLMInt8Scheme: threshold must be a positive number or None, got {self.threshold!r}")
        rows = tuple(self.outlier_rows)
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in rows) or len(set(rows)) != len(rows):
            raise ValueError(
                f"LLMInt8Scheme: outlier_rows must be distinct non-negative ints, got {self.outlier_rows!r}"
            )
        object.__setattr__(self, "outlier_rows", tuple(sorted(rows)))
        if self.granularity not in ("channel", "tensor"):
            raise ValueError(f"LLMInt8Scheme: granularity must be 'channel' or 'tensor', got {self.granularity!r}")
        check_layout("LLMInt8Scheme", self.layout)

    def describe(self) -> str:
        split = "no split" if self.threshold is None else f"outliers>{self.threshold:g}"
        kmajor = " K-major" if self.layout == "nk" else ""
        return f"llm.int8 per-{self.granularity} {split}{kmajor}"

    def _check_shape(self, shape):
        super()._check_shape(shape)
        if self.outlier_rows and self.outlier_rows[-1] >= shape[0]:
            raise ValueError(f"LLMInt8Scheme: outlier_rows {self.outlier_rows} out of range for {shape[0]} input rows")

    def _quantize(self, w: jax.Array) -> QArray:
        shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
        wf = w.astype(jnp.float32)
        data, s = _absmax_int8(wf, axis=0 if self.granularity == "channel" else None)
        scale = s[0] if self.granularity == "channel" else s.reshape(())
        aux = {}
        if self.outlier_rows:
            aux["outlier_weight"] = wf[jnp.asarray(self.outlier_rows)].astype(jnp.float16)
        data = codes_kn(data, self.layout)  # (N, K) for "nk": the transpose of (K, N) is its own inverse
        return QArray(data=data, scale=scale.astype(jnp.float32), aux=aux, scheme=self, shape=shape, dtype=dtype)

    def _dequantize(self, q: QArray) -> jax.Array:
        w = codes_kn(q.data, self.layout).astype(jnp.float32) * q.scale
        if self.outlier_rows:
            w = w.at[jnp.asarray(self.outlier_rows)].set(q.aux["outlier_weight"].astype(jnp.float32))
        return w.astype(q.dtype)

    def _dequantize_rows(self, q: QArray, idx: jax.Array) -> jax.Array:
        """Rows ``idx`` of :meth:`_dequantize` (float16 outlier rows where stored), without the full weight."""
        rows = q.data[:, idx].T if self.layout == "nk" else q.data[idx]
        w = rows.astype(jnp.float32) * q.scale
        if self.outlier_rows:
            pos = [-1] * q.shape[0]
            for i, r in enumerate(self.outlier_rows):
                pos[r] = i
            p = jnp.asarray(pos, jnp.int32)[idx]
            stored = q.aux["outlier_weight"].astype(jnp.float32)[jnp.maximum(p, 0)]
            w = jnp.where((p >= 0)[:, None], stored, w)
        return w.astype(q.dtype)

    def _outlier_product(self, x2: jax.Array, is_out: jax.Array, q: QArray) -> jax.Array:
        """``x_o @ W_float`` over the outlier dims (float32): with at most ``cap = max(16, K / 32)`` of them (the
        usual case: LLM.int8's outliers sit in a few feature dims), the gathered ``(M, cap) x (cap, N)`` product
        of those dims' columns and weight rows; otherwise the dense masked ``(M, K) x (K, N)`` product. Both sum the
        same nonzero terms (the order differs)."""
        k = x2.shape[1]
        cap = min(k, max(16, k // 32))
        count = jnp.sum(is_out, dtype=jnp.int32)

        def compact(_):
            idx = jnp.nonzero(is_out, size=cap, fill_value=0)[0]
            xc = jnp.where((jnp.arange(cap) < count)[None, :], x2[:, idx], 0.0)
            wc = self._dequantize_rows(q, idx).astype(jnp.float32)
            return jnp.dot(xc, wc, preferred_element_type=jnp.float32)

        def dense(_):
            x_o = jnp.where(is_out[None, :], x2, 0.0)
            return jnp.dot(x_o, self._dequantize(q).astype(jnp.float32), preferred_element_type=jnp.float32)

        return jax.lax.cond(count <= cap, compact, dense, None)

    def _qdot(self, x: jax.Array, q: QArray) -> jax.Array:
        """The LLM.int8() matmul (XLA path): int8 x int8 -> int32 plus the float outlier product."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).astype(jnp.float32)
        if self.threshold is None:
            x_r = x2
            y_o = 0.0
        else:
            is_out = jnp.max(jnp.abs(x2), axis=0) > self.threshold
            x_r = x2 - jnp.where(is_out[None, :], x2, 0.0)
            y_o = self._outlier_product(x2, is_out, q)
        xq, sx = _absmax_int8(x_r, axis=1 if self.granularity == "channel" else None)
        acc = dot_codes(xq, q.data, self.layout, jnp.int32)
        y = acc.astype(jnp.float32) * sx * q.scale + y_o
        return y.reshape(*lead, -1).astype(x.dtype)
