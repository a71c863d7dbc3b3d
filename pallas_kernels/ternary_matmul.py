"""Ternary (BitNet b1.58) matmuls: weight-only (W1.58A16) and W1.58A8 with int8 per-token activations.

Weights (jaxquant ``TernaryScheme`` with ``packing="2bit"``): codes ``t + 1`` in {0, 1, 2} for ``t`` in
{-1, 0, 1}, four per byte, code ``j`` of a byte in bits ``2j..2j+1``, and a float32 absmean scale ``s``:

* ``packing="k"`` (``granularity="channel"``): packed along K, ``uint8 (ceil(K/4), N)``, row ``4r+j`` in
  bits ``2j`` of packed row ``r``; ``s`` per output column ``(N,)``;
* ``packing="n"`` (``granularity="tensor"``, the flattened row-major weight, ``N % 4 == 0``): viewed as
  ``uint8 (K, N/4)``, column ``4c+j`` in bits ``2j`` of byte ``c``; one scale ``()``.

``mode="w16"`` computes ``x @ dequant(W)`` with ``W = t * s`` rounded to the activation dtype (as the XLA path).

``mode="a8"`` is BitNet's W1.58A8 product with activations quantized per token (row) to int8 beforehand
(:func:`quantize_activations`, an XLA pre-pass: ``s_x[m] = max_k |x[m, k]| / 127``,
``q = clip(round(x / s_x), -127, 127)``)::

    y[m, n] = (sum_k q[m, k] t[k, n]) * s_x[m] * s[n]          (int8 x int8 -> int32 dot, exact)

Kernel: grid ``(cdiv(M, BM), cdiv(N, BN), split_k)``; per K step of ``BK`` rows: load the packed tile, split
the four 2-bit fields, subtract 1, then for ``"k"`` packing multiply each field with the activation columns
``k0 + j + 4r`` (default: four strided loads of a zero-padded ``x``; ``config.variant="split"``: one contiguous
``(BM, BK)`` tile split into the four column sets in registers, which Triton vectorizes and pipelines), and for
``"n"`` packing interleave the fields along N into one ``(BK, BN)`` tile. The weight-only dequantization
``(c - 1) * s`` builds ``c - 1`` exactly in float32 with integer ops (``_common.exact_int``), not an
int-to-float conversion.

``config.variant="split+ptx"`` (W1.58A8, ``packing="k"``): the int8 weight tiles come from inline PTX
(:func:`pallas_kernels._ptx.ternary_field_asm`: four codes of one register to four int8 values in 4-5 instructions)
instead of per-element integer arithmetic repacked into bytes; sm_90 K loop of the 16x64x128 tile: 207
instructions per trip vs 425 for ``split``. Exact (the same int8 values); run by the PTX emulator in interpret
mode and not yet on a GPU, so no table or heuristic selects it.

``config.variant="split+xq"`` / ``"split+ptx+xq"`` (W1.58A8, ``packing="k"``): no XLA pre-pass; each program finds
its rows' maxima over all of K first, then quantizes each activation tile as it is loaded, bit-identical to
:func:`quantize_activations` (correctly rounded divisions and ties-to-even rounding by inline PTX,
:func:`pallas_kernels._ptx.div_rn` / :func:`~pallas_kernels._ptx.rint`). With ``split_k=1`` the whole product is
one launch. The price is in the K loop: sm_90, 16x64x128 tile: 543 instructions per trip vs 213 for ``split+ptx``
(``div.rn`` is a reciprocal, five FMAs and a range check per element), so it can win only where the launch it
saves costs more; a GPU has to time it.

``config.variant="gemv"`` (small ``M``, memory bound, ``block_m <= 8``), ``packing="k"``: the weight-only
integer GEMV kernel of :mod:`pallas_kernels.int4_matmul` reads the same bytes as 2-bit ``sym`` codes with offset 1
(a constant the compiler folds; no zero-point row per step), ``W = (c - 1) * s``, exactly ``t * s``. For
``mode="a8"`` it runs on the int8 activations as float32 with ``s = 1`` in its ``+postscale`` form (exact integer
weights): the products and sums (``|sum| <= 127 K < 2**24``, checked) are exact, as the int32 dot's, and
``s_x * s`` is applied afterwards. ``"split-gemv"``: the same with the integer GEMV's contiguous activation tiles
(one load per row and step, split in registers).

``"gemv+postscale"`` / ``"split-gemv+postscale"`` (W1.58A16): the XLA path's weight ``round(t * s)`` is
``t * round(s)``, so the GEMV sums ``x * t`` exactly within a step and scales the step's sum by the rounded ``s``
(no per-weight multiply or rounding): the same weights, only the float32 roundings of the sums move.

``"split-gemv+xq"`` (W1.58A8, one launch): :func:`pallas_kernels.int4_matmul.int_gemv_a8`, the split GEMV with the
activation quantization inside (bit-identical to :func:`quantize_activations`, as ``+xq`` above) and no split-K,
``s_x * s`` applied after the K loop: no pre-pass and no partial-sum pass. Without split-K the GPU is filled by
narrow column tiles (``tuning.gemv_config``: 32 wide, 256 programs at N=8192); each program reads its rows twice
(the maxima first) and quantizes each activation tile it loads, which at M=1 costs little against the ``BN``
weights each activation meets.

``"dp4a-gemv"`` / ``"dp4a-gemv+xq"`` (W1.58A8, M <= 8; one launch with ``+xq``): an integer GEMV. A packed byte
holds four consecutive K rows of one column, so inline PTX spreads its four codes ``c = t + 1`` to the four bytes
of a word (:data:`pallas_kernels._ptx.CODE_QUAD_ASM`, five instructions) and one ``dp4a`` per word and activation
row multiplies them with the row's four int8 activations of those K rows (packed in one word) and accumulates in
int32; a second ``dp4a`` against ``0x01010101`` per activation word sums the row's activations, and
``sum_k t q = sum_k c q - sum_k q``. Exact, so bit-identical to the reference for any K. sm_90, 8192², M=1 (static
counts): 2.02 instructions per weight, below the 2-bit weights' memory floor (4.0 against 5.7 us at an H100's copy
bandwidth); the float GEMVs above need 4.7, the ``split+ptx`` dot 3.3. The PTX runs through
:func:`pallas_kernels._ptx.emulate` in interpret mode, so no table or heuristic selects it before a GPU has.
``packing="n"`` has no GEMV path and uses the dot kernel with 16-row tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    BlockConfig,
    and_masks,
    cdiv,
    divide_rn,
    exact_int,
    interleave_cols,
    largest_divisor_at_most,
    load,
    row_int8_quantizer,
    row_slice,
    split_cols,
    split_k_call,
    store,
    weight_rounding,
)
from pallas_kernels._ptx import code_quads, div_rn, dp4a, quantize_int8, ternary_field

__all__ = [
    "VARIANTS",
    "dequantize_reference",
    "quantize_activations",
    "supported",
    "ternary_matmul",
    "ternary_matmul_reference",
]


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token absmax int8 quantization: ``(q int8 (M, K), s_x float32 (M,))``; all-zero rows get ``s_x=1``.
    Both divisions correctly rounded (:func:`~pallas_kernels._common.divide_rn`), as in ``jaxquant.nn``'s BitNet
    layers and the kernels' in-kernel quantization."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1)
    sx = jnp.where(amax > 0, divide_rn(amax, jnp.float32(127.0)), 1.0)
    q = jnp.clip(jnp.round(divide_rn(xf, sx[:, None])), -127, 127).astype(jnp.int8)
    return q, sx


def _codes(data: jax.Array, k: int, n: int, packing: str) -> jax.Array:
    """Ternary values ``t`` in {-1, 0, 1} as int32 ``(K, N)``."""
    p = data.astype(jnp.int32)
    if packing == "k":
        parts = [(p >> (2 * j)) & 3 for j in range(4)]
        c = jnp.stack(parts, axis=1).reshape(-1, n)[:k]
    else:
        p = p.reshape(k, n // 4)
        parts = [(p >> (2 * j)) & 3 for j in range(4)]
        c = jnp.stack(parts, axis=-1).reshape(k, n)
    return c - 1


@functools.partial(jax.jit, static_argnames=("k", "n", "packing"))
def dequantize_reference(data, scale, *, k: int, n: int, packing: str) -> jax.Array:
    """Float32 ``(K, N)`` weight ``t * s``."""
    return _codes(data, k, n, packing).astype(jnp.float32) * jnp.asarray(scale, jnp.float32)


@functools.partial(jax.jit, static_argnames=("k", "n", "packing", "mode", "w_dtype"))
def ternary_matmul_reference(x, data, scale, *, k: int, n: int, packing: str, mode: str = "w16", w_dtype=None):
    """XLA reference of :func:`ternary_matmul`."""
    if mode == "w16":
        w = dequantize_reference(data, scale, k=k, n=n, packing=packing)
        if w_dtype is not None:
            w = w.astype(w_dtype)
        return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    q, sx = quantize_activations(x)
    t = _codes(data, k, n, packing).astype(jnp.int8)
    acc = jnp.dot(q, t, preferred_element_type=jnp.int32)
    s = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (n,))
    return (acc.astype(jnp.float32) * sx[:, None] * s[None, :]).astype(x.dtype)


#: GEMVs (M <= 8, ``packing="k"``): ``"gemv"``, ``"split-gemv"`` (through the integer GEMV); W1.58A16 only
#: ``"gemv+postscale"``, ``"split-gemv+postscale"`` (exact ``t`` weights, each step's sum scaled once); W1.58A8 only
#: ``"split-gemv+xq"`` (one launch), ``"dp4a-gemv"`` / ``"dp4a-gemv+xq"`` (integer GEMV, one ``dp4a`` per four
#: weights and row)
_GEMV = ("gemv", "split-gemv", "split-gemv+xq", "gemv+postscale", "split-gemv+postscale", "dp4a-gemv", "dp4a-gemv+xq")
#: dot kernels: ``""`` (strided activation loads), ``"split"`` (one contiguous activation tile split in registers);
#: W1.58A8 only: ``"+ptx"`` (int8 weights by inline PTX), ``"+xq"`` (the activation quantization inside the kernel,
#: bit-identical to the XLA pre-pass: one launch less, each program reading its rows' K columns once more for the
#: row maxima); then the GEMVs
VARIANTS = ("", "split", "split+ptx", "split+xq", "split+ptx+xq", *_GEMV)


def supported(k: int, n: int, packing: str, cfg: BlockConfig, x_dtype, mode: str) -> str | None:
    """``None`` when the kernel handles this case with ``cfg``, else why not (callers take the XLA path)."""
    if packing not in ("k", "n"):
        return f"packing {packing!r}"
    if packing == "n" and n % 4:
        return f"tensor-granularity (flat) packing needs N % 4 == 0, got N={n}"
    if mode == "w16" and jnp.dtype(x_dtype) not in (
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float16),
        jnp.dtype(jnp.float32),
    ):
        return f"activation dtype {jnp.dtype(x_dtype).name}"
    if cfg.variant not in VARIANTS:
        return f"variant {cfg.variant!r} (ternary kernels: {', '.join(repr(v) for v in VARIANTS)})"
    if ("+ptx" in cfg.variant or "+xq" in cfg.variant or "dp4a" in cfg.variant) and (mode != "a8" or packing != "k"):
        return f"variant {cfg.variant!r} is W1.58A8 with codes packed along K only"
    if cfg.variant in _GEMV:
        if cfg.block_m > 8 or cfg.block_n < 16 or cfg.block_k < 32:
            return "gemv needs block_m <= 8, block_n >= 16 and block_k >= 32"
        if cfg.variant.endswith("+postscale") and mode != "w16":
            return "variant '+postscale' is W1.58A16 (the W1.58A8 GEMV always sums exact integer products)"
        if cfg.variant.endswith("+xq") and cfg.split_k != 1:
            return "variant 'split-gemv+xq' is one launch: split_k must be 1"
        if mode == "a8" and packing == "k" and 127 * k >= 2**24:
            return f"the W1.58A8 GEMV sums int8 x ternary products in float32, exact only for K < 132104 (K={k})"
        return None
    min_bk = 64 if (packing == "k" and mode == "w16") else (128 if packing == "k" else 32)
    if cfg.block_k < min_bk or cfg.block_m < 16 or cfg.block_n < 16:
        return f"block_k >= {min_bk}, block_m, block_n >= 16 needed"
    return None


def _quantize_rows_in_kernel(x_ref, m0, bm: int, k: int, bk: int, mmask, interpret: bool):
    """Per-row ``s_x`` ``(BM, 1)`` exactly as :func:`quantize_activations` computes it, from all ``K`` columns of
    the block's rows, and the quantizer of one ``(BM, BK)`` tile: ``clip(round(x / s_x), -127, 127)`` as int8.

    Bit-identical to the XLA pre-pass: the maximum of ``|x|`` is exact in any order, both divisions are correctly
    rounded (:func:`pallas_kernels._ptx.div_rn`; Pallas' own ``/`` is approximate), and the rounding to the nearest
    even integer is ``cvt.rni`` (:func:`pallas_kernels._ptx.rint`; ``lax.round`` does not lower)."""
    k_ragged = k % bk != 0

    def amax_step(t_, amax):
        k0 = t_ * bk
        xmask = and_masks(mmask, (k0 + jnp.arange(bk) < k)[None, :] if k_ragged else None)
        xt = load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], xmask).astype(jnp.float32)
        return jnp.maximum(amax, jnp.max(jnp.abs(xt), axis=1, keepdims=True))

    amax = jax.lax.fori_loop(0, cdiv(k, bk), amax_step, jnp.zeros((bm, 1), jnp.float32))
    sx = jnp.where(amax > 0, div_rn(amax, jnp.full((bm, 1), 127.0, jnp.float32), interpret=interpret), 1.0)

    def quantize(xt):
        return quantize_int8(xt.astype(jnp.float32), sx, interpret=interpret)

    return sx, quantize


def _kernel(*refs, m, k, n, bm, bn, bk, steps, packing, mode, w_round, variant="", interpret=False):
    xq = variant.endswith("+xq")  # W1.58A8 activations quantized here, not by an XLA pre-pass
    if mode == "a8" and not xq:
        x_ref, w_ref, s_ref, sx_ref, o_ref = refs
    else:
        x_ref, w_ref, s_ref, o_ref = refs
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    mmask = (m0 + jnp.arange(bm) < m)[:, None] if m % bm else None
    nmask = (n0 + jnp.arange(bn) < n)[None, :] if n % bn else None
    k_ragged = k % bk != 0
    s = load(s_ref.at[pl.ds(0, 1), pl.ds(n0, bn)], nmask)  # (1, BN) float32
    cdtype = x_ref.dtype
    acc_dtype = jnp.int32 if mode == "a8" else jnp.float32

    split = variant.startswith("split")
    ptx = "+ptx" in variant  # int8 weights from four packed codes per instruction (inline PTX)
    if xq:
        sx_rows, quantize = _quantize_rows_in_kernel(x_ref, m0, bm, k, bk, mmask, interpret)

    def field(p, jj):  # 2-bit field jj of the packed int32 tile: the code c = t + 1 in {0, 1, 2}
        return (p >> (2 * jj)) & 3

    # t * s is exact in float32 (t in {-1, 0, 1}), so rounding it to w_round and then to the activation dtype equals
    # t times the scale rounded the same way, once per column: the tile is built in the activation dtype (packed
    # bf16/f16 arithmetic, two weights per instruction), with weights identical to the XLA path's
    s_c = (s if w_round is None else s.astype(w_round)).astype(cdtype)

    def as_weight(c):  # codes c = t + 1 in {0, 1, 2} -> dot operand holding t (times s for w16)
        if mode == "a8":
            return (c - 1).astype(jnp.int8)
        return exact_int(c, 1, cdtype) * s_c  # no int-to-float conversion

    def body(t_, acc):
        k0 = (sk * steps + t_) * bk
        if packing == "k":
            pk = bk // 4
            r0 = k0 // 4
            rmask = (r0 + jnp.arange(pk) < cdiv(k, 4))[:, None] if k_ragged else None
            p8 = load(w_ref.at[pl.ds(r0, pk), pl.ds(n0, bn)], and_masks(nmask, rmask))
            p = p8.astype(jnp.int32)
            if split:  # one contiguous activation tile, split into the columns of each 2-bit field
                xmask = and_masks(mmask, (k0 + jnp.arange(bk) < k)[None, :] if k_ragged else None)
                xtile = load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], xmask)
                xts = split_cols(quantize(xtile) if xq else xtile, 4)
            for jj in range(4):
                wt = ternary_field(p8, jj, interpret=interpret) if ptx else as_weight(field(p, jj))
                xt = xts[jj] if split else x_ref[pl.ds(m0, bm), row_slice(k0 + jj, pk, 4)]
                acc = acc + jnp.dot(xt, wt, preferred_element_type=acc_dtype)
            return acc
        q = bn // 4
        kmask = (k0 + jnp.arange(bk) < k) if k_ragged else None
        cmask = (n0 // 4 + jnp.arange(q) < n // 4)[None, :] if n % bn else None
        p = load(
            w_ref.at[pl.ds(k0, bk), pl.ds(n0 // 4, q)], and_masks(cmask, None if kmask is None else kmask[:, None])
        )
        p = p.astype(jnp.int32)
        wt = as_weight(interleave_cols([field(p, jj) for jj in range(4)]))
        xt = load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], and_masks(mmask, None if kmask is None else kmask[None]))
        return acc + jnp.dot(xt, wt, preferred_element_type=acc_dtype)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), acc_dtype))
    if mode == "a8":
        sx = sx_rows if xq else load(sx_ref.at[pl.ds(m0, bm), pl.ds(0, 1)], mmask)
        y = acc.astype(jnp.float32) * sx * s
    else:
        y = acc
    omask = and_masks(mmask, nmask)
    if len(o_ref.shape) == 3:
        store(o_ref.at[sk, pl.ds(m0, bm), pl.ds(n0, bn)], y, omask)
    else:
        store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype), omask)


@functools.partial(jax.jit, static_argnames=("k", "n", "packing", "mode", "config", "w_dtype", "interpret"))
def ternary_matmul(
    x: jax.Array,
    data: jax.Array,
    scale: jax.Array,
    *,
    k: int,
    n: int,
    packing: str,
    mode: str = "w16",
    config: BlockConfig,
    w_dtype: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ternary matmul (see module docstring); returns ``(M, N)`` in ``x.dtype``.

    Args:
      x: activations ``(M, K)`` (``mode="a8"``: quantized here per token by :func:`quantize_activations`).
      data: packed codes (``packing="k"``: ``(ceil(K/4), N)``; ``"n"``: ``(K*N/4,)`` or ``(K, N/4)``).
      scale: float32 ``(N,)`` or ``()``.
      w_dtype: ``mode="w16"``: dtype the XLA path rounds the dequantized weight to first (``None``: none).
    """
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"ternary_matmul: x must be (M, {k}), got {x.shape}")
    if mode not in ("w16", "a8"):
        raise ValueError(f"ternary_matmul: mode must be 'w16' or 'a8', got {mode!r}")
    why = supported(k, n, packing, config, x.dtype, mode)
    if why:
        raise ValueError(f"ternary_matmul: unsupported: {why}")
    s2 = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (n,)).reshape(1, n)  # the column scales as a (1, N) row
    if config.variant in _GEMV:
        if packing == "k":
            return _ternary_gemv(x, data, s2, k=k, n=n, mode=mode, config=config, w_dtype=w_dtype, interpret=interpret)
        config = config.replace(block_m=16, block_n=64, block_k=128, variant="")  # no GEMV path for "n"
    m = x.shape[0]
    bm, bn = config.block_m, config.block_n
    bk = config.block_k
    nsteps = cdiv(k, bk)
    split = largest_divisor_at_most(nsteps, config.split_k)
    steps = nsteps // split
    xq = config.variant.endswith("+xq") and packing == "k"
    if mode == "a8" and not xq:
        xin, sx = quantize_activations(x)
    else:
        xin, sx = x, None
    if packing == "k":
        if data.shape != (cdiv(k, 4), n):
            raise ValueError(f"ternary_matmul: packed data must be {(cdiv(k, 4), n)}, got {data.shape}")
        if "+ptx" in config.variant and jnp.dtype(data.dtype) != jnp.dtype(jnp.uint8):
            raise ValueError(f"ternary_matmul: variant {config.variant!r} needs uint8 codes, got {data.dtype}")
        if not config.variant.startswith("split") and (m % bm or k % bk):  # strided loads cannot be masked: zero-pad
            xin = jnp.pad(xin, ((0, cdiv(m, bm) * bm - m), (0, nsteps * bk - k)))
    else:
        if data.size != k * n // 4:
            raise ValueError(f"ternary_matmul: packed data must hold {k * n // 4} bytes, got {data.size}")
        data = data.reshape(k, n // 4)
    operands = [xin, data, s2] + ([sx.reshape(m, 1)] if sx is not None else [])
    w_round = weight_rounding(w_dtype)
    kernel = functools.partial(
        _kernel,
        m=m,
        k=k,
        n=n,
        bm=bm,
        bn=bn,
        bk=bk,
        steps=steps,
        packing=packing,
        mode=mode,
        w_round=w_round,
        variant=config.variant if packing == "k" else "",
        interpret=interpret,
    )
    return split_k_call(
        kernel,
        operands,
        rows=m,
        n=n,
        split=split,
        out_dtype=x.dtype,
        config=config,
        interpret=interpret,
        name=f"ternary_{mode}_matmul",
    )


def _ternary_gemv(x, data, s2, *, k: int, n: int, mode: str, config: BlockConfig, w_dtype, interpret: bool):
    """``packing="k"`` through the 2-bit integer GEMV kernel (see the module docstring); ``s2``: ``(1, N)`` float32."""
    from pallas_kernels import int4_matmul as im

    if data.shape != (cdiv(k, 4), n):
        raise ValueError(f"ternary_matmul: packed data must be {(cdiv(k, 4), n)}, got {data.shape}")
    # codes c = t + 1 as 2-bit codes with offset 1: the GEMV's weight (c - 1) * s is exactly the reference's t * s
    layout = im.IntLayout(bits=2, mode="sym", k=k, n=n, group_size=None, offset=1)
    if mode == "w16" and config.variant.endswith("+postscale"):
        # the XLA path's weight round(t * s) is t * round(s) (t in {-1, 0, 1}): the GEMV sums x * t exactly per step
        # and scales by round(s), the same weights with the float32 roundings of the sum moved
        w_round = weight_rounding(w_dtype)
        s_r = (s2 if w_round is None else s2.astype(w_round)).astype(x.dtype).astype(jnp.float32)
        return im.int_matmul(x, data, s_r, None, layout=layout, config=config, interpret=interpret)
    if mode == "w16":
        return im.int_matmul(x, data, s2, None, layout=layout, config=config, w_dtype=w_dtype, interpret=interpret)
    if config.variant.startswith("dp4a"):
        return _dp4a_gemv(x, data, s2, k=k, n=n, config=config, interpret=interpret)
    if config.variant.endswith("+xq"):  # one launch: the quantization inside, the scales after the K loop
        cfg = config.replace(variant="split-gemv")
        return im.int_gemv_a8(x, data, s2, None, layout=layout, config=cfg, max_abs_weight=1, interpret=interpret)
    q, sx = quantize_activations(x)
    # the int8 activations as float32 times t in {-1, 0, 1}: exact products and sums (|sum| <= 127 K < 2**24), so the
    # "+postscale" form (no per-weight multiply by the unit scale) gives the int32 dot's values
    cfg = config.replace(variant=f"{config.variant}+postscale")
    ones = jnp.ones((1, n), jnp.float32)
    acc = im.int_matmul(q.astype(jnp.float32), data, ones, None, layout=layout, config=cfg, interpret=interpret)
    return (acc * sx[:, None] * s2).astype(x.dtype)


def _dp4a_kernel(*refs, bm: int, bn: int, pk: int, steps: int, units: int, n: int, xq: bool, interpret: bool):
    """``"dp4a-gemv"``: per K step, the ``(pk, BN)`` packed byte tile becomes words of four codes (K rows ``4r..4r+3``
    of a column, :func:`~pallas_kernels._ptx.code_quads`), and each row's int8 activations of those K rows, packed in
    one word, meet them in one ``dp4a`` per word: ``acc += sum_j c_j q_j`` with codes ``c = t + 1``. A second
    ``dp4a`` per activation word against ``0x01010101`` sums the row's ``q``; ``sum_k t q = acc - sum_k q``, exact in
    int32. ``xq``: the activations come as floats ``(Mp, K/4, 4)`` and are quantized per row here; else as the
    pre-pass's int8 codes packed four per int32, transposed ``(K/4, Mp)`` (one pipelined tile per step)."""
    if xq:
        x_ref, w_ref, s_ref, o_ref = refs
    else:
        x_ref, w_ref, o_ref = refs
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    nmask = (n0 + jnp.arange(bn) < n)[None, :] if n % bn else None
    ones = jnp.full((pk, 1), 0x01010101, jnp.int32)
    if xq:
        quantizers = [row_int8_quantizer(x_ref, m0 + mi, pk, steps, interpret) for mi in range(bm)]

    def words(u0):  # each row's int8 activations of the step, four per int32 (byte j = K row 4r + j): (pk, 1) each
        if not xq:  # one (pk, BM) tile of the transposed words, split into its columns in registers
            return split_cols(x_ref[pl.ds(u0, pk), pl.ds(m0, bm)], bm)
        out = []
        for mi in range(bm):
            q = quantizers[mi][1](x_ref[m0 + mi, pl.ds(u0, pk), :].astype(jnp.float32)).astype(jnp.int32) & 0xFF
            cols = split_cols(q, 4)
            out.append(cols[0] | (cols[1] << 8) | (cols[2] << 16) | (cols[3] << 24))
        return out

    def body(t_, carry):
        accs, sums = list(carry[0]), list(carry[1])
        u0 = (sk * steps + t_) * pk
        wmask = and_masks(nmask, (u0 + jnp.arange(pk) < units)[:, None] if units % pk else None)
        quads = code_quads(load(w_ref.at[pl.ds(u0, pk), pl.ds(n0, bn)], wmask).astype(jnp.int32), interpret=interpret)
        for mi, xw in enumerate(words(u0)):
            accs[mi] = dp4a(quads, jnp.broadcast_to(xw, (pk, bn)), accs[mi], interpret=interpret)
            sums[mi] = dp4a(ones, xw, sums[mi], interpret=interpret)
        return tuple(accs), tuple(sums)

    init = (
        tuple(jnp.zeros((pk, bn), jnp.int32) for _ in range(bm)),
        tuple(jnp.zeros((pk, 1), jnp.int32) for _ in range(bm)),
    )
    accs, sums = jax.lax.fori_loop(0, steps, body, init)
    if xq:
        s = load(s_ref.at[pl.ds(0, 1), pl.ds(n0, bn)], nmask)
    for mi in range(bm):
        tot = jnp.sum(accs[mi], axis=0, keepdims=True) - jnp.sum(sums[mi], axis=0, keepdims=True)  # (1, BN) int32
        row = tot.astype(jnp.float32)
        if xq:  # as the reference: the exact int32 sum in float32, times s_x, times s
            row = row * quantizers[mi][0] * s
        if len(o_ref.shape) == 3:
            store(o_ref.at[sk, pl.ds(m0 + mi, 1), pl.ds(n0, bn)], row, nmask)
        else:
            store(o_ref.at[pl.ds(m0 + mi, 1), pl.ds(n0, bn)], row.astype(o_ref.dtype), nmask)


def _dp4a_gemv(x, data, s2, *, k: int, n: int, config: BlockConfig, interpret: bool):
    """W1.58A8 through :func:`_dp4a_kernel` (see the module docstring); ``s2``: ``(1, N)`` float32."""
    if data.shape != (cdiv(k, 4), n) or jnp.dtype(data.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"ternary_matmul: dp4a needs uint8 codes {(cdiv(k, 4), n)}, got {data.dtype} {data.shape}")
    m = x.shape[0]
    bm, pk = config.block_m, config.block_k // 4
    mp = cdiv(m, bm) * bm
    units = cdiv(k, 4)
    nsteps = cdiv(units, pk)
    xq = config.variant.endswith("+xq")
    split = 1 if xq else largest_divisor_at_most(nsteps, config.split_k)
    kp = nsteps * pk * 4
    if xq:
        xin = jnp.pad(x, ((0, mp - m), (0, kp - k))).reshape(mp, kp // 4, 4)
        operands = [xin, data, s2]
    else:
        q, sx = quantize_activations(x)
        qp = jnp.pad(q, ((0, mp - m), (0, kp - k))).reshape(mp, kp // 4, 4)
        operands = [jax.lax.bitcast_convert_type(qp, jnp.int32).T, data]  # (K/4, Mp); byte j of a word: K row 4r + j
    kernel = functools.partial(
        _dp4a_kernel,
        bm=bm,
        bn=config.block_n,
        pk=pk,
        steps=nsteps // split,
        units=units,
        n=n,
        xq=xq,
        interpret=interpret,
    )
    out = split_k_call(
        kernel,
        operands,
        rows=mp,
        n=n,
        split=split,
        out_dtype=x.dtype if xq else jnp.float32,
        config=config,
        interpret=interpret,
        name="ternary_dp4a_gemv",
    )[:m]
    if xq:
        return out
    return (out * sx[:, None] * s2).astype(x.dtype)
