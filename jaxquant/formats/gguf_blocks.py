"""llama.cpp's GGUF block formats as jaxquant schemes: ``GGUFScheme("Q4_K")`` etc.

A GGUF tensor is a sequence of rows (a numpy ``(out_features, in_features)`` matrix for a linear layer); each
row is cut into blocks of ``block_size`` consecutive weights, and each block is stored as ``type_size`` bytes.
A :class:`GGUFScheme` QArray stores exactly those bytes: ``data`` is a ``uint8`` array ``(rows, row_bytes)``,
so writing a GGUF file is a copy and reading one needs no dequantization. For a Flax kernel ``W`` of shape
``(K, N) = (in_features, out_features)`` the GGUF rows are the columns of ``W`` (``transpose=True``, the
default): blocks run along ``in_features``, as llama.cpp's do. Embedding tables ``(vocab, dim)`` are stored
row by row (``transpose=False``).

Formats (``d``, ``m``, ``dmin`` are fp16; ``x`` is a block, ``q`` its codes, ``w`` the dequantized value)::

    type   block bytes  encoding                                                      dequantized
    Q8_0     32   34    d = max|x|/127, q = round_half_away(x/d) (int8)               w = d*q
    Q4_0     32   18    d = x_amax/-8 (x_amax: the signed value of largest magnitude),
                        q = min(15, trunc(x/d + 8.5))                                 w = d*(q - 8)
    Q4_1     32   20    d = (max - min)/15, m = min, q = min(15, trunc((x - m)/d + 0.5))  w = d*q + m
    Q5_0     32   22    d = x_amax/-16, q = min(31, trunc(x/d + 16.5)); 5th bits in a 32-bit mask
                                                                                      w = d*(q - 16)
    Q5_1     32   24    d = (max - min)/31, m = min, 5-bit codes                      w = d*q + m
    Q2_K    256   84    16 sub-blocks of 16: 4-bit scale sc and min mn, 2-bit codes   w = d*sc*q - dmin*mn
    Q3_K    256  110    16 sub-blocks of 16: 6-bit signed scales, 3-bit codes (2 low bits + a high-bit mask)
                                                                                      w = d*(sc - 32)*(q - 4)
    Q4_K    256  144    8 sub-blocks of 32: 6-bit scale and min, 4-bit codes          w = d*sc*q - dmin*mn
    Q5_K    256  176    8 sub-blocks of 32: 6-bit scale and min, 5-bit codes          w = d*sc*q - dmin*mn
    Q6_K    256  210    16 sub-blocks of 16: int8 scales, 6-bit codes                 w = d*sc*(q - 32)
    TQ1_0   256   54    ternary q = round_half_away(x/max|x|) in {-1, 0, 1}, 5 trits a byte   w = d*q
    TQ2_0   256   66    ternary, four 2-bit codes a byte                              w = d*q

Divisions above are written as llama.cpp (and gguf-py) compute them: a reciprocal ``id = 1/d`` (``0`` when
``d == 0``) and a product ``x*id``; the few true divisions use :func:`jaxquant.core.numerics.true_divide` so
that XLA's reciprocal rewrite cannot change a rounding. With that, the type-0/1 and ternary quantizers are
``jnp`` functions (jit/vmap compatible) whose bytes equal ``gguf.quants.quantize`` exactly.

The K-quant quantizers run llama.cpp's reference search (see :mod:`jaxquant.formats._kquants`): a sequential,
data-dependent search over candidate grids that is written in NumPy and called from inside ``jit`` through
``jax.pure_callback`` (host code; ``vmap`` runs it once per batch element). Every dequantizer is ``jnp``
and equals ``gguf.quants.dequantize`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.numerics import rounded_product, true_divide
from jaxquant.core.qarray import QArray, Scheme
from jaxquant.formats._kquants import KQUANT_ENCODERS

__all__ = [
    "GGUF_TYPES",
    "KQUANT_TYPES",
    "GGUFScheme",
    "GGUFTypeInfo",
    "decode_rows",
    "encode_rows",
    "row_bytes",
]

QK_K = 256


@dataclasses.dataclass(frozen=True)
class GGUFTypeInfo:
    """Static facts of one GGUF block type."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


GGUF_TYPES: dict[str, GGUFTypeInfo] = {
    t.name: t
    for t in (
        GGUFTypeInfo("Q4_0", 2, 32, 18),
        GGUFTypeInfo("Q4_1", 3, 32, 20),
        GGUFTypeInfo("Q5_0", 6, 32, 22),
        GGUFTypeInfo("Q5_1", 7, 32, 24),
        GGUFTypeInfo("Q8_0", 8, 32, 34),
        GGUFTypeInfo("Q2_K", 10, QK_K, 84),
        GGUFTypeInfo("Q3_K", 11, QK_K, 110),
        GGUFTypeInfo("Q4_K", 12, QK_K, 144),
        GGUFTypeInfo("Q5_K", 13, QK_K, 176),
        GGUFTypeInfo("Q6_K", 14, QK_K, 210),
        GGUFTypeInfo("TQ1_0", 34, QK_K, 54),
        GGUFTypeInfo("TQ2_0", 35, QK_K, 66),
    )
}
KQUANT_TYPES = frozenset(KQUANT_ENCODERS)
_BY_GGML = {t.ggml_type: t for t in GGUF_TYPES.values()}

F32 = jnp.float32
U8 = jnp.uint8


def type_info(qtype: str | int) -> GGUFTypeInfo:
    """:class:`GGUFTypeInfo` by name (``"Q4_K"``, case-insensitive) or ggml type number."""
    if isinstance(qtype, int | np.integer) and not isinstance(qtype, bool):
        if int(qtype) in _BY_GGML:
            return _BY_GGML[int(qtype)]
    elif isinstance(qtype, str) and qtype.upper() in GGUF_TYPES:
        return GGUF_TYPES[qtype.upper()]
    raise ValueError(f"unsupported GGUF block type {qtype!r}; supported: {', '.join(GGUF_TYPES)}")


def row_bytes(n: int, qtype: str) -> int:
    """Bytes of one GGUF row of ``n`` weights (``n`` must be a multiple of the block size)."""
    t = type_info(qtype)
    if n % t.block_size:
        raise ValueError(f"{t.name} rows need a multiple of {t.block_size} weights, got {n}")
    return n // t.block_size * t.type_size


# ------------------------------------------------------------------------------------------------------------
# small jnp helpers
# ------------------------------------------------------------------------------------------------------------


def _f16_bytes(x: jax.Array) -> jax.Array:
    """float32 (...,) -> fp16 (round to nearest even) as (..., 2) little-endian bytes."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16)
    return jnp.stack([(u & 0xFF).astype(U8), (u >> 8).astype(U8)], axis=-1)


def _f16_value(b: jax.Array) -> jax.Array:
    """(..., 2) little-endian fp16 bytes -> float32 (...,)."""
    u = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(u, jnp.float16).astype(F32)


def _recip(d: jax.Array) -> jax.Array:
    """``1/d``, and ``0`` where ``d == 0`` (llama.cpp's ``id = d ? 1.0f/d : 0.0f``)."""
    nz = d != 0
    return jnp.where(nz, true_divide(np.float32(1.0), jnp.where(nz, d, np.float32(1.0))), np.float32(0.0))


def _round_away(v: jax.Array) -> jax.Array:
    """Round half away from zero (C ``roundf``), written as gguf-py's ``np_roundf``."""
    a = jnp.abs(v)
    fl = jnp.floor(a)
    return jnp.sign(v) * (fl + jnp.floor(np.float32(2.0) * (a - fl)))


def _argmax_signed(x: jax.Array) -> jax.Array:
    """The signed value of the first largest-magnitude element along the last axis (keepdims)."""
    idx = jnp.argmax(jnp.abs(x), axis=-1, keepdims=True)
    return jnp.take_along_axis(x, idx, axis=-1)


def _nibbles(lo: jax.Array, hi: jax.Array) -> jax.Array:
    return (lo & 0xF) | (hi << 4)


def _bits_to_bytes(bits: jax.Array) -> jax.Array:
    """(..., 8k) of 0/1 -> (..., k) bytes, bit j of byte i = element 8i + j (little bit order)."""
    b = bits.reshape(*bits.shape[:-1], -1, 8).astype(U8)
    out = b[..., 0]
    for j in range(1, 8):
        out = out | (b[..., j] << j)
    return out


# ------------------------------------------------------------------------------------------------------------
# jnp encoders of the types without a search: (..., nb, block) float32 -> (..., nb, type_size) uint8
# ------------------------------------------------------------------------------------------------------------


def _enc_q8_0(x):
    d = true_divide(jnp.max(jnp.abs(x), axis=-1, keepdims=True), np.float32(127.0))
    q = _round_away(x * _recip(d)).astype(jnp.int8)
    return jnp.concatenate([_f16_bytes(d[..., 0]), jax.lax.bitcast_convert_type(q, U8)], axis=-1)


def _enc_q4_0(x):
    d = true_divide(_argmax_signed(x), np.float32(-8.0))
    q = jnp.minimum(jnp.trunc(rounded_product(x, _recip(d)) + np.float32(8.5)).astype(U8), 15)
    return jnp.concatenate([_f16_bytes(d[..., 0]), _nibbles(q[..., :16], q[..., 16:])], axis=-1)


def _enc_q4_1(x):
    mx = jnp.max(x, axis=-1, keepdims=True)
    mn = jnp.min(x, axis=-1, keepdims=True)
    d = true_divide(mx - mn, np.float32(15.0))
    q = jnp.minimum(jnp.trunc(rounded_product(x - mn, _recip(d)) + np.float32(0.5)).astype(U8), 15)
    return jnp.concatenate([_f16_bytes(d[..., 0]), _f16_bytes(mn[..., 0]), _nibbles(q[..., :16], q[..., 16:])], -1)


def _q5_tail(q):
    return jnp.concatenate([_bits_to_bytes(q >> 4), _nibbles(q[..., :16], q[..., 16:])], axis=-1)


def _enc_q5_0(x):
    d = true_divide(_argmax_signed(x), np.float32(-16.0))
    q = jnp.minimum(jnp.trunc(rounded_product(x, _recip(d)) + np.float32(16.5)).astype(U8), 31)
    return jnp.concatenate([_f16_bytes(d[..., 0]), _q5_tail(q)], axis=-1)


def _enc_q5_1(x):
    mx = jnp.max(x, axis=-1, keepdims=True)
    mn = jnp.min(x, axis=-1, keepdims=True)
    d = true_divide(mx - mn, np.float32(31.0))
    q = jnp.minimum(jnp.trunc(rounded_product(x - mn, _recip(d)) + np.float32(0.5)).astype(U8), 31)
    return jnp.concatenate([_f16_bytes(d[..., 0]), _f16_bytes(mn[..., 0]), _q5_tail(q)], axis=-1)


def _ternary(x):
    d = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    q = (_round_away(x * _recip(d)) + 1).astype(jnp.int32)  # 0, 1, 2
    return d, q


def _enc_tq1_0(x):
    d, q = _ternary(x)
    lead = x.shape[:-1]
    p5 = jnp.array([81, 27, 9, 3, 1], jnp.int32)
    qs0 = jnp.sum(q[..., :160].reshape(*lead, 5, 32) * p5[:, None], axis=-2)
    qs1 = jnp.sum(q[..., 160:240].reshape(*lead, 5, 16) * p5[:, None], axis=-2)
    qh = jnp.sum(q[..., 240:].reshape(*lead, 4, 4) * p5[:4, None], axis=-2)
    v = jnp.concatenate([qs0, qs1, qh], axis=-1)
    v = ((v * 256 + 242) // 243).astype(U8)  # ceil(v * 256 / 243): the trits as a fixed-point fraction
    return jnp.concatenate([v, _f16_bytes(d[..., 0])], axis=-1)


def _enc_tq2_0(x):
    d, q = _ternary(x)
    q = q.astype(U8).reshape(*x.shape[:-1], 2, 4, 32)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return jnp.concatenate([qs.reshape(*x.shape[:-1], 64), _f16_bytes(d[..., 0])], axis=-1)


_JNP_ENCODERS = {
    "Q8_0": _enc_q8_0,
    "Q4_0": _enc_q4_0,
    "Q4_1": _enc_q4_1,
    "Q5_0": _enc_q5_0,
    "Q5_1": _enc_q5_1,
    "TQ1_0": _enc_tq1_0,
    "TQ2_0": _enc_tq2_0,
}

# ------------------------------------------------------------------------------------------------------------
# jnp decoders: (..., nb, type_size) uint8 -> (..., nb, block) float32, in gguf-py's order of operations
# ------------------------------------------------------------------------------------------------------------


def _split_nibbles(qs):
    """(..., k) bytes -> (..., 2k): low nibbles of all bytes, then high nibbles."""
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _bytes_to_bits(b):
    """(..., k) bytes -> (..., 8k) bits, element 8i + j = bit j of byte i."""
    sh = jnp.arange(8, dtype=U8)
    return ((b[..., :, None] >> sh) & 1).reshape(*b.shape[:-1], -1)


def _dec_q8_0(b):
    d = _f16_value(b[..., 0:2])[..., None]
    q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(F32)
    return q * d


def _dec_q4_0(b):
    d = _f16_value(b[..., 0:2])[..., None]
    q = (_split_nibbles(b[..., 2:]).astype(jnp.int8) - 8).astype(F32)
    return d * q


def _dec_q4_1(b):
    d = _f16_value(b[..., 0:2])[..., None]
    m = _f16_value(b[..., 2:4])[..., None]
    q = _split_nibbles(b[..., 4:]).astype(F32)
    return _mul_add(d, q, m)


def _q5_codes(qh, qs):
    return _split_nibbles(qs) | (_bytes_to_bits(qh) << 4)


def _dec_q5_0(b):
    d = _f16_value(b[..., 0:2])[..., None]
    q = (_q5_codes(b[..., 2:6], b[..., 6:]).astype(jnp.int8) - 16).astype(F32)
    return d * q


def _dec_q5_1(b):
    d = _f16_value(b[..., 0:2])[..., None]
    m = _f16_value(b[..., 2:4])[..., None]
    q = _q5_codes(b[..., 4:8], b[..., 8:]).astype(F32)
    return _mul_add(d, q, m)


def _mul_add(a, b, c, sign: float = 1.0):
    """``a*b + c`` (or ``- c``) with the product rounded before the addition (no fused multiply-add, see
    :func:`_product`), as the float32 NumPy reference computes it."""
    p = rounded_product(a, b)
    return p + c if sign > 0 else p - c


def _crumbs(qs, groups: int):
    """2-bit codes: (..., 32*groups) bytes -> (..., 128*groups): element 128g + 32s + l at bits 2s of 32g + l."""
    lead = qs.shape[:-1]
    sh = jnp.array([0, 2, 4, 6], U8)
    q = (qs.reshape(*lead, groups, 1, 32) >> sh[:, None]) & 3
    return q.reshape(*lead, groups * 128)


def _dec_q2_k(b):
    lead = b.shape[:-1]
    sc = b[..., 0:16]
    d = _f16_value(b[..., 80:82])[..., None]
    dmin = _f16_value(b[..., 82:84])[..., None]
    dl = (d * (sc & 0xF).astype(F32))[..., None]
    ml = (dmin * (sc >> 4).astype(F32))[..., None]
    q = _crumbs(b[..., 16:80], 2).reshape(*lead, 16, 16).astype(F32)
    return _mul_add(dl, q, ml, -1.0).reshape(*lead, QK_K)


def _dec_q3_k(b):
    lead = b.shape[:-1]
    hmask, qs, sc = b[..., 0:32], b[..., 32:96], b[..., 96:108]
    d = _f16_value(b[..., 108:110])[..., None]
    low = jnp.concatenate([sc[..., 0:8] & 0xF, sc[..., 0:8] >> 4], axis=-1)  # scale j: nibble of byte j % 8
    hs = (sc[..., 8:12][..., None, :] >> jnp.array([0, 2, 4, 6], U8)[:, None]) & 3  # (.., 4, 4): j = 4s + i
    scales = (low | (hs.reshape(*lead, 16) << 4)).astype(jnp.int8) - 32
    dl = (d * scales.astype(F32))[..., None]
    ql = _crumbs(qs, 2).reshape(*lead, 16, 16)
    qh = (hmask[..., None, :] >> jnp.arange(8, dtype=U8)[:, None]) & 1  # element 32k + m: bit k of byte m
    qh = qh.reshape(*lead, 16, 16) ^ 1
    q = (ql.astype(jnp.int8) - (qh << 2).astype(jnp.int8)).astype(F32)
    return (dl * q).reshape(*lead, QK_K)


def _scale_min_k4(s):
    sc = jnp.concatenate([s[..., 0:4] & 0x3F, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([s[..., 4:8] & 0x3F, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 2) & 0x30)], axis=-1)
    return sc, mn


def _dec_q4_k(b):
    lead = b.shape[:-1]
    d = _f16_value(b[..., 0:2])[..., None]
    dmin = _f16_value(b[..., 2:4])[..., None]
    sc, mn = _scale_min_k4(b[..., 4:16])
    dd = (d * sc.astype(F32))[..., None]
    dm = (dmin * mn.astype(F32))[..., None]
    qs = b[..., 16:144].reshape(*lead, 4, 1, 32) >> jnp.array([0, 4], U8)[:, None]
    q = (qs & 0xF).reshape(*lead, 8, 32).astype(F32)
    return _mul_add(dd, q, dm, -1.0).reshape(*lead, QK_K)


def _dec_q5_k(b):
    lead = b.shape[:-1]
    d = _f16_value(b[..., 0:2])[..., None]
    dmin = _f16_value(b[..., 2:4])[..., None]
    sc, mn = _scale_min_k4(b[..., 4:16])
    dd = (d * sc.astype(F32))[..., None]
    dm = (dmin * mn.astype(F32))[..., None]
    qh = b[..., 16:48]
    ql = (b[..., 48:176].reshape(*lead, 4, 1, 32) >> jnp.array([0, 4], U8)[:, None]) & 0xF
    hb = (qh[..., None, :] >> jnp.arange(8, dtype=U8)[:, None]) & 1
    q = (ql.reshape(*lead, 8, 32) | (hb.reshape(*lead, 8, 32) << 4)).astype(F32)
    return _mul_add(dd, q, dm, -1.0).reshape(*lead, QK_K)


def _dec_q6_k(b):
    lead = b.shape[:-1]
    ql, qh = b[..., 0:128], b[..., 128:192]
    scales = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(F32)
    d = _f16_value(b[..., 208:210])[..., None]
    dd = (d * scales)[..., None]
    lo = (ql.reshape(*lead, 2, 1, 64) >> jnp.array([0, 4], U8)[:, None]) & 0xF
    hi = (qh.reshape(*lead, 2, 1, 32) >> jnp.array([0, 2, 4, 6], U8)[:, None]) & 3
    q = (lo.reshape(*lead, 8, 32) | (hi.reshape(*lead, 8, 32) << 4)).astype(jnp.int8) - 32
    q = q.reshape(*lead, 16, 16).astype(F32)
    return (dd * q).reshape(*lead, QK_K)


def _dec_tq1_0(b):
    lead = b.shape[:-1]
    qs, qh = b[..., 0:48], b[..., 48:52]
    d = _f16_value(b[..., 52:54])[..., None]
    p5 = jnp.array([1, 3, 9, 27, 81], U8)
    t0 = (qs[..., None, 0:32] * p5[:, None]).reshape(*lead, 160)  # uint8 products wrap mod 256 on purpose
    t1 = (qs[..., None, 32:48] * p5[:, None]).reshape(*lead, 80)
    t2 = (qh[..., None, :] * p5[:4, None]).reshape(*lead, 16)
    t = jnp.concatenate([t0, t1, t2], axis=-1).astype(jnp.uint16)
    q = ((t * 3) >> 8).astype(jnp.int8) - 1
    return d * q.astype(F32)


def _dec_tq2_0(b):
    lead = b.shape[:-1]
    d = _f16_value(b[..., 64:66])[..., None]
    q = _crumbs(b[..., 0:64], 2).reshape(*lead, QK_K).astype(jnp.int8) - 1
    return d * q.astype(F32)


_DECODERS = {
    "Q8_0": _dec_q8_0,
    "Q4_0": _dec_q4_0,
    "Q4_1": _dec_q4_1,
    "Q5_0": _dec_q5_0,
    "Q5_1": _dec_q5_1,
    "Q2_K": _dec_q2_k,
    "Q3_K": _dec_q3_k,
    "Q4_K": _dec_q4_k,
    "Q5_K": _dec_q5_k,
    "Q6_K": _dec_q6_k,
    "TQ1_0": _dec_tq1_0,
    "TQ2_0": _dec_tq2_0,
}

# ------------------------------------------------------------------------------------------------------------
# row-level API
# ------------------------------------------------------------------------------------------------------------


def _encode_rows_np(rows: np.ndarray, qtype: str) -> np.ndarray:
    t = GGUF_TYPES[qtype]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    r, n = rows.shape
    blocks = rows.reshape(r * (n // t.block_size), t.block_size)
    out = KQUANT_ENCODERS[qtype](blocks) if qtype in KQUANT_ENCODERS else np.asarray(_JNP_ENCODERS[qtype](blocks))
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(r, n // t.block_size * t.type_size)


def encode_rows(rows: jax.Array, qtype: str) -> jax.Array:
    """Quantize float rows ``(R, n)`` (``n`` a multiple of the block size) to GGUF bytes ``(R, row_bytes)``.

    Traceable: the block types without a search are ``jnp``; the K-quants go through ``jax.pure_callback``.
    """
    t = type_info(qtype)
    r, n = rows.shape
    if n % t.block_size:
        raise ValueError(f"{t.name} needs rows whose length is a multiple of {t.block_size}, got {n}")
    nb = n // t.block_size
    rows = jnp.asarray(rows, F32)
    if t.name in _JNP_ENCODERS:
        out = _JNP_ENCODERS[t.name](rows.reshape(r, nb, t.block_size))
        return out.reshape(r, nb * t.type_size)
    spec = jax.ShapeDtypeStruct((r, nb * t.type_size), jnp.uint8)
    return jax.pure_callback(lambda x: _encode_rows_np(np.asarray(x), t.name), spec, rows, vmap_method="sequential")


def decode_rows(data: jax.Array, qtype: str) -> jax.Array:
    """GGUF bytes ``(R, row_bytes)`` -> float32 rows ``(R, n)``; equal to ``gguf.quants.dequantize``."""
    t = type_info(qtype)
    r, nbytes = data.shape
    if nbytes % t.type_size:
        raise ValueError(f"{t.name} rows need a multiple of {t.type_size} bytes, got {nbytes}")
    nb = nbytes // t.type_size
    out = _DECODERS[t.name](jnp.asarray(data, U8).reshape(r, nb, t.type_size))
    return out.reshape(r, nb * t.block_size)


# ------------------------------------------------------------------------------------------------------------
# the scheme
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GGUFScheme(Scheme):
    """A llama.cpp GGUF block type as a jaxquant scheme.

    Args:
      qtype: ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``, ``"Q5_0"``, ``"Q5_1"``, ``"Q2_K"``, ``"Q3_K"``, ``"Q4_K"``,
        ``"Q5_K"``, ``"Q6_K"``, ``"TQ1_0"``, ``"TQ2_0"`` (case-insensitive).
      transpose: ``True`` (kernels ``(in, out)``): GGUF rows are the columns, blocks run along ``in_features``;
        ``False`` (embedding tables ``(vocab, dim)``): GGUF rows are the array's rows.

    The QArray's ``data`` is the GGUF tensor's bytes, ``uint8 (rows, row_bytes)``; ``scale``/``zero`` are
    ``None`` (they live inside the blocks). ``bits_per_weight`` is the format's: 8.5 for Q8_0, 4.5 for Q4_0 and
    Q4_K, 6.5625 for Q6_K, 2.0625 for TQ2_0...
    """

    qtype: str = "Q4_K"
    transpose: bool = True

    kind = "gguf"

    def __post_init__(self):
        if not isinstance(self.qtype, str) or self.qtype.upper() not in GGUF_TYPES:
            raise ValueError(f"GGUFScheme: qtype must be one of {', '.join(GGUF_TYPES)}, got {self.qtype!r}")
        object.__setattr__(self, "qtype", self.qtype.upper())
        if not isinstance(self.transpose, bool):
            raise ValueError(f"GGUFScheme: transpose must be a bool, got {self.transpose!r}")

    @property
    def info(self) -> GGUFTypeInfo:
        return GGUF_TYPES[self.qtype]

    def describe(self) -> str:
        return f"gguf {self.qtype}" + ("" if self.transpose else " (rows)")

    def _row_len(self, shape: tuple[int, ...]) -> int:
        return shape[0] if self.transpose else shape[1]

    def _check_shape(self, shape):
        super()._check_shape(shape)
        n = self._row_len(shape)
        bs = self.info.block_size
        if n % bs:
            axis = "in_features (axis 0)" if self.transpose else "the row length (axis 1)"
            raise ValueError(
                f"GGUFScheme({self.qtype!r}): {axis} = {n} is not a multiple of the {bs}-element block of "
                f"{self.qtype}; llama.cpp falls back to another type for such tensors (see "
                "jaxquant.formats.gguf_recipes.fallback_type)"
            )

    def storage_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of logical ``shape`` in this format (what ``QArray.nbytes`` equals)."""
        n = self._row_len(shape)
        return math.prod(shape) // n * row_bytes(n, self.qtype)

    def _quantize(self, w: jax.Array) -> QArray:
        shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
        rows = w.astype(F32)
        if self.transpose:
            rows = rows.T
        return QArray(data=encode_rows(rows, self.qtype), scale=None, scheme=self, shape=shape, dtype=dtype)

    def _dequantize(self, q: QArray) -> jax.Array:
        rows = decode_rows(q.data, self.qtype)
        out = (rows.T if self.transpose else rows).reshape(q.shape).astype(q.dtype)
        # materialize the weights: keeps XLA from fusing the decoding into a consumer matmul (which would make
        # it use another summation order than for the same float weights, so logits would differ by ulps)
        return jax.lax.optimization_barrier(out)

    def from_bytes(self, data, shape: tuple[int, ...], dtype: str = "float32") -> QArray:
        """A QArray around existing GGUF bytes ``(rows, row_bytes)`` of a tensor of logical ``shape``."""
        shape = tuple(int(s) for s in shape)
        self._check_shape(shape)
        n = self._row_len(shape)
        want = (math.prod(shape) // n, row_bytes(n, self.qtype))
        if tuple(data.shape) != want:
            raise ValueError(f"GGUFScheme({self.qtype!r}): bytes of shape {tuple(data.shape)}, expected {want}")
        return QArray(data=jnp.asarray(data, U8), scale=None, scheme=self, shape=shape, dtype=dtype)
