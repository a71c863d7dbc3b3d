"""NF4 (QLoRA / bitsandbytes layout) weight-only matmul: ``y = x @ dequant(W)`` with the lookup fused.

Storage (jaxquant ``NF4Scheme``, bitsandbytes' layout), for a ``(K, N)`` kernel with ``K`` a multiple of the
block size ``B`` (64): the torch-oriented weight ``W.T`` (``N x K``) flattened row-major, two codes per byte,
the even element in the **high** nibble; one float32 absmax per block of ``B`` consecutive values (one block
never spans two output channels because ``B | K``). Viewed as matrices::

    data   (N, K/2) uint8:  data[n, j] = code(W[2j, n]) << 4 | code(W[2j+1, n])
    absmax (N, K/B) float32

With the 16-value table ``T`` (``NF4_CODE``)::

    W[k, n] = T[code(W[k, n])] * absmax[n, k // B]

Double quantization stores ``absmax`` as uint8 codes ``q`` of the signed 8-bit dynamic table ``D`` with one
float32 scale ``a2`` per 256 blocks (flat block index ``b = n * K/B + k // B``) and a float32 ``offset``::

    absmax[b] = D[q[b]] * a2[b // 256] + offset

dequantized inside the kernel too. The float32 weight is rounded to the activation dtype and multiplied with a
float32 accumulator, as the XLA reference does.

Kernel: grid ``(cdiv(M, BM), cdiv(N, BN), split_k)``; per step of ``BK`` (a multiple of ``B``) K rows, for each
block: load the ``(BN, B/2)`` byte tile (contiguous along K), split high/low nibbles, look the values up
(``variant`` ``"lut"``: a pointer gather from the 16-entry table, served by L1; ``"select"``: a 4-level
``where`` tree over scalar constants), scale by the block's absmax, and multiply with the activation columns
``k0 + 2j`` / ``k0 + 2j + 1``: strided loads (``x`` zero-padded to whole blocks), or for ``"*-split"`` one
contiguous ``(BM, B)`` tile split into even / odd columns in registers (no strided load to wait for in each
step: the sm_90 K loop of ``select-split`` has no exposed global load, ``select`` 16 per step), or for
``"*-interleave"`` a contiguous tile after interleaving the two weight halves along K.

``variant="select-gemv"`` (small ``M``, ``block_m <= 8``): no dot; one float32 ``(BN, B/2)`` accumulator per
activation row in registers, ``acc += x_even * W_hi + x_odd * W_lo`` elementwise (the activations broadcast
along N), reduced over K once at the end; ``"select-split-gemv"`` reads each activation row contiguously and
splits it in registers (sm_90: 128-bit loads, 11 exposed loads per step instead of 67 two-byte ones).

``variant="prmt*"`` looks the codes up with byte permutes (inline PTX, :func:`pallas_kernels._ptx.nf4_lookup_asm`):
the float32 table lives in ``prmt`` immediates as four byte planes; one ``prmt`` selects a plane's byte for four
codes at once, so four weights cost 26 instructions (sm_90 K loop of the 16x64x128 dot tile: 745 instructions per
trip vs 1218 for ``select-split``). Exact: the looked-up values are the table's float32 bits. In interpret mode the
same PTX text runs through the emulator of :mod:`pallas_kernels._ptx`; it has not yet run on a GPU, so no table
or heuristic selects it (``benchmarks/gpu_suite.py --tune-variants`` times and checks it).

``variant="prmt16"`` / ``"prmt16-split"`` (bfloat16 / float16 activations): the table rounded to the activation dtype
and looked up two bytes per value (14 instructions per four weights), the dot run on those values, and each
block's absmax applied once to its ``(BM, BN)`` partial product (one ``(BN, blocks)`` absmax load per K step):
``W = round(T[code]) * absmax`` instead of the XLA path's ``round(T[code] * absmax)``, a rounding moved like
int4's ``+postscale`` (within a weight rounding of the XLA path, and of float64). sm_90 K loop of the 16x64x128
tile: 397 instructions per trip vs 745 for ``prmt-split``. Not yet run on a GPU: in the sweep only.

The ``select`` tree tests the four code bits directly in the loaded byte (``p & (1 << (4 + i))`` for the high
nibble, ``p & (1 << i)`` for the low one: no shift or mask to extract the nibble first) and picks among the 16
constants with 8 + 4 + 2 + 1 = 15 selects: about 4 ALU + 4 compare + 15 select = 23 simple instructions per
weight, all in registers, against ``lut``'s one gather load per weight (a dependent, uncoalesced memory access).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    BlockConfig,
    and_masks,
    cdiv,
    compiler_params,
    interleave_cols,
    largest_divisor_at_most,
    load,
    rounded_mul,
    row_slice,
    split_cols,
    split_k_call,
    store,
    weight_rounding,
)
from pallas_kernels._ptx import nf4_lookup

__all__ = [
    "NF4Layout",
    "dequantize_reference",
    "dequantize_supported",
    "nf4_dequantize",
    "nf4_matmul",
    "nf4_matmul_reference",
    "supported",
]

DQ_BLOCK = 256  # blocks per double-quantization scale (bitsandbytes)

#: lookup (``lut``: gather from the table; ``select``: where-tree over constants; ``prmt``: byte permutes of an
#: in-register table, inline PTX from :mod:`pallas_kernels._ptx`) x activation access (strided
#: loads; ``-split``: one contiguous tile split in registers; ``-interleave``: weights rebuilt in K order) x kernel
#: (``-gemv``: no dot, ``block_m <= 8``)
#: ``prmt16``: the table rounded to the activation dtype, looked up by byte permutes, the absmax applied to each
#: block's ``(BM, BN)`` partial product instead of to every weight (dot kernel only)
VARIANTS = (
    *(
        f"{lk}{acc}"
        for lk in ("lut", "select", "prmt")
        for acc in ("", "-split", "-interleave", "-gemv", "-split-gemv")
    ),
    "prmt16",
    "prmt16-split",
)


@dataclasses.dataclass(frozen=True)
class NF4Layout:
    """Static description of NF4 storage: logical ``(K, N)``, absmax block size, double quantization."""

    k: int
    n: int
    block: int = 64
    double_quant: bool = False

    @property
    def blocks_per_col(self) -> int:
        return self.k // self.block


# -------------------------------------------------------------------------------------------------
# XLA reference
# -------------------------------------------------------------------------------------------------
def absmax_reference(layout: NF4Layout, scale, dq_scale=None, dq_offset=None, dyn_code=None) -> jax.Array:
    """Float32 absmax ``(N, K/B)``."""
    if not layout.double_quant:
        return scale.astype(jnp.float32).reshape(layout.n, layout.blocks_per_col)
    nb = layout.n * layout.blocks_per_col
    vals = jnp.asarray(dyn_code, jnp.float32)[scale.astype(jnp.int32)]
    a2 = jnp.repeat(dq_scale.astype(jnp.float32), DQ_BLOCK, total_repeat_length=dq_scale.shape[0] * DQ_BLOCK)[:nb]
    return (vals * a2 + dq_offset).reshape(layout.n, layout.blocks_per_col)


@functools.partial(jax.jit, static_argnames=("layout",))
def dequantize_reference(
    data, scale, layout: NF4Layout, code, dq_scale=None, dq_offset=None, dyn_code=None
) -> jax.Array:
    """Float32 ``(K, N)`` weight (plain XLA)."""
    d = data.reshape(layout.n, layout.k // 2).astype(jnp.int32)
    codes = jnp.stack([d >> 4, d & 15], axis=-1).reshape(layout.n, layout.k)
    vals = jnp.asarray(code, jnp.float32)[codes]
    a = absmax_reference(layout, scale, dq_scale, dq_offset, dyn_code)
    w_t = (vals.reshape(layout.n, layout.blocks_per_col, layout.block) * a[:, :, None]).reshape(layout.n, layout.k)
    return w_t.T


@functools.partial(jax.jit, static_argnames=("layout",))
def nf4_matmul_reference(x, data, scale, layout: NF4Layout, code, dq_scale=None, dq_offset=None, dyn_code=None):
    """XLA path: dequantize to ``x.dtype``, then ``jnp.dot`` with float32 accumulation."""
    w = dequantize_reference(data, scale, layout, code, dq_scale, dq_offset, dyn_code).astype(x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


# -------------------------------------------------------------------------------------------------
# Pallas kernel
# -------------------------------------------------------------------------------------------------
def supported(layout: NF4Layout, cfg: BlockConfig, x_dtype) -> str | None:
    """``None`` when the kernel handles this case, else why not (callers fall back to XLA)."""
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"activation dtype {jnp.dtype(x_dtype).name}"
    if layout.block < 32 or layout.block & (layout.block - 1):
        return f"block size {layout.block} (need a power of two >= 32)"
    if layout.k % layout.block:
        return f"K={layout.k} not a multiple of the block size {layout.block} (blocks would span two columns)"
    if (cfg.variant or "lut") not in VARIANTS:
        return f"variant {cfg.variant!r} (NF4 kernels: {', '.join(VARIANTS)})"
    if cfg.variant.startswith("prmt16") and jnp.dtype(x_dtype) == jnp.dtype(jnp.float32):
        return "variant 'prmt16*' looks the table up in the activation dtype: bfloat16 or float16 only"
    if cfg.variant.endswith("gemv"):
        if cfg.block_m > 8 or cfg.block_n < 16:
            return "gemv needs block_m <= 8 and block_n >= 16"
        return None
    if cfg.block_m < 16 or cfg.block_n < 16:
        return "block_m and block_n must be >= 16"
    return None


def _select_lut(c, code_vals: tuple[float, ...], shift: int = 0):
    """``T[(c >> shift) & 15]`` for int ``c`` by a 4-level tree of ``where`` over scalar constants (the code
    bits are tested in place: ``shift=4`` reads the high nibble of a byte without extracting it)."""
    b0 = (c & (1 << shift)) != 0
    b1 = (c & (2 << shift)) != 0
    b2 = (c & (4 << shift)) != 0
    b3 = (c & (8 << shift)) != 0
    lvl = [jnp.where(b0, np.float32(code_vals[2 * i + 1]), np.float32(code_vals[2 * i])) for i in range(8)]
    lvl = [jnp.where(b1, lvl[2 * i + 1], lvl[2 * i]) for i in range(4)]
    lvl = [jnp.where(b2, lvl[2 * i + 1], lvl[2 * i]) for i in range(2)]
    return jnp.where(b3, lvl[1], lvl[0])


def _lookup(p8, high: bool, kind: str, code_vals, code_ref, interpret: bool, dtype=jnp.float32):
    """``T[code]`` of the high or low nibble of each byte of the uint8 tile ``p8``, by ``kind``: ``"lut"`` (gather
    from ``code_ref``), ``"select"`` (:func:`_select_lut`) or ``"prmt"`` (byte permutes, inline PTX): float32;
    ``"prmt16"``: the table rounded to ``dtype`` (bfloat16 / float16), looked up by byte permutes."""
    if kind == "prmt":  # four codes per instruction from a table held in immediates (exact float32 values)
        return nf4_lookup(p8, code_vals, high, interpret=interpret)
    if kind == "prmt16":
        return nf4_lookup(p8, code_vals, high, interpret=interpret, dtype=dtype)
    p = p8.astype(jnp.int32)
    if kind == "select":
        return _select_lut(p, code_vals, 4 if high else 0)
    return code_ref[p >> 4] if high else code_ref[p & 15]


def _block_absmax(s_ref, dq_refs, layout: NF4Layout, n0, bn: int, blk_idx, nmask):
    """Float32 ``(BN, 1)`` absmax of block column ``blk_idx`` for the output channels ``n0 .. n0 + BN``; with double
    quantization ``D[q] * a2[b // 256] + offset`` (``dq_refs`` = the table ``D``, ``a2``, ``offset``)."""
    if not layout.double_quant:
        return load(s_ref.at[pl.ds(n0, bn), pl.ds(blk_idx, 1)], nmask)
    dyn_ref, a2_ref, off_ref = dq_refs
    qa = load(s_ref.at[pl.ds(n0, bn), pl.ds(blk_idx, 1)], nmask).astype(jnp.int32)
    flat = (n0 + jnp.arange(bn))[:, None] * layout.blocks_per_col + blk_idx
    if nmask is not None:
        flat = jnp.where(nmask, flat, 0)
    # rounded on its own before the offset is added, as the XLA path does (jaxquant.core.numerics.rounded_product)
    return rounded_mul(dyn_ref[qa], a2_ref[flat // DQ_BLOCK]) + off_ref[0]


def _double_quant_operands(layout: NF4Layout, dq_scale, dq_offset, dyn_code, fn: str) -> list:
    """The kernels' extra operands for double quantization (the table ``D``, ``a2``, ``offset``; none without)."""
    if not layout.double_quant:
        return []
    if dq_scale is None or dq_offset is None or dyn_code is None:
        raise ValueError(f"{fn}: double_quant needs dq_scale, dq_offset and dyn_code")
    return [
        jnp.asarray(dyn_code, jnp.float32),
        dq_scale.astype(jnp.float32),
        jnp.asarray(dq_offset, jnp.float32).reshape(1),
    ]


def _kernel(
    *refs, layout: NF4Layout, m: int, bm: int, bn: int, bk: int, steps: int, variant: str, code_vals, w_round, interpret
):
    x_ref, w_ref, s_ref, code_ref, *dq_refs, o_ref = refs
    n, blk = layout.n, layout.block
    half = blk // 2
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    nmask = (n0 + jnp.arange(bn) < n)[:, None] if n % bn else None
    mmask = (m0 + jnp.arange(bm) < m)[:, None] if m % bm else None
    interleave = variant.endswith("interleave")
    gemv = variant.endswith("gemv")
    split = "-split" in variant
    postscale = variant.startswith("prmt16")  # absmax applied to each block's partial sums (not per weight)
    cdtype = x_ref.dtype

    lookup_kind = variant.split("-")[0]

    def lookup(p8, high: bool):  # float32, or (prmt16) the activation dtype
        return _lookup(p8, high, lookup_kind, code_vals, code_ref, interpret, cdtype)

    def x_halves(k0):  # the block's even / odd activation columns, (BM, B/2) each
        if split:  # one contiguous (BM, B) tile, split into even / odd columns in registers
            return split_cols(load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, blk)], mmask), 2)
        return x_ref[pl.ds(m0, bm), row_slice(k0, half, 2)], x_ref[pl.ds(m0, bm), row_slice(k0 + 1, half, 2)]

    def body(t, acc):
        kb = sk * steps + t
        a_step = None
        if postscale and not layout.double_quant and bk // blk > 1:  # one (BN, blocks) load per step
            nb = bk // blk
            a_step = split_cols(load(s_ref.at[pl.ds(n0, bn), pl.ds(kb * nb, nb)], nmask), nb)
        for sb in range(bk // blk):
            blk_idx = kb * (bk // blk) + sb  # block column
            k0 = blk_idx * blk
            p = load(w_ref.at[pl.ds(n0, bn), pl.ds(blk_idx * half, half)], nmask)  # uint8
            dims = (((1,), (1,)), ((), ()))
            if postscale:  # table values in the activation dtype; the block's absmax scales the (BM, BN) partial
                if a_step is not None:  # this block's column of the step's (BN, blocks) absmax tile
                    a_row = a_step[sb].reshape(1, bn)
                else:
                    a_row = _block_absmax(s_ref, dq_refs, layout, n0, bn, blk_idx, nmask).reshape(1, bn)
                xe, xo = x_halves(k0)
                part = jax.lax.dot_general(xe, lookup(p, True), dims, preferred_element_type=jnp.float32)
                part = part + jax.lax.dot_general(xo, lookup(p, False), dims, preferred_element_type=jnp.float32)
                acc = acc + part * a_row
                continue
            a = _block_absmax(s_ref, dq_refs, layout, n0, bn, blk_idx, nmask)
            hi = lookup(p, True) * a  # rows k0 + 2j
            lo = lookup(p, False) * a  # rows k0 + 2j + 1
            if w_round is not None:
                hi, lo = hi.astype(w_round), lo.astype(w_round)
            hi, lo = hi.astype(cdtype), lo.astype(cdtype)
            if gemv:  # acc: one (BN, B/2) float32 accumulator per activation row
                hf, lf = hi.astype(jnp.float32), lo.astype(jnp.float32)
                accs = []
                for mi in range(bm):
                    if split:  # one contiguous (1, B) row, split into even / odd columns in registers
                        xe, xo = split_cols(x_ref[pl.ds(m0 + mi, 1), pl.ds(k0, blk)].astype(jnp.float32), 2)
                    else:
                        xe = x_ref[pl.ds(m0 + mi, 1), row_slice(k0, half, 2)].astype(jnp.float32)
                        xo = x_ref[pl.ds(m0 + mi, 1), row_slice(k0 + 1, half, 2)].astype(jnp.float32)
                    accs.append(acc[mi] + xe * hf + xo * lf)
                acc = tuple(accs)
            elif interleave:
                w_t = interleave_cols([hi, lo])  # (BN, B): W.T tile in K order
                xt = load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, blk)], mmask)
                acc = acc + jax.lax.dot_general(xt, w_t, dims, preferred_element_type=jnp.float32)
            else:
                xe, xo = x_halves(k0)
                acc = acc + jax.lax.dot_general(xe, hi, dims, preferred_element_type=jnp.float32)
                acc = acc + jax.lax.dot_general(xo, lo, dims, preferred_element_type=jnp.float32)
        return acc

    if gemv:
        accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn, half), jnp.float32) for _ in range(bm)))
        rmask = nmask.T if nmask is not None else None  # (1, BN)
        for mi in range(bm):  # x (and the output) are padded to whole BM blocks: no row mask
            row = jnp.sum(accs[mi], axis=1).reshape(1, bn)
            if len(o_ref.shape) == 3:
                store(o_ref.at[sk, pl.ds(m0 + mi, 1), pl.ds(n0, bn)], row, rmask)
            else:
                store(o_ref.at[pl.ds(m0 + mi, 1), pl.ds(n0, bn)], row.astype(o_ref.dtype), rmask)
        return
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    omask = and_masks(mmask, nmask.T if nmask is not None else None)
    if len(o_ref.shape) == 3:
        store(o_ref.at[sk, pl.ds(m0, bm), pl.ds(n0, bn)], acc, omask)
    else:
        store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), omask)


@functools.partial(jax.jit, static_argnames=("layout", "config", "interpret", "code_vals", "w_dtype"))
def nf4_matmul(
    x: jax.Array,
    data: jax.Array,
    scale: jax.Array,
    code: jax.Array,
    dq_scale: jax.Array | None = None,
    dq_offset: jax.Array | None = None,
    dyn_code: jax.Array | None = None,
    *,
    layout: NF4Layout,
    config: BlockConfig,
    code_vals: tuple[float, ...] | None = None,
    w_dtype: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x @ dequant_nf4(W)`` for ``x (M, K)`` in one Pallas (Triton) kernel.

    Args:
      x: activations ``(M, K)``.
      data: packed codes, ``(N*K/2,)`` or ``(N, K/2)`` uint8 (bitsandbytes order, see module docstring).
      scale: float32 absmax ``(N*K/B,)``, or uint8 codes when ``layout.double_quant``.
      code: the 16 NF4 values (float32); ``code_vals`` the same as a tuple of floats (static), needed by
        ``variant="select*"``.
      dq_scale, dq_offset, dyn_code: double quantization: float32 scale per 256 blocks, float32 offset, and the
        256-value dynamic table.
      layout, config, interpret: as for :func:`pallas_kernels.int4_matmul.int_matmul`; ``config.variant`` is
        one of :data:`VARIANTS` (``"lut"``, ``"select"``, ``"select-split"``, ``"select-gemv"``, ...).
      w_dtype: dtype the XLA path rounds the float32 dequantized weight to first (``None``/float32: none).
    """
    k, n, blk = layout.k, layout.n, layout.block
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"nf4_matmul: x must be (M, {k}), got {x.shape}")
    why = supported(layout, config, x.dtype)
    if why:
        raise ValueError(f"nf4_matmul: unsupported: {why}")
    if data.size != n * k // 2:
        raise ValueError(f"nf4_matmul: data must hold {n * k // 2} bytes, got {data.size}")
    variant = config.variant or "lut"
    if variant.startswith(("select", "prmt")) and code_vals is None:  # prmt16 too
        raise ValueError(f"nf4_matmul: variant {variant!r} needs code_vals")
    if variant.startswith("prmt") and jnp.dtype(data.dtype).itemsize != 1:
        raise ValueError(f"nf4_matmul: variant {variant!r} needs byte codes (uint8), got {data.dtype}")
    data = data.reshape(n, k // 2)
    scale = scale.reshape(n, layout.blocks_per_col)
    m = x.shape[0]
    bm, bn = config.block_m, config.block_n
    bk = max(blk, min(config.block_k, blk * largest_divisor_at_most(layout.blocks_per_col, config.block_k // blk)))
    while layout.blocks_per_col % (bk // blk):
        bk //= 2
    nsteps = k // bk
    split = largest_divisor_at_most(nsteps, config.split_k)
    steps = nsteps // split
    if m % bm and ("-gemv" in variant or not ("-interleave" in variant or "-split" in variant)):  # unmasked rows
        x = jnp.pad(x, ((0, cdiv(m, bm) * bm - m), (0, 0)))
    operands = [x, data, scale, jnp.asarray(code, jnp.float32)]
    operands += _double_quant_operands(layout, dq_scale, dq_offset, dyn_code, "nf4_matmul")
    kernel = functools.partial(
        _kernel,
        layout=layout,
        m=m,
        bm=bm,
        bn=bn,
        bk=bk,
        steps=steps,
        variant=variant,
        code_vals=code_vals,
        w_round=weight_rounding(w_dtype),
        interpret=interpret,
    )
    out = split_k_call(
        kernel,
        operands,
        rows=cdiv(m, bm) * bm if variant.endswith("gemv") else m,  # gemv writes whole (padded) row blocks
        n=n,
        split=split,
        out_dtype=x.dtype,
        config=config,
        interpret=interpret,
        name="nf4_gemv" if variant.endswith("gemv") else "nf4_matmul",
    )
    return out[:m]


# -------------------------------------------------------------------------------------------------
# dequantization kernel (large M: dequantize once, then XLA's dense matmul)
# -------------------------------------------------------------------------------------------------
def _dequant_kernel(
    w_ref, s_ref, code_ref, *refs, layout: NF4Layout, bn: int, bk: int, lookup, code_vals, w_round, interpret
):
    *dq_refs, o_ref = refs
    half = layout.block // 2
    j, kb = pl.program_id(0), pl.program_id(1)
    n0 = j * bn
    for sb in range(bk // layout.block):
        blk_idx = kb * (bk // layout.block) + sb
        k0 = blk_idx * layout.block
        p = w_ref[pl.ds(n0, bn), pl.ds(blk_idx * half, half)]  # (BN, B/2) uint8: W.T rows, K along the row
        a = _block_absmax(s_ref, dq_refs, layout, n0, bn, blk_idx, None)
        for r, high in ((0, True), (1, False)):  # even K rows in the high nibbles, odd ones in the low
            t = _lookup(p, high, lookup, code_vals, code_ref, interpret) * a
            if w_round is not None:
                t = t.astype(w_round)
            o_ref[pl.ds(k0 + r, half, stride=2), pl.ds(n0, bn)] = t.astype(o_ref.dtype).T


def dequantize_supported(layout: NF4Layout, block_k: int = 128, block_n: int = 128) -> str | None:
    """``None`` when :func:`nf4_dequantize` handles this layout with these blocks, else why not."""
    if layout.block < 32 or layout.block & (layout.block - 1):
        return f"block size {layout.block} (need a power of two >= 32)"
    bk = max(block_k, layout.block)
    if layout.k % bk or layout.n % block_n:
        return f"(K, N) = ({layout.k}, {layout.n}) not a multiple of the ({bk}, {block_n}) tile (no masked tiles)"
    return None


@functools.partial(
    jax.jit,
    static_argnames=("layout", "out_dtype", "w_dtype", "code_vals", "lookup", "block_k", "block_n", "interpret"),
)
def nf4_dequantize(
    data: jax.Array,
    scale: jax.Array,
    code: jax.Array,
    dq_scale: jax.Array | None = None,
    dq_offset: jax.Array | None = None,
    dyn_code: jax.Array | None = None,
    *,
    layout: NF4Layout,
    out_dtype,
    code_vals: tuple[float, ...],
    w_dtype: str | None = None,
    lookup: str = "select",
    block_k: int = 128,
    block_n: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """The ``(K, N)`` weight in ``out_dtype``, bit-identical to :func:`dequantize_reference` rounded to ``w_dtype``
    (if given) and then to ``out_dtype`` (the XLA path's weights), in one memory-bound Pallas kernel.

    For large ``M`` (QLoRA training, prefill), where a fused kernel loses to the dense tensor-core GEMM,
    ``jnp.dot(x, nf4_dequantize(...))`` is the XLA path with a faster dequantization: the same weights, the same
    dot, the same result. Grid ``(N / BN, K / BK)``: per NF4 block of ``B`` K rows each program loads the
    ``(BN, B/2)`` byte tile (``W.T`` rows), looks both nibbles up (``lookup``: ``"select"``, ``"lut"`` or
    ``"prmt"``, as in :func:`nf4_matmul`; in interpret mode ``"prmt"``'s PTX runs through its emulator), scales by
    the block's absmax (double quantization dequantized in the kernel), and stores the transposed ``(B/2, BN)``
    halves to the even and odd rows ``k0 + 2j`` / ``k0 + 2j + 1``.

    Raises ``ValueError`` for shapes :func:`dequantize_supported` rejects (callers use the XLA dequantization).
    """
    why = dequantize_supported(layout, block_k, block_n)
    if why:
        raise ValueError(f"nf4_dequantize: unsupported: {why}")
    if lookup not in ("lut", "select", "prmt"):
        raise ValueError(f"nf4_dequantize: lookup must be 'lut', 'select' or 'prmt', got {lookup!r}")
    if data.size != layout.n * layout.k // 2:
        raise ValueError(f"nf4_dequantize: data must hold {layout.n * layout.k // 2} bytes, got {data.size}")
    if lookup == "prmt" and jnp.dtype(data.dtype).itemsize != 1:
        raise ValueError(f"nf4_dequantize: lookup 'prmt' needs byte codes (uint8), got {data.dtype}")
    if len(code_vals) != 16:
        raise ValueError(f"nf4_dequantize: code_vals must hold the 16 table values, got {len(code_vals)}")
    operands = [data.reshape(layout.n, layout.k // 2), scale.reshape(layout.n, layout.blocks_per_col)]
    operands.append(jnp.asarray(code, jnp.float32))
    operands += _double_quant_operands(layout, dq_scale, dq_offset, dyn_code, "nf4_dequantize")
    bk = max(block_k, layout.block)
    kernel = functools.partial(
        _dequant_kernel,
        layout=layout,
        bn=block_n,
        bk=bk,
        lookup=lookup,
        code_vals=code_vals,
        w_round=weight_rounding(w_dtype),
        interpret=interpret,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((layout.k, layout.n), jnp.dtype(out_dtype)),
        grid=(layout.n // block_n, layout.k // bk),
        compiler_params=compiler_params(BlockConfig(num_warps=4, num_stages=1)),
        interpret=interpret,
        name="nf4_dequantize",
    )(*operands)
