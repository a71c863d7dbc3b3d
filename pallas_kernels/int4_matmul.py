"""Weight-only integer matmul (W2A16 .. W8A16): ``y = x @ dequant(W)`` with the dequantization fused.

Weights come in jaxquant's ``IntScheme`` storage, read as is (no conversion): for a ``(K, N)`` kernel,

* ``bits=4``: ``uint8 (ceil(K/2), N)``, row ``2r`` in the low nibble of packed row ``r``, row ``2r+1`` high;
* ``bits=2``: ``uint8 (ceil(K/4), N)``, row ``4r+j`` in bits ``2j..2j+1`` of packed row ``r``;
* ``bits=3, 5, 6, 7``: ``uint32 (bits*ceil(K/32), N)``, a dense bit stream: the 32 rows ``32u + j`` of chunk ``u``
  occupy stream bits ``[bits*j, bits*(j+1))`` of the ``bits`` little-endian words in packed rows
  ``bits*u .. bits*u + bits-1`` (some codes straddle two words: 3 bits codes 10 and 21; 5 and 6 bits four codes,
  7 bits six); the GEMV (``M <= 8``), the chunk dot (below) and the dequantization kernel;
* ``bits=8``: ``int8 (K, N)`` (symmetric, signed codes) or ``uint8 (K, N)``;
* K-major (``IntScheme(layout="nk")``, :attr:`IntLayout.nk`; 2, 4 and 8 bits): the packed array above transposed,
  ``(N, packed rows)``; the ``strided`` / ``split`` dots, the ``gemv`` and the dequantization kernel read it;
* ``scale`` ``(G, N)`` (float16/bfloat16/float32), one row per group of ``group_size`` consecutive K rows (the
  last group may be shorter); per-channel ``(1, N)`` with ``group_size >= K``;
* ``zero`` ``(G, N)``: uint8 zero points (``mode="zeropoint"``) or float minima (``mode="minmax"``).

With codes ``c`` and the group's ``s`` (and ``z``), the dequantized weight is (exactly as the XLA reference)::

    sym:       W = (c - 2**(bits-1)) * s        (8-bit int8 storage: W = c * s)
    zeropoint: W = (c - z) * s
    minmax:    W = round(c * s) + z        (the product rounded on its own: no fused multiply-add, on any backend)

computed in float32, rounded to the activation dtype, then ``y = sum_k x[m, k] W[k, n]`` with a float32
accumulator (so the kernel and the reference differ only in summation order).

Kernel: grid ``(cdiv(M, BM), cdiv(N, BN), split_k)``; each program loops over its share of K in steps of
``BK`` rows (``BK`` divides the group size, so one scale row per step): load the packed ``(BK*bits/8, BN)``
tile, split it into ``8/bits`` code tiles, dequantize, and either

* ``variant="strided"``: multiply code tile ``j`` with the activation columns ``k0 + j + (8/bits) * r``
  (a strided load of ``x``; no register shuffles; best when ``M`` is small), or
* ``variant="interleave"``: interleave the tiles back into one ``(BK, BN)`` tile (transposes + two-way stacks)
  and multiply it with a contiguous ``(BM, BK)`` activation tile (better for large ``M``).

Either may carry ``+postscale`` (``"strided+postscale"``, ``"interleave+postscale"``; sym and zero-point modes):
the code tiles hold the exact integers ``c - zero`` in the activation dtype and the step's group scale multiplies
the ``(BM, BN)`` float32 dot result, ``acc += (x @ (c - z)) * s``, instead of every weight (no per-weight float
multiply and rounding). Not bit-identical to the XLA path, which rounds ``(c - z) * s`` per weight; it is the
exact group-scaled product up to float32 accumulation, i.e. closer to float64 ``x @ dequantize(w)``. The 2/4-bit
integer tiles are built without int-to-float conversions (``_common.exact_int``: the code is OR-ed into the
mantissa of 128.0 (bf16) / 1024.0 (f16) / 2**23 (f32) and ``128 + z`` subtracted, exact), which ptxas turns into
one ``PRMT``/``LOP3`` pair and one packed ``HADD2`` per two weights instead of one ``I2F`` per weight (a quarter-
rate conversion on sm_90): 363 instead of 642 instructions per K-loop trip for the sm_90 W4A16 tile of the
benchmarks (``python benchmarks/kernel_sass.py``).

* ``variant="gemv"`` (small ``M``, memory bound): no tensor-core dot. Each program owns ``BM`` (1..8) rows and a wide
  ``BN`` column tile and keeps one float32 ``(BK/chunk, BN)`` accumulator per row in registers (``chunk``: K rows per
  packed unit, 8/bits bytes or 32 for dense widths): every K step unpacks the packed tile with shifts/masks into
  ``chunk`` code tiles, dequantizes them (one scale row per step), multiplies each elementwise by the matching
  activations broadcast along N, and adds; the accumulator is reduced over K once, at the end. The activations are
  reordered once by XLA (a ``(K, M)`` copy, tiny at small ``M``) so that each code position's activations are a
  contiguous column; ``"split-gemv"`` instead loads each row's activations of a step as one contiguous ``(BK/chunk,
  chunk)`` tile of the zero-padded ``x`` and splits it into the positions' columns in registers (one pipelined load
  instead of one small load per position; the same products in the same order). ``"gemv+postscale"`` /
  ``"split-gemv+postscale"`` (sym, zero point): exact integer weights, each step's partial sums scaled once by the
  group scale (not bit-identical to the XLA path, as for the dots). Dense (3/5/6/7-bit) weights are read through a
  free row-major reshape of the storage to ``(ceil(K/32), bits*N)``: the ``bits`` words of a chunk are contiguous
  column tiles of one row (masked loads; no strided or out-of-bounds reads), and each straddling code takes one extra
  shift and OR. 3 bits is GPTQ's narrow width; 5 and 6 bits are among the automatic mixed-bits search's candidates.

* Dense widths above the GEMV's rows: the **chunk dot** (``variant=""``, ``block_k`` >= 512, 2-byte activations).
  A tensor-core dot per code position contracts one row per chunk, and mma needs 16: so each K step takes 16 (or
  more) chunks, i.e. 512 rows, spanning several groups. Each chunk row's scale (and zero) row is gathered once per
  step (groups are whole chunks: ``group_size`` a multiple of 32) and serves all 32 code positions; code position
  ``j``'s ``(16, BN)`` tile (rows ``32u + j``) is dequantized exactly as the XLA path does and meets 16 activation
  columns that XLA has laid out contiguously once per call (an ``(M, K)`` permuted copy, small next to the weights
  for the ``M`` this path serves).

``split_k > 1`` writes float32 partial sums that XLA adds (deterministic, a second small pass; fills the GPU
when ``M`` is small).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import int_matmul_mosaic as mosaic
from pallas_kernels._common import (
    BlockConfig,
    and_masks,
    cdiv,
    compiler_params,
    exact_field,
    exact_int,
    interleave_rows,
    largest_divisor_at_most,
    load,
    rounded_mul,
    row_int8_quantizer,
    row_slice,
    split_cols,
    split_k_call,
    store,
    weight_rounding,
)

__all__ = [
    "IntLayout",
    "dequantize_reference",
    "dequantize_supported",
    "int_dequantize",
    "int_gemv_a8",
    "int_matmul",
    "int_matmul_reference",
    "supported",
]

_MODES = ("sym", "zeropoint", "minmax")


@dataclasses.dataclass(frozen=True)
class IntLayout:
    """Static description of the packed weight (hashable: a static jit argument).

    Attributes:
      bits: 2 to 8 (3, 5, 6, 7: the dense ``uint32`` stream).
      mode: ``"sym"``, ``"zeropoint"`` or ``"minmax"`` (see module docstring).
      k, n: logical weight shape ``(K, N)``.
      group_size: K rows per scale row; ``None`` for one scale row (per channel / per tensor).
      offset: ``mode="sym"`` with unsigned codes: the integer subtracted from every code, ``W = (c - offset) * s``
        (``None``: ``2**(bits-1)``). Ternary codes ``t + 1`` are 2-bit codes with offset 1: a constant the kernels
        fold, where a zero-point row would be loaded and converted per step.
      nk: 2/4/8 bits only: the packed array is stored transposed, ``(N, packed rows)`` (K-major: each column's
        bytes contiguous; ``IntScheme(layout="nk")``). The tensor-core kernels' weight tiles are then read from
        shared memory by ``ldmatrix`` instead of byte by byte (sm_90 code, ``benchmarks/stream_probe.py --sass``);
        the ``strided`` and ``split`` dots and the ``gemv`` (each column's codes a row of the tile, its activations
        a contiguous row of the reordered copy; the sums along K reduced once, after the loop) run it.
    """

    bits: int
    mode: str
    k: int
    n: int
    group_size: int | None = None
    offset: int | None = None
    nk: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in range(2, 9):
            raise ValueError(f"IntLayout.bits must be an int in 2..8, got {self.bits!r}")
        if self.mode not in _MODES:
            raise ValueError(f"IntLayout.mode must be one of {_MODES}, got {self.mode!r}")
        if self.k <= 0 or self.n <= 0:
            raise ValueError(f"IntLayout: bad shape ({self.k}, {self.n})")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"IntLayout.group_size must be positive or None, got {self.group_size!r}")
        if self.offset is not None and (self.mode != "sym" or not 0 <= self.offset < (1 << self.bits)):
            top = (1 << self.bits) - 1
            raise ValueError(f"IntLayout.offset: a code value 0..{top} with mode 'sym', got {self.offset!r}")
        if self.nk and self.bits not in (2, 4, 8):
            raise ValueError(f"IntLayout.nk: K-major storage is for 2/4/8-bit codes, not {self.bits}-bit streams")

    @property
    def dense(self) -> bool:
        """3-, 5-, 6- and 7-bit codes: a dense bit stream of 32 codes in ``bits`` ``uint32`` words (not whole codes
        per byte)."""
        return self.bits not in (2, 4, 8)

    @property
    def chunk(self) -> int:
        """K rows per packed unit: ``8 // bits`` per byte, or 32 per ``bits``-word chunk (dense)."""
        return 32 if self.dense else 8 // self.bits

    @property
    def words(self) -> int:
        """Packed rows per unit: 1, or ``bits`` words per 32-row chunk (dense)."""
        return self.bits if self.dense else 1

    @property
    def units(self) -> int:
        """Packed units along K (bytes / 32-row chunks per column)."""
        return cdiv(self.k, self.chunk)

    @property
    def packed_rows(self) -> int:
        return self.units * self.words

    @property
    def storage_dtype(self):
        """The packed array's dtype (``int8`` storage is also accepted for symmetric 8-bit codes)."""
        return jnp.dtype(jnp.uint32 if self.dense else jnp.uint8)

    @property
    def groups(self) -> int:
        return 1 if self.group_size is None else cdiv(self.k, self.group_size)


# -------------------------------------------------------------------------------------------------
# XLA reference
# -------------------------------------------------------------------------------------------------
def _unpack_codes(packed: jax.Array, layout: IntLayout) -> jax.Array:
    """Codes ``(K, N)`` as int32 (signed for int8 storage)."""
    if layout.nk:
        packed = packed.T
    if layout.bits == 8:
        return packed.astype(jnp.int32)[: layout.k]
    if layout.dense:
        w = packed.astype(jnp.uint32).reshape(layout.units, layout.words, -1)
        parts = _code_tiles([w[:, i] for i in range(layout.words)], layout)
    else:
        parts = _code_tiles(packed.astype(jnp.int32), layout)
    return jnp.stack(parts, axis=1).reshape(-1, packed.shape[1])[: layout.k]


def _rows(stat: jax.Array, layout: IntLayout) -> jax.Array:
    """(G, N) per-group values to (K, N)."""
    stat = stat.reshape(-1, layout.n)
    if layout.group_size is None:
        return jnp.broadcast_to(stat[:1], (layout.k, layout.n))
    return jnp.repeat(stat, layout.group_size, axis=0, total_repeat_length=layout.groups * layout.group_size)[
        : layout.k
    ]


@functools.partial(jax.jit, static_argnames=("layout",))
def dequantize_reference(packed: jax.Array, scale: jax.Array, zero: jax.Array | None, layout: IntLayout) -> jax.Array:
    """Float32 ``(K, N)`` weight from the packed storage (plain XLA)."""
    c = _unpack_codes(packed, layout).astype(jnp.float32)
    s = _rows(scale.astype(jnp.float32), layout)
    if layout.mode == "sym":
        off = 0.0 if packed.dtype == jnp.int8 else float(_code_offset(layout))
        return (c - off) * s
    z = _rows(zero.astype(jnp.float32), layout)
    if layout.mode == "zeropoint":
        return (c - z) * s
    return rounded_mul(c, s) + z


@functools.partial(jax.jit, static_argnames=("layout", "w_dtype"))
def int_matmul_reference(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    layout: IntLayout,
    w_dtype: str | None = None,
) -> jax.Array:
    """XLA path: dequantize (to ``w_dtype`` first, if given) to ``x.dtype``, then ``jnp.dot`` (float32 acc)."""
    w = dequantize_reference(packed, scale, zero, layout)
    if w_dtype is not None:
        w = w.astype(w_dtype)
    w = w.astype(x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


# -------------------------------------------------------------------------------------------------
# Pallas kernel
# -------------------------------------------------------------------------------------------------
def _largest_pow2_divisor(v: int) -> int:
    return v & (-v)


def _effective_block_k(layout: IntLayout, cfg: BlockConfig) -> int | None:
    """The K step: ``cfg.block_k`` shrunk to divide the group size; ``None`` when no valid step exists. The dense
    chunk dot (:func:`_dense_kernel`) takes ``block_k`` as it is (its steps may span groups)."""
    bk = cfg.block_k
    if _dense_dot(layout, cfg):
        return bk if bk >= _DENSE_MIN_BK and (layout.group_size is None or layout.group_size % 32 == 0) else None
    if layout.group_size is not None:
        bk = min(bk, _largest_pow2_divisor(layout.group_size))
    if bk < _min_block_k(layout, cfg):
        return None
    return bk


def _min_block_k(layout: IntLayout, cfg: BlockConfig) -> int:
    if _dense_dot(layout, cfg):
        return _DENSE_MIN_BK
    if layout.dense:
        return layout.chunk  # (1, BN) word tiles at the least: any group of 32k rows
    if cfg.variant in _GEMV_VARIANTS:
        return layout.chunk * 8  # packed tile rows >= 8 (no dot)
    # each code tile feeds a dot whose contraction must be >= 16 (mma k16)
    min_bk = 16 * (layout.chunk if not cfg.variant.startswith("interleave") else 1)
    return max(min_bk, layout.chunk * 8)  # packed tile rows >= 8


def supported(layout: IntLayout, cfg: BlockConfig, x_dtype, m: int | None = None) -> str | None:
    """``None`` when the kernel handles this case, else the reason it does not (callers fall back to XLA). ``m``
    (the activation rows, when known) matters only to the Mosaic GPU kernels (the GEMV computes one row, the dot up
    to ``block_m``)."""
    if cfg.variant in mosaic.VARIANTS:
        return mosaic.supported(layout, cfg, x_dtype, m)
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"activation dtype {jnp.dtype(x_dtype).name} (need bfloat16/float16/float32)"
    if layout.dense and cfg.variant not in (*_GEMV_VARIANTS, ""):
        return (
            f"{layout.bits}-bit weights run as the chunk dot (variant '') or a GEMV variant "
            f"({', '.join(repr(v) for v in _GEMV_VARIANTS)}), not {cfg.variant!r}"
        )
    if _dense_dot(layout, cfg) and jnp.dtype(x_dtype).itemsize > 2:
        return (
            f"float32 activations: the {layout.bits}-bit chunk dot's (BM, 512) activation tiles are sized for 2-byte "
            "dtypes (bfloat16 / float16)"
        )
    if _dense_dot(layout, cfg) and _effective_block_k(layout, cfg) is None:
        return (
            f"the {layout.bits}-bit chunk dot needs block_k >= {_DENSE_MIN_BK} (16 chunks of 32 rows: one mma K step "
            f"per code position) and groups of a multiple of 32 rows; got block_k={cfg.block_k}, "
            f"group_size={layout.group_size}"
        )
    if _effective_block_k(layout, cfg) is None:
        need = _min_block_k(layout, cfg)
        return (
            f"group_size={layout.group_size} too small for a {layout.bits}-bit K step "
            f"(the kernel needs groups that are multiples of {need})"
        )
    if layout.nk and cfg.variant.split("+")[0] not in ("", "strided", "split", "gemv"):
        return f"K-major (nk) storage runs the strided and split dots and the gemv, not {cfg.variant!r}"
    if cfg.variant in _GEMV_VARIANTS:
        if cfg.block_m > 8 or cfg.block_n < 16:
            return "gemv needs block_m <= 8 and block_n >= 16"
        if cfg.variant.endswith("+postscale") and layout.mode == "minmax":
            return "variant '+postscale' needs integer codes minus an integer offset (sym or zeropoint), not minmax"
        return None
    if cfg.block_m < 16 or cfg.block_n < 16:
        return "block_m and block_n must be >= 16"
    if cfg.variant not in _DOT_VARIANTS:
        return f"variant {cfg.variant!r} (int kernels: {', '.join(repr(v) for v in (*_DOT_VARIANTS, *_GEMV_VARIANTS))})"
    if cfg.variant.endswith("+postscale") and layout.mode == "minmax":
        return "variant '+postscale' needs integer codes minus an integer offset (sym or zeropoint), not minmax"
    return None


#: tensor-core variants: how the packed rows meet the activations (``strided`` loads every ``per``-th activation
#: column per code tile; ``interleave`` rebuilds the tile in K order), and ``+postscale``: the tile holds the
#: exact integers ``c - zero`` and the group scale multiplies the ``(BM, BN)`` dot result instead of every weight
#: (fewer instructions per weight; not bit-identical to the XLA path, which rounds ``(c - zero) * s`` to the
#: activation dtype per weight: the result is closer to float64 ``x @ dequantize(w)`` than that path)
_DOT_VARIANTS = ("", *(f"{b}{p}" for p in ("", "+postscale") for b in ("strided", "interleave", "split")))

#: GEMV variants (``M <= 8``, no dot): ``split-gemv`` loads each row's activations of a step as one contiguous
#: ``(BK/chunk, chunk)`` tile and splits it into the code positions' columns in registers (sm_90, 3-bit g128,
#: M=1: 5 exposed global loads per K-loop trip instead of 36 two-byte ones); ``+postscale`` as for the dots
_GEMV_VARIANTS = tuple(f"{b}{p}" for p in ("", "+postscale") for b in ("gemv", "split-gemv"))


#: the dense chunk dot's shortest K step: 16 chunks, so that each code position's tile feeds an mma with K=16
_DENSE_MIN_BK = 512


def _dense_dot(layout: IntLayout, cfg: BlockConfig) -> bool:
    """Whether ``cfg`` selects the dense (3/5/6/7-bit) chunk dot, :func:`_dense_kernel`."""
    return layout.dense and cfg.variant not in _GEMV_VARIANTS


def _native(layout: IntLayout, s_dtype, cdtype, w_round) -> bool:
    """Whether ``(c - z) * s`` can run in the activation dtype: scales already in it (bf16/f16), no other rounding
    in between; ``c - z`` is exact there and one multiply rounds once, as the reference rounds its float32 product
    (exact: <= 4 + 11 bits)."""
    return (
        layout.bits < 8
        and layout.mode != "minmax"
        and cdtype != jnp.float32
        and s_dtype == cdtype
        and w_round in (None, cdtype)
    )


def _code_tiles(p, layout: IntLayout) -> list:
    """The ``chunk`` code tiles (int32) of a packed int32 tile (2/4/8 bits) or of a dense chunk's word tiles (list)."""
    return [_field_int(v, off, layout.bits) for v, off in _code_fields(p, layout)]


def _field_int(v, off: int, bits: int):
    """Bits ``off .. off+bits`` of ``v`` as int32 (logical shifts: uint32 words, or int32 bytes)."""
    if bits == 8 and off == 0 and v.dtype == jnp.int32:
        return v
    return ((v >> off if off else v) & ((1 << bits) - 1)).astype(jnp.int32)


def _code_fields(p, layout: IntLayout) -> list:
    """Where each of the ``chunk`` codes of a packed tile sits: ``(value, bit offset)`` pairs, code ``j`` = K row
    ``chunk*r + j``. 2/4/8 bits: ``p`` is the int32 byte tile, code ``j`` at bits ``bits*j``. Dense (3/5/6/7 bits):
    ``p`` is the list of the chunks' ``bits`` uint32 word tiles and code ``j`` is stream bits ``[bits*j, bits*(j+1))``;
    codes that straddle two words are assembled at offset 0 (``word >> off`` OR-ed with the next word's low bits)."""
    if not layout.dense:
        return [(p, layout.bits * jj) for jj in range(layout.chunk)]
    bits, out = layout.bits, []
    for jj in range(32):
        w, off = divmod(bits * jj, 32)
        if off + bits > 32:
            out.append(((p[w] >> jnp.uint32(off)) | (p[w + 1] << jnp.uint32(32 - off)), 0))
        else:
            out.append((p[w], off))
    return out


def _load_packed(w_ref, u0, pu: int, n0, bn: int, mask, layout: IntLayout):
    """The packed tile of units ``u0 .. u0+pu`` and columns ``n0 ..`` as :func:`_code_fields` takes it.

    2/4/8 bits: one ``(pu, BN)`` load of ``w_ref`` (the storage as is), as int32; K-major storage (``layout.nk``):
    the ``(BN, pu)`` tile of the ``(N, packed rows)`` array (``mask`` in that orientation). Dense: ``w_ref`` is the
    storage reshaped to ``(units, bits*N)`` and word ``i`` of the chunks is the column tile ``i*N + n0 ..`` (``mask``
    applies to each): a list of ``bits`` uint32 tiles."""
    if layout.nk:
        return load(w_ref.at[pl.ds(n0, bn), pl.ds(u0, pu)], mask).astype(jnp.int32)
    if not layout.dense:
        return load(w_ref.at[pl.ds(u0, pu), pl.ds(n0, bn)], mask).astype(jnp.int32)
    n = layout.n
    return [load(w_ref.at[pl.ds(u0, pu), pl.ds(i * n + n0, bn)], mask) for i in range(layout.words)]


def _as_columns(*rows):
    """``(1, BN)`` rows (or ``None``) as the ``(BN, 1)`` columns that K-major ``(BN, pu)`` tiles broadcast against."""
    return tuple(None if v is None else v.T for v in rows)


def _kernel_weight(packed: jax.Array, layout: IntLayout) -> jax.Array:
    """The packed storage as the kernels read it: as is, or (dense widths) the row-major reshape ``(units, bits*N)``
    (free in XLA: the same bytes), so a chunk's ``bits`` words are one row."""
    return packed.reshape(layout.units, layout.words * layout.n) if layout.dense else packed


def _group_rows(s_ref, z_ref, g, n0: int, bn: int, nmask, native: bool, int_zero: bool):
    """Scale (and zero) row of group ``g`` for columns ``n0 ..``: ``(s, z, zi)`` with ``s`` kept in its storage dtype
    when ``native`` (else float32), ``z`` float32 and ``zi`` the int32 zero point when ``int_zero``. ``g`` may be an
    int32 ``(R, 1)`` array of group indices: then ``(R, BN)`` tiles, one gathered row per entry."""
    idx = (g, (n0 + jnp.arange(bn))[None, :]) if jnp.ndim(g) == 2 else (pl.ds(g, 1), pl.ds(n0, bn))
    s = load(s_ref.at[idx], nmask)
    s = s if native else s.astype(jnp.float32)
    z = None if z_ref is None else load(z_ref.at[idx], nmask)
    zi = None if z is None or not int_zero else z.astype(jnp.int32)
    return s, (None if z is None else z.astype(jnp.float32)), zi


def _weight_tile(c, s, z, zi, layout: IntLayout, sym_int8: bool, native: bool, w_round, cdtype, exact_product=False):
    """Dequantized weights of one code tile ``c`` (int32), in the activation dtype, exactly as the XLA path rounds
    them: ``s`` the group scale row (float32, or the activation dtype when ``native``), ``z`` the float32 zero
    point / minimum row, ``zi`` the integer zero point (``native`` zero-point mode); ``exact_product``: see
    :func:`_exact_product`."""
    if native:  # packed bf16/f16 arithmetic, two weights per instruction; identical weights
        return exact_int(c, _code_offset(layout) if layout.mode == "sym" else zi, cdtype) * s
    # (c - offset) exactly in float32, then the reference's float32 operations: identical weights
    if sym_int8:
        f = c.astype(jnp.float32)
    else:
        f = exact_int(c, z if layout.mode == "zeropoint" else _code_offset(layout))
    return _scaled_weight(f, s, z, layout, w_round, cdtype, exact_product)


def _exact_product(s_dtype) -> bool:
    """Whether every ``code * scale`` is exact in float32: a code has at most 8 significant bits and a float16 /
    bfloat16 scale at most 11, so their product fits float32's 24 (IntScheme stores float16 scales by default).
    Then the min-max weight ``round(c * s) + z`` is ``c * s + z`` rounded once, and a fused multiply-add computes
    it exactly as well: the kernels skip :func:`~pallas_kernels._common.rounded_mul` (three instructions more per
    weight than the ``FFMA``) and keep it for float32 scales."""
    return jnp.dtype(s_dtype).itemsize <= 2


def _code_offset(layout: IntLayout) -> int:
    """The integer offset of unsigned codes with no zero point: ``layout.offset`` or ``2**(bits-1)`` (sym), 0
    (minmax)."""
    if layout.mode != "sym":
        return 0
    return (1 << (layout.bits - 1)) if layout.offset is None else layout.offset


def _zero_scale(s, z, layout: IntLayout, exact_product: bool):
    """``z * s`` (a float32 row) where zero-point weights can be computed as ``c * s - z * s``, else ``None``.

    The XLA path's zero-point weight is ``(c - z) * s`` rounded once. With 16-bit scales (``exact_product``) both
    ``c * s`` and ``z * s`` are exact in float32 (8-bit integers times at most 11 significant bits), so
    ``c * s - z * s`` (a fused multiply-add or not) rounds the same exact value once: the same weight. The kernels
    then extract every code with a constant offset instead of subtracting a per-code-position row ``z + 2**e``
    (:func:`~pallas_kernels._common.exact_field`), which Triton moved into each position's layout through shared
    memory: sm_90, 3-bit g128 zero point, M=1 GEMV, 45 barriers per K-loop trip, 5 with the fold."""
    if layout.mode != "zeropoint" or not exact_product:
        return None
    return z * s


def _scaled_weight(f, s, z, layout: IntLayout, w_round, cdtype, exact_product=False, zs=None):
    """The XLA path's weight from the exact float32 ``f = c - offset``: ``f * s`` (sym, zero point), ``f * s - zs``
    (zero point folded, ``f = c``, ``zs`` from :func:`_zero_scale`) or ``round(f * s) + z`` (minmax; ``f = c``; the
    product rounded on its own unless ``exact_product``), rounded to ``w_round`` (if given), then to ``cdtype``."""
    if layout.mode == "minmax":
        w = (f * s if exact_product else rounded_mul(f, s)) + z
    elif zs is not None:
        w = f * s - zs
    else:
        w = f * s
    if w_round is not None:
        w = w.astype(w_round)
    return w.astype(cdtype)


def _kernel(
    *refs, layout: IntLayout, m: int, bm: int, bn: int, bk: int, steps: int, variant: str, gs: int, w_round=None
):
    if layout.mode == "sym":
        x_ref, w_ref, s_ref, o_ref = refs
        z_ref = None
    else:
        x_ref, w_ref, s_ref, z_ref, o_ref = refs
    k, n = layout.k, layout.n
    per, bits = layout.chunk, layout.bits
    pk = bk // per  # packed rows per step
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    mmask = (m0 + jnp.arange(bm) < m)[:, None] if m % bm else None
    nmask = (n0 + jnp.arange(bn) < n)[None, :] if n % bn else None
    k_ragged = k % bk != 0
    cdtype = x_ref.dtype
    sym_int8 = w_ref.dtype == jnp.int8
    base, post = variant.split("+")[0], variant.endswith("+postscale")
    native = not post and _native(layout, s_ref.dtype, cdtype, w_round)

    nk = layout.nk

    def mm(xt, w):  # (BM, BK') x the weight tile: (BK', BN), or (BN, BK') for K-major storage
        if not nk:
            return jnp.dot(xt, w, preferred_element_type=jnp.float32)
        return jax.lax.dot_general(xt, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    # one group over all of K (per-channel scales): its rows are loaded once, before the loop, and "+postscale"
    # scales the finished sum once (no load per step: a per-step load that no dot consumes is not pipelined)
    one_group = gs >= k
    if one_group:
        rows0 = _group_rows(s_ref, z_ref, 0, n0, bn, nmask, native, post or native)

    def body(t, acc):
        kb = sk * steps + t
        k0 = kb * bk
        r0 = kb * pk
        rmask = r0 + jnp.arange(pk) < layout.packed_rows
        if nk:  # (BN, pk) tile of the (N, packed rows) storage; the scale rows as (BN, 1) columns
            wmask = and_masks(*_as_columns(nmask), rmask[None, :] if k_ragged else None)
        else:
            wmask = and_masks(nmask, rmask[:, None] if k_ragged else None)
        p = _load_packed(w_ref, r0, pk, n0, bn, wmask, layout)
        if one_group:
            s, z, zi = rows0
        else:
            s, z, zi = _group_rows(s_ref, z_ref, k0 // gs, n0, bn, nmask, native, post or native)
        step_scale = post and not one_group
        exact = _exact_product(s_ref.dtype)
        sw, zw, ziw = _as_columns(s, z, zi) if nk else (s, z, zi)
        tiles = []
        for c in _code_tiles(p, layout):
            if post:  # integer offsets only: exact in bf16/f16 (|c - z| <= 255); the scale comes after the dot
                if layout.mode == "sym" and sym_int8:
                    tiles.append(c.astype(cdtype))
                elif bits < 8:
                    off = _code_offset(layout) if layout.mode == "sym" else ziw
                    tiles.append(exact_int(c, off, cdtype))
                else:
                    off = _code_offset(layout) if layout.mode == "sym" else ziw
                    tiles.append((c - off).astype(cdtype))
                continue
            tiles.append(_weight_tile(c, sw, zw, ziw, layout, sym_int8, native, w_round, cdtype, exact))
        if per == 1 or base == "interleave":
            w = tiles[0] if per == 1 else interleave_rows(tiles)
            xmask = and_masks(mmask, (k0 + jnp.arange(bk) < k)[None, :] if k_ragged else None)
            xt = load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], xmask)
            d = mm(xt, w)
            return acc + (d * s if step_scale else d)
        if base == "split":  # one contiguous (BM, BK) activation tile, split into per strided column sets
            xmask = and_masks(mmask, (k0 + jnp.arange(bk) < k)[None, :] if k_ragged else None)
            xs = split_cols(load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], xmask), per)
            d = None
            for xt, w in zip(xs, tiles):
                dj = mm(xt, w)
                d = dj if d is None else d + dj
            return acc + (d * s if step_scale else d)
        # strided activation loads cannot be masked (interpret mode): x is zero-padded to (BM, BK) multiples
        d = None
        for jj, w in enumerate(tiles):
            xt = x_ref[pl.ds(m0, bm), row_slice(k0 + jj, pk, per)]
            dj = mm(xt, w)
            d = dj if d is None else d + dj
        return acc + (d * s if step_scale else d)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    if post and one_group:
        acc = acc * rows0[0]
    _store_tile(o_ref, acc, sk, m0, bm, n0, bn, and_masks(mmask, nmask))


def _store_tile(o_ref, acc, sk, m0, bm: int, n0, bn: int, mask) -> None:
    """Store a ``(BM, BN)`` float32 tile: as split-K partial sums (``o_ref`` ``(split, M, N)``, share ``sk``) or, with
    one share, cast to the output dtype."""
    if len(o_ref.shape) == 3:
        store(o_ref.at[sk, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask)
    else:
        store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask)


def _dense_kernel(*refs, layout: IntLayout, m: int, bm: int, bn: int, pu: int, steps: int, upg: int, w_round=None):
    """The dense (3/5/6/7-bit) chunk dot: each K step takes ``pu`` (>= 16) chunks of 32 rows, and code position
    ``j``'s ``(pu, BN)`` tile (K rows ``32u + j``) meets the activation columns prepared for it by
    :func:`_dense_activations` in one mma with ``K = pu``. A step may span several groups: each chunk row's scale
    (and zero) row is gathered (``upg`` chunks per group), once per step for all 32 positions."""
    if layout.mode == "sym":
        x_ref, w_ref, s_ref, o_ref = refs
        z_ref = None
    else:
        x_ref, w_ref, s_ref, z_ref, o_ref = refs
    bk = 32 * pu
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    mmask = (m0 + jnp.arange(bm) < m)[:, None] if m % bm else None
    nmask = (n0 + jnp.arange(bn) < layout.n)[None, :] if layout.n % bn else None
    k_ragged = layout.units % pu != 0
    cdtype = x_ref.dtype
    native = _native(layout, s_ref.dtype, cdtype, w_round)
    exact = _exact_product(s_ref.dtype)

    def body(t, acc):
        kb = sk * steps + t
        units = kb * pu + jnp.arange(pu)
        wmask = and_masks(nmask, (units < layout.units)[:, None] if k_ragged else None)
        # groups are whole chunks: chunk u's 32 rows share group u // upg (clamped: padding chunks read zero codes
        # against zero activations)
        g = jnp.minimum(units // upg, layout.groups - 1)[:, None]
        s, z, zi = _group_rows(s_ref, z_ref, g, n0, bn, nmask, native, native)
        # float32 weights as the GEMV builds them: each code masked in place into a float32 mantissa (no shift
        # below bit 23), minus a constant, then the zero-point fold c * s - z * s (16-bit scales)
        zs = None if native else _zero_scale(s, z, layout, exact)
        sub = z if layout.mode == "zeropoint" and zs is None else _code_offset(layout)
        d = None
        for jj, (v, off) in enumerate(_code_fields(_load_packed(w_ref, kb * pu, pu, n0, bn, wmask, layout), layout)):
            if native:
                c = _field_int(v, off, layout.bits)
                w = _weight_tile(c, s, z, zi, layout, False, True, w_round, cdtype)
            else:
                w = _scaled_weight(exact_field(v, off, layout.bits, sub), s, z, layout, w_round, cdtype, exact, zs)
            xt = load(x_ref.at[pl.ds(m0, bm), pl.ds(kb * bk + jj * pu, pu)], mmask)
            dj = jnp.dot(xt, w, preferred_element_type=jnp.float32)
            d = dj if d is None else d + dj
        return acc + d

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    _store_tile(o_ref, acc, sk, m0, bm, n0, bn, and_masks(mmask, nmask))


def _dense_activations(x: jax.Array, kp: int, pu: int) -> jax.Array:
    """``(M, Kp)`` copy of ``x`` (zero-padded to ``Kp`` columns) for :func:`_dense_kernel`: column
    ``s*32*pu + j*pu + r`` holds column ``s*32*pu + 32*r + j`` (each step's code position ``j`` reads ``pu``
    contiguous activations)."""
    m, k = x.shape
    x = jnp.pad(x, ((0, 0), (0, kp - k)))
    return x.reshape(m, kp // (32 * pu), pu, 32).transpose(0, 1, 3, 2).reshape(m, kp)


def _gemv_kernel(
    *refs,
    layout: IntLayout,
    bm: int,
    bn: int,
    bk: int,
    steps: int,
    gs: int,
    w_round=None,
    split_x: bool = False,
    post: bool = False,
    xq: bool = False,
    interpret: bool = False,
):
    """``variant="gemv"``: elementwise multiply-add into per-row register accumulators, no dot. ``split_x``: each
    row's activations of the step as one contiguous tile split in registers (``"split-gemv"``); ``post``: exact
    integer tiles, the group scale applied once per step (``"+postscale"``); ``xq`` (with ``split_x``, ``post``, one
    group, no split-K; :func:`int_gemv_a8`): each row quantized to int8 here (its maximum over all of K first), the
    exact integer sums scaled by ``s_x * s`` once, after the K loop."""
    if layout.mode == "sym":
        xt_ref, w_ref, s_ref, o_ref = refs
        z_ref = None
    else:
        xt_ref, w_ref, s_ref, z_ref, o_ref = refs
    k, n = layout.k, layout.n
    pk = bk // layout.chunk  # packed units per step
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    nmask = (n0 + jnp.arange(bn) < n)[None, :] if n % bn else None
    k_ragged = k % bk != 0
    cdtype = xt_ref.dtype
    nk = layout.nk  # K-major storage: (BN, pk) tiles, (BN, 1) scale columns, (1, pk) activation rows

    def col(v):  # a (1, BN) row as the (BN, 1) column the K-major tiles broadcast against
        return _as_columns(v)[0] if nk else v

    sym_int8 = w_ref.dtype == jnp.int8

    # one group over all of K (per-channel scales; always with "+xq"): its rows are loaded once, before the loop,
    # and "+postscale" scales the finished sums once, after it (with s_x for "+xq")
    def stat_rows(g):  # group g's scale (and zero) row for this program's columns, float32
        s = load(s_ref.at[pl.ds(g, 1), pl.ds(n0, bn)], nmask).astype(jnp.float32)
        return s, (None if z_ref is None else load(z_ref.at[pl.ds(g, 1), pl.ds(n0, bn)], nmask).astype(jnp.float32))

    one_group = gs >= k
    scale_steps = post and not one_group
    if one_group:
        s_row, z_row = stat_rows(0)
    exact = _exact_product(s_ref.dtype)
    if xq:
        quantizers = [row_int8_quantizer(xt_ref, m0 + mi, pk, steps, interpret) for mi in range(bm)]

    def x_tile(mi, u0):  # row mi's (pk, chunk) activation tile of the step as float32 (int8 values with xq)
        xt = xt_ref[m0 + mi, pl.ds(u0, pk), :].astype(jnp.float32)
        return quantizers[mi][1](xt) if xq else xt

    def body(t, accs):
        kb = sk * steps + t
        k0 = kb * bk
        u0 = kb * pk
        umask = u0 + jnp.arange(pk) < layout.units
        if nk:
            wmask = and_masks(col(nmask), umask[None, :] if k_ragged else None)
        else:
            wmask = and_masks(nmask, umask[:, None] if k_ragged else None)
        s, z = (s_row, z_row) if one_group else stat_rows(k0 // gs)
        s, z = col(s), (None if z is None else col(z))
        accs = list(accs)
        if split_x:  # per row one contiguous (pk, chunk) tile of x, split into its chunk columns in registers
            xs = [split_cols(x_tile(mi, u0), layout.chunk) for mi in range(bm)]
        steps_acc = [None] * bm  # "+postscale": this step's sum of x * (c - offset), scaled once at the end
        zs = None if post else _zero_scale(s, z, layout, exact)
        sub = z if layout.mode == "zeropoint" and zs is None else _code_offset(layout)
        for jj, (v, off) in enumerate(_code_fields(_load_packed(w_ref, u0, pk, n0, bn, wmask, layout), layout)):
            # the exact integers c - offset in float32 (|c - z| <= 255)
            w = v.astype(jnp.float32) if sym_int8 else exact_field(v, off, layout.bits, sub)
            if not post:  # the XLA path's weights (its float32 operations, then its roundings), in float32
                w = _scaled_weight(w, s, z, layout, w_round, cdtype, exact, zs).astype(jnp.float32)
            for mi in range(bm):
                if split_x:
                    xc = xs[mi][jj]
                elif nk:  # the same activations as a contiguous row of the (Mp, Kp) reordered copy
                    xc = xt_ref[pl.ds(m0 + mi, 1), pl.ds(k0 + jj * pk, pk)].astype(jnp.float32)
                else:
                    # activations k0 + jj + chunk * r, r < pk: a contiguous column of the reordered (K, M) copy
                    xc = xt_ref[pl.ds(k0 + jj * pk, pk), pl.ds(m0 + mi, 1)].astype(jnp.float32)
                if scale_steps:
                    steps_acc[mi] = xc * w if steps_acc[mi] is None else steps_acc[mi] + xc * w
                else:
                    accs[mi] = accs[mi] + xc * w
        if scale_steps:
            accs = [a + d * s for a, d in zip(accs, steps_acc)]
        return tuple(accs)

    init = tuple(jnp.zeros((bn, pk) if nk else (pk, bn), jnp.float32) for _ in range(bm))
    accs = jax.lax.fori_loop(0, steps, body, init)
    for mi in range(bm):
        row = jnp.sum(accs[mi], axis=1 if nk else 0).reshape(1, bn)
        if xq:  # the exact integer sum, then (acc * s_x) * s as the XLA epilogue rounds it
            row = row * quantizers[mi][0] * s_row
        elif post and one_group:
            row = row * s_row
        if len(o_ref.shape) == 3:  # split-K partial sums
            store(o_ref.at[sk, pl.ds(m0 + mi, 1), pl.ds(n0, bn)], row, nmask)
        else:
            store(o_ref.at[pl.ds(m0 + mi, 1), pl.ds(n0, bn)], row.astype(o_ref.dtype), nmask)


def _gemv_activations(x: jax.Array, mp: int, kp: int, bk: int, per: int) -> jax.Array:
    """``(Kp, Mp)`` copy of ``x`` (zero-padded) with row ``kb*bk + j*pk + r`` = column ``kb*bk + per*r + j``
    (``pk = bk / per``; ``per`` = K rows per packed unit)."""
    m, k = x.shape
    x = jnp.pad(x, ((0, mp - m), (0, kp - k)))
    pk = bk // per
    x = x.reshape(mp, kp // bk, pk, per).transpose(1, 3, 2, 0)  # (steps, per, pk, Mp)
    return x.reshape(kp, mp)


@functools.partial(jax.jit, static_argnames=("layout", "config", "w_dtype", "interpret"))
def int_matmul(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    layout: IntLayout,
    config: BlockConfig,
    w_dtype: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x @ dequant(W)`` for a 2-D ``x (M, K)``, fused in one Pallas (Triton) kernel.

    Args:
      x: activations ``(M, K)``, bfloat16 / float16 (float32 runs the dot in tf32).
      packed, scale, zero: the weight storage described in the module docstring (``zero`` is ``None`` for
        ``mode="sym"``); ``scale``/``zero`` may be ``(N,)`` or ``()`` when ``layout.group_size`` is None.
      layout: static :class:`IntLayout`.
      config: block sizes (see :class:`~pallas_kernels._common.BlockConfig`); ``variant``: a tensor-core form
        (``"strided"``, ``"interleave"``, ``"split"``, each optionally ``+postscale``; ``""`` = ``"strided"``) or a
        GEMV (``"gemv"``, ``"split-gemv"``, ``+postscale``; ``M <= 8`` rows per block). Dense 3/5/6/7-bit layouts:
        ``""`` is the chunk dot (``block_k`` >= 512, 2-byte activations), or a GEMV. ``"mosaic-gemv+postscale"`` /
        ``"mosaic-dot"``: the Mosaic GPU kernels of :mod:`pallas_kernels.int_matmul_mosaic` (K-major symmetric
        4/8-bit codes; ``M = 1`` / ``M <= block_m``).
      w_dtype: the dtype the XLA path rounds the float32 dequantized weight to before casting it to
        ``x.dtype`` (the QArray's original dtype); ``None``/float32: no intermediate rounding.
      interpret: run the kernel body with the Pallas interpreter (any backend; for tests).

    Returns:
      ``(M, N)`` in ``x.dtype``.

    Raises:
      ValueError: shapes disagree with ``layout`` or the case is unsupported (see :func:`supported`).
    """
    if x.ndim != 2 or x.shape[1] != layout.k:
        raise ValueError(f"int_matmul: x must be (M, {layout.k}), got {x.shape}")
    _check_packed(packed, layout, "int_matmul")
    why = supported(layout, config, x.dtype, x.shape[0])
    if why:
        raise ValueError(f"int_matmul: unsupported: {why}")
    operands = [x, packed, *_stat_operands(scale, zero, layout, "int_matmul")]
    m = x.shape[0]
    bk = _effective_block_k(layout, config)
    bm, bn = config.block_m, config.block_n
    nsteps = cdiv(layout.k, bk)
    variant = config.variant or "strided"
    w_round = weight_rounding(w_dtype)
    if variant in mosaic.VARIANTS:
        zero_rows = operands[3] if layout.mode != "sym" else None
        if variant == mosaic.GEMV:
            return mosaic.mosaic_gemv(x, packed, operands[2], layout, config, interpret, zero=zero_rows)
        return mosaic.mosaic_dot(x, packed, operands[2], layout, config, w_round, interpret, zero=zero_rows)
    if variant in _GEMV_VARIANTS:
        return _int_gemv(x, operands[1:], layout, config, bk, nsteps, w_round, interpret)
    if layout.dense:
        operands[:2] = [_dense_activations(x, nsteps * bk, bk // 32), _kernel_weight(packed, layout)]
    elif variant.split("+")[0] == "strided" and layout.chunk > 1 and (m % bm or layout.k % bk):
        x = jnp.pad(x, ((0, cdiv(m, bm) * bm - m), (0, nsteps * bk - layout.k)))
        operands[0] = x
    split = largest_divisor_at_most(nsteps, config.split_k)
    steps = nsteps // split
    gs = layout.group_size if layout.group_size is not None else nsteps * bk
    if layout.dense:
        upg = cdiv(gs, 32)  # chunks per group (whole chunks: supported() checked)
        kernel = functools.partial(
            _dense_kernel, layout=layout, m=m, bm=bm, bn=bn, pu=bk // 32, steps=steps, upg=upg, w_round=w_round
        )
    else:
        kernel = functools.partial(
            _kernel,
            layout=layout,
            m=m,
            bm=bm,
            bn=bn,
            bk=bk,
            steps=steps,
            variant=variant,
            gs=gs,
            w_round=w_round,
        )
    return split_k_call(
        kernel,
        operands,
        rows=m,
        n=layout.n,
        split=split,
        out_dtype=x.dtype,
        config=config,
        interpret=interpret,
        name=f"int{layout.bits}_matmul",
    )


def _stat_operands(scale, zero, layout: IntLayout, fn: str) -> list[jax.Array]:
    """The ``scale`` (and, unless ``mode="sym"``, ``zero``) kernel operands as ``(G, N)`` rows; a per-column ``(N,)``
    or per-tensor ``()`` value becomes one row. Raises ``ValueError`` naming ``fn`` for a missing zero or a shape
    that does not fit the layout."""
    shape = (layout.groups, layout.n)

    def rows(v, what):
        v = jnp.asarray(v)
        if v.ndim < 2:
            if v.shape not in ((), (layout.n,)):
                raise ValueError(f"{fn}: {what} must be {shape}, ({layout.n},) or (), got {v.shape}")
            v = jnp.broadcast_to(v, (layout.n,)).reshape(1, -1)
        if v.shape != shape:
            raise ValueError(f"{fn}: {what} must be {shape}, got {v.shape}")
        return v

    if layout.mode == "sym":
        return [rows(scale, "scale")]
    if zero is None:
        raise ValueError(f"{fn}: mode={layout.mode!r} needs zero")
    return [rows(scale, "scale"), rows(zero, "zero")]


def _check_packed(packed: jax.Array, layout: IntLayout, fn: str) -> None:
    want = (layout.n, layout.packed_rows) if layout.nk else (layout.packed_rows, layout.n)
    if packed.shape != want:
        raise ValueError(f"{fn}: packed weight must be {want}{' (K-major)' * layout.nk}, got {packed.shape}")
    ok = (layout.storage_dtype,) + ((jnp.dtype(jnp.int8),) if layout.bits == 8 and layout.offset is None else ())
    if packed.dtype not in ok:
        raise ValueError(
            f"{fn}: {layout.bits}-bit codes are stored as {' or '.join(d.name for d in ok)}, got {packed.dtype}"
        )


def _int_gemv(
    x, w_operands, layout: IntLayout, config: BlockConfig, bk: int, nsteps: int, w_round, interpret, xq=False
):
    m = x.shape[0]
    bm, bn = config.block_m, config.block_n
    mp = cdiv(m, bm) * bm
    w_operands = [_kernel_weight(w_operands[0], layout), *w_operands[1:]]
    split_x = config.variant.startswith("split-gemv")
    if split_x:
        kp = nsteps * bk
        xt = jnp.pad(x, ((0, mp - m), (0, kp - x.shape[1]))).reshape(mp, kp // layout.chunk, layout.chunk)
    else:
        xt = _gemv_activations(x, mp, nsteps * bk, bk, layout.chunk)
        if layout.nk:  # each code position's activations a contiguous row
            xt = xt.T
    split = largest_divisor_at_most(nsteps, config.split_k)
    steps = nsteps // split
    gs = layout.group_size if layout.group_size is not None else nsteps * bk
    kernel = functools.partial(
        _gemv_kernel,
        layout=layout,
        bm=bm,
        bn=bn,
        bk=bk,
        steps=steps,
        gs=gs,
        w_round=w_round,
        split_x=split_x,
        post=xq or config.variant.endswith("+postscale"),
        xq=xq,
        interpret=interpret,
    )
    out = split_k_call(
        kernel,
        [xt, *w_operands],
        rows=mp,
        n=layout.n,
        split=split,
        out_dtype=x.dtype,
        config=config,
        interpret=interpret,
        name=f"int{layout.bits}_gemv",
    )
    return out[:m]


@functools.partial(jax.jit, static_argnames=("layout", "config", "max_abs_weight", "interpret"))
def int_gemv_a8(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    layout: IntLayout,
    config: BlockConfig,
    max_abs_weight: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Integer weights times int8 per-token activations in one launch (small ``M``)::

        s_x[m] = max_k |x[m, k]| / 127   (1 for an all-zero row),   q = clip(round(x / s_x), -127, 127)
        y[m, n] = ((sum_k q[m, k] (c[k, n] - z[n])) * s_x[m]) * s[n]

    The ``"split-gemv"`` kernel with the activation quantization inside (each program first finds its rows'
    maxima over all of K, then quantizes every tile as it loads it, with correctly rounded division and
    ties-to-even rounding, bit-identical to the XLA pre-pass) and no split-K: no pre-pass, no partial-sum pass.
    The products and sums are exact integers in float32 (checked: ``127 * max_abs_weight * K < 2**24``), so the
    result equals the int32 dot's scaled as above, bit for bit.

    Args:
      x: activations ``(M, K)`` (any float dtype; the output has it).
      packed, scale, zero: one-group weights (``layout.group_size`` None) in ``sym`` or ``zeropoint`` mode;
        ``scale`` ``(N,)``, ``(1, N)`` or ``()``.
      layout: static :class:`IntLayout`.
      config: ``variant="split-gemv"``, ``block_m <= 8``, ``split_k=1``.
      max_abs_weight: the largest ``|c - z|`` the codes hold (``None``: the most the layout allows); ternary
        codes ``t + 1`` with zero point 1 give 1.
      interpret: run the kernel with the Pallas interpreter.

    Raises:
      ValueError: a grouped or min-max layout, another variant, ``split_k != 1``, bad shapes, or sums that could
        exceed float32's exact integers.
    """
    if x.ndim != 2 or x.shape[1] != layout.k:
        raise ValueError(f"int_gemv_a8: x must be (M, {layout.k}), got {x.shape}")
    _check_packed(packed, layout, "int_gemv_a8")
    if layout.group_size is not None or layout.mode == "minmax":
        raise ValueError("int_gemv_a8: needs one scale per column (group_size None) and sym or zeropoint codes")
    if config.variant != "split-gemv" or config.split_k != 1:
        raise ValueError(f"int_gemv_a8: needs variant 'split-gemv' and split_k=1, got {config}")
    why = supported(layout, config, jnp.float32)
    if why:
        raise ValueError(f"int_gemv_a8: unsupported: {why}")
    bound = max_abs_weight
    if bound is None:  # the largest |c - offset| the storage can hold
        off = _code_offset(layout)
        bound = max(off, (1 << layout.bits) - 1 - off) if layout.mode == "sym" else (1 << layout.bits) - 1
        bound = 128 if packed.dtype == jnp.int8 else bound
    if 127 * bound * layout.k >= 2**24:
        raise ValueError(f"int_gemv_a8: K={layout.k}: sums up to 127*{bound}*K are not exact in float32")

    operands = [packed, *_stat_operands(scale, zero, layout, "int_gemv_a8")]
    bk = _effective_block_k(layout, config)
    return _int_gemv(x, operands, layout, config, bk, cdiv(layout.k, bk), None, interpret, xq=True)


# -------------------------------------------------------------------------------------------------
# dequantization kernel (large M: dequantize once, then XLA's dense matmul)
# -------------------------------------------------------------------------------------------------
def _dequant_kernel(*refs, layout: IntLayout, bk: int, bn: int, gs: int, w_round, out_dtype):
    if layout.mode == "sym":
        w_ref, s_ref, o_ref = refs
        z_ref = None
    else:
        w_ref, s_ref, z_ref, o_ref = refs
    per = layout.chunk
    pk = bk // per
    kb, j = pl.program_id(0), pl.program_id(1)
    k0, n0 = kb * bk, j * bn
    native = _native(layout, s_ref.dtype, out_dtype, w_round)
    s, z, zi = _group_rows(s_ref, z_ref, k0 // gs, n0, bn, None, native, native)
    sym_int8 = w_ref.dtype == jnp.int8
    if layout.nk:  # K-major: (BN, pk) tiles against (BN, 1) scale columns, each weight tile transposed to (pk, BN)
        s, z, zi = _as_columns(s, z, zi)
    for jj, c in enumerate(_code_tiles(_load_packed(w_ref, kb * pk, pk, n0, bn, None, layout), layout)):
        tile = _weight_tile(c, s, z, zi, layout, sym_int8, native, w_round, out_dtype, _exact_product(s_ref.dtype))
        rows = pl.ds(k0, bk) if per == 1 else pl.ds(k0 + jj, pk, stride=per)  # code jj: rows k0 + jj + per*r
        o_ref[rows, pl.ds(n0, bn)] = tile.T if layout.nk else tile


def dequantize_supported(layout: IntLayout, block_k: int = 128, block_n: int = 128) -> str | None:
    """``None`` when :func:`int_dequantize` handles this layout with these blocks, else why not."""
    bk = min(block_k, _largest_pow2_divisor(layout.group_size)) if layout.group_size is not None else block_k
    if layout.k % bk or layout.n % block_n:
        return f"(K, N) = ({layout.k}, {layout.n}) not a multiple of the ({bk}, {block_n}) tile (no masked tiles)"
    if bk < (layout.chunk if layout.dense else layout.chunk * 8):
        return f"group_size={layout.group_size} too small for a {layout.bits}-bit tile"
    return None


@functools.partial(jax.jit, static_argnames=("layout", "out_dtype", "w_dtype", "block_k", "block_n", "interpret"))
def int_dequantize(
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    layout: IntLayout,
    out_dtype,
    w_dtype: str | None = None,
    block_k: int = 128,
    block_n: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """The ``(K, N)`` weight in ``out_dtype``, bit-identical to ``dequantize_reference`` rounded to ``w_dtype`` (if
    given) and then to ``out_dtype`` (the XLA path's weights), in one memory-bound Pallas kernel.

    For large ``M``, where a fused matmul kernel loses to the dense tensor-core GEMM, ``jnp.dot(x, int_dequantize(
    ...))`` is the XLA path with a faster dequantization: the same weights, the same dot, the same result.
    Grid ``(K / BK, N / BN)``: each program loads one packed ``(BK / chunk, BN)`` tile (``bits`` word tiles for
    dense widths) and its scale (and zero) row and stores each code's tile to its rows ``k0 + j + chunk * r`` with a
    strided store. K-major storage (``layout.nk``): a ``(BN, BK / chunk)`` tile, each code's weights transposed in
    the kernel before the same store.

    ``scale`` / ``zero`` as for :func:`int_matmul`: ``(G, N)`` rows, or ``(N,)`` / ``()`` with one group.

    Raises ``ValueError`` for shapes :func:`dequantize_supported` rejects (callers use the XLA dequantization) and
    for a ``scale`` / ``zero`` of another shape (a transposed ``(N, G)`` scale is refused, not reshaped).
    """
    why = dequantize_supported(layout, block_k, block_n)
    if why:
        raise ValueError(f"int_dequantize: unsupported: {why}")
    _check_packed(packed, layout, "int_dequantize")
    operands = [_kernel_weight(packed, layout), *_stat_operands(scale, zero, layout, "int_dequantize")]
    bk = min(block_k, _largest_pow2_divisor(layout.group_size)) if layout.group_size is not None else block_k
    gs = layout.group_size if layout.group_size is not None else layout.k
    out_dtype = jnp.dtype(out_dtype)
    kernel = functools.partial(
        _dequant_kernel,
        layout=layout,
        bk=bk,
        bn=block_n,
        gs=gs,
        w_round=weight_rounding(w_dtype),
        out_dtype=out_dtype,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((layout.k, layout.n), out_dtype),
        grid=(layout.k // bk, layout.n // block_n),
        compiler_params=compiler_params(BlockConfig(num_warps=4, num_stages=1)),
        interpret=interpret,
        name=f"int{layout.bits}_dequantize",
    )(*operands)
