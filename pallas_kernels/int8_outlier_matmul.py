"""LLM.int8() matmul (Dettmers et al. 2022): int8 x int8 -> int32 for the regular feature dims plus a float
product over the outlier dims, fused into one output with the scale epilogue.

Inputs (jaxquant ``LLMInt8Scheme`` without stored float outlier rows), for activations ``x (M, K)`` and a
``(K, N)`` weight ``W_q`` (int8, stored ``(K, N)`` or K-major ``(N, K)``: ``w_layout``) with per-column scales
``s_w (N,)``:

* the outlier dims ``O = {k : max_m |x[m, k]| > threshold}``, compacted: ``idx`` (int32, the first ``count``
  entries are the members of ``O`` in increasing order) and ``count`` (int32, shape ``(1,)``);
* the regular part ``x_r = x`` with the columns in ``O`` zeroed, quantized per row:
  ``s_x[m] = max_k |x_r[m, k]| / 127``, ``x_q = round(x_r / s_x)`` (int8, from :func:`quantize_activations` or
  the scheme's own quantizer).

The kernel computes, per output tile::

    acc_i[m, n] = sum_k x_q[m, k] W_q[k, n]                          (int8 dot, exact int32 accumulation)
    acc_o[m, n] = sum_{k in O} float32(x[m, k]) * (W_q[k, n] * s_w[n])  (float32 operands, tf32 on a GPU)
    y[m, n]     = acc_i[m, n] * s_x[m] * s_w[n] + acc_o[m, n]

which is the scheme's XLA path with the dense masked float matmul replaced by a loop over the ``count``
outlier rows only (gathered by pointer from ``x`` and ``W_q``): grid ``(cdiv(M, BM), cdiv(N, BN), split_k)``, a K
loop in steps of ``BK`` for the int8 part, then (in split 0) ``cdiv(count, 16)`` steps of 16 gathered outlier
dims. The activation split itself is an XLA pre-pass (``jaxquant.ops``), or for ``M <= PREPASS_MAX_M`` one Pallas
program (:func:`prepass`, bit-identical; used where a tuning row has ``variant="prepass"``). With
``config.split_k > 1`` each split's ``acc_i * s_x * s_w`` is written as a float32 partial sum that XLA
adds (the exact int32 sum becomes a sum of ``split_k`` float32 terms: a float32 rounding, far below the output's):
at small ``M`` a ``(1, N / BN)`` grid leaves most SMs idle (128 programs for N=8192 on a 132-SM H100, which
measured 0.75x of bf16 at M=1; split-K is not yet measured on a GPU).
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
    compiler_params,
    divide_rn,
    largest_divisor_at_most,
    load,
    split_k_call,
    store,
)
from pallas_kernels._ptx import div_rn, quantize_int8

__all__ = [
    "PREPASS_MAX_M",
    "int8_outlier_matmul",
    "int8_outlier_matmul_reference",
    "outlier_indices",
    "prepass",
    "quantize_activations",
    "supported",
]

OUTLIER_CHUNK = 16


# -------------------------------------------------------------------------------------------------
# activation side (XLA) and reference
# -------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("threshold", "per_row"))
def quantize_activations(x: jax.Array, threshold: float | None, per_row: bool = True):
    """The LLM.int8 activation split: ``(x_q int8, s_x float32 (M,), is_outlier bool (K,))``.

    Both divisions correctly rounded (:func:`~pallas_kernels._common.divide_rn`), as the scheme's XLA path and the
    one-launch :func:`prepass` divide.
    """
    x2 = x.astype(jnp.float32)
    if threshold is None:
        is_out = jnp.zeros((x2.shape[1],), bool)
    else:
        is_out = jnp.max(jnp.abs(x2), axis=0) > threshold
    x_r = jnp.where(is_out[None, :], 0.0, x2)
    amax = jnp.max(jnp.abs(x_r), axis=1 if per_row else None, keepdims=True)
    s = jnp.where(amax > 0, divide_rn(amax, jnp.float32(127.0)), 1.0)
    xq = jnp.clip(jnp.round(divide_rn(x_r, s)), -127, 127).astype(jnp.int8)
    return xq, jnp.broadcast_to(s.reshape(-1), (x2.shape[0],)), is_out


def outlier_indices(is_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Compact a boolean ``(K,)`` outlier mask: ``(idx int32 (K,), count int32 (1,))``; unused entries are 0."""
    k = is_out.shape[0]
    idx = jnp.nonzero(is_out, size=k, fill_value=0)[0].astype(jnp.int32)
    return idx, jnp.sum(is_out, dtype=jnp.int32).reshape(1)


#: largest ``M`` for :func:`prepass` (one program reads all rows of ``x`` twice)
PREPASS_MAX_M = 16


def _prepass_kernel(x_ref, xq_ref, sx_ref, idx_ref, cnt_ref, *, m, k, mp, bk, threshold, per_row, interpret):
    nk = cdiv(k, bk)
    rmask = (jnp.arange(mp) < m)[:, None] if m != mp else None

    def chunk(c):  # chunk c's (MP, BK) view and the mask of its real rows and columns
        kmask = (c * bk + jnp.arange(bk) < k)[None, :] if k % bk else None
        return (pl.ds(0, mp), pl.ds(c * bk, bk)), and_masks(rmask, kmask)

    def regular(c):
        """The chunk's regular part ``x_r`` (float32, outlier columns zeroed as the XLA path does) and mask."""
        idx, mask = chunk(c)
        xt = load(x_ref.at[idx], mask).astype(jnp.float32)
        if threshold is None:
            return xt, None
        is_out = jnp.max(jnp.abs(xt), axis=0, keepdims=True) > threshold  # (1, BK); padding (0) never is
        return xt - jnp.where(is_out, xt, 0.0), is_out

    def scan(c, carry):  # row maxima of x_r, and the outlier dims compacted in increasing order
        amax, count = carry
        x_r, is_out = regular(c)
        amax = jnp.maximum(amax, jnp.max(jnp.abs(x_r), axis=1, keepdims=True))
        if is_out is not None:
            flags = is_out.astype(jnp.int32)
            lane = jnp.arange(bk)[None, :]
            # outlier j of the chunk goes to count + (its rank); the others to distinct slots past K (never read)
            pos = jnp.where(is_out, count + jnp.cumsum(flags, axis=1) - 1, k + lane)
            idx_ref[pos] = c * bk + lane
            count = count + jnp.sum(flags)
        return amax, count

    amax, count = jax.lax.fori_loop(0, nk, scan, (jnp.zeros((mp, 1), jnp.float32), jnp.int32(0)))
    if not per_row:
        amax = jnp.broadcast_to(jnp.max(amax, axis=0, keepdims=True), (mp, 1))
    sx = jnp.where(amax != 0, div_rn(amax, jnp.full((mp, 1), 127.0, jnp.float32), interpret=interpret), 1.0)
    store(sx_ref.at[pl.ds(0, mp), pl.ds(0, 1)], sx, rmask)
    cnt_ref[...] = jnp.full((1,), count, jnp.int32)

    def quantize(c, carry):
        x_r, _ = regular(c)
        idx, mask = chunk(c)
        store(xq_ref.at[idx], quantize_int8(x_r, sx, interpret=interpret), mask)
        return carry

    jax.lax.fori_loop(0, nk, quantize, 0)


@functools.partial(jax.jit, static_argnames=("threshold", "per_row", "block_k", "interpret"))
def prepass(
    x: jax.Array, threshold: float | None, per_row: bool = True, *, block_k: int = 512, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The LLM.int8 activation split of ``jaxquant.schemes.llm_int8`` (the XLA path's ``x_r``, ``_absmax_int8`` and
    :func:`outlier_indices`) in one Pallas program instead of a chain of XLA launches, for ``M <= PREPASS_MAX_M``.

    Returns ``(x_q int8 (M, K), s_x float32 (M,), idx int32 (K + block_k,), count int32 (1,))``, bit-identical to
    the XLA path's ``x_q`` and ``s_x`` (row or tensor maxima are exact; both divisions correctly rounded and the
    rounding ties-to-even by inline PTX, :func:`pallas_kernels._ptx.div_rn` / :func:`~pallas_kernels._ptx.rint`)
    and to :func:`outlier_indices` on ``idx[:count]`` (entries from ``count`` on are unspecified; the matmul kernel
    reads only the first ``count``). One program: a first pass over K finds the outlier dims of each chunk (column
    maxima over the ``M`` rows), compacts them by a running prefix sum and takes the row maxima of ``x_r``; a second
    pass quantizes. Raises ``ValueError`` for ``M > PREPASS_MAX_M``, a non-2-D ``x`` or a threshold that is not
    positive.
    """
    if x.ndim != 2:
        raise ValueError(f"prepass: x must be (M, K), got {x.shape}")
    m, k = x.shape
    if not 1 <= m <= PREPASS_MAX_M:
        raise ValueError(f"prepass: M={m} outside 1..{PREPASS_MAX_M} (one program reads every row)")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"prepass: block_k must be a power of two >= 16, got {block_k}")
    if threshold is not None and not threshold > 0:  # padding (zeros) must never count as an outlier
        raise ValueError(f"prepass: threshold must be positive or None, got {threshold!r}")
    mp = 1 << (m - 1).bit_length()
    kernel = functools.partial(
        _prepass_kernel, m=m, k=k, mp=mp, bk=block_k, threshold=threshold, per_row=per_row, interpret=interpret
    )
    xq, sx, idx, count = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((m, k), jnp.int8),
            jax.ShapeDtypeStruct((m, 1), jnp.float32),
            jax.ShapeDtypeStruct((k + block_k,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        ),
        grid=(1,),
        compiler_params=compiler_params(BlockConfig(num_warps=8, num_stages=1)),
        interpret=interpret,
        name="llm_int8_prepass",
    )(x)
    return xq, sx.reshape(m), idx, count


@functools.partial(jax.jit, static_argnames=("w_layout",))
def int8_outlier_matmul_reference(x, xq, sx, is_out, wq, sw, w_layout: str = "kn") -> jax.Array:
    """XLA reference: the int8 product plus a dense masked float product over the outlier dims (``wq`` ``(K, N)``, or
    ``(N, K)`` with ``w_layout="nk"``)."""
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"int8_outlier_matmul_reference: w_layout must be 'kn' or 'nk', got {w_layout!r}")
    wq = wq.T if w_layout == "nk" else wq
    acc = jnp.dot(xq, wq, preferred_element_type=jnp.int32)
    x_o = jnp.where(is_out[None, :], x.astype(jnp.float32), 0.0)
    y_o = jnp.dot(x_o, wq.astype(jnp.float32) * sw, preferred_element_type=jnp.float32)
    return (acc.astype(jnp.float32) * sx[:, None] * sw[None, :] + y_o).astype(x.dtype)


# -------------------------------------------------------------------------------------------------
# Pallas kernel
# -------------------------------------------------------------------------------------------------
#: ``""``: the int8 dot reads ``(BK, BN)`` tiles of the ``(K, N)`` weight; ``"kmajor"`` (large ``M``): of a ``(N, K)``
#: copy made by XLA per call (none when the weight is stored ``(N, K)``: ``w_layout="nk"`` makes every variant read
#: K-major tiles), the K-major layout Hopper's 8-bit ``wgmma`` reads from shared memory (the ``(K, N)``
#: tile is otherwise transposed byte by byte through shared memory in every K step: 64 ``STS`` per trip of the
#: 128x256x64 tile on sm_90, compiled on the CPU); ``"prepass"`` (``M <= PREPASS_MAX_M``): the kernel of ``""``, fed by
#: :func:`prepass` (one Pallas launch for the activation split) instead of the XLA pre-pass (``jaxquant.ops``)
VARIANTS = ("", "kmajor", "prepass")


def supported(k: int, n: int, cfg: BlockConfig) -> str | None:
    """``None`` when the kernel handles this case with ``cfg``, else why not (callers take the XLA path)."""
    if cfg.variant not in VARIANTS:
        return f"variant {cfg.variant!r} (LLM.int8 kernel: {', '.join(repr(v) for v in VARIANTS)})"
    if cfg.block_m < 16 or cfg.block_n < 16 or cfg.block_k < 32:
        return "block_m, block_n >= 16 and block_k >= 32 needed (int8 mma)"
    return None


def _kernel(
    x_ref, xq_ref, sx_ref, idx_ref, cnt_ref, wq_ref, sw_ref, *refs, m, k, n, bm, bn, bk, steps, outliers, kmajor, w_nk
):
    # kmajor: the int8 dot reads (BN, BK) tiles of an (N, K) array: a copy passed after sw (variant "kmajor" over
    # (K, N) storage), else wq itself when it is stored (N, K) (w_nk)
    o_ref = refs[-1]
    wt_ref = refs[0] if len(refs) == 2 else (wq_ref if kmajor else None)
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    mvec = m0 + jnp.arange(bm)
    mmask = (mvec < m)[:, None] if m % bm else None
    nmask = (n0 + jnp.arange(bn) < n)[None, :] if n % bn else None
    k_ragged = k % bk != 0

    def body(t, acc):
        k0 = (sk * steps + t) * bk
        kmask = (k0 + jnp.arange(bk) < k) if k_ragged else None
        xq = load(xq_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], and_masks(mmask, None if kmask is None else kmask[None]))
        if kmajor:  # (BN, BK) tile of the (N, K) copy; the dot contracts its K axis (a shared-memory view)
            kk = None if kmask is None else kmask[None]
            wt = load(wt_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], and_masks(None if nmask is None else nmask.T, kk))
            dims = (((1,), (1,)), ((), ()))
            return acc + jax.lax.dot_general(xq, wt, dims, preferred_element_type=jnp.int32)
        wq = load(wq_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], and_masks(nmask, None if kmask is None else kmask[:, None]))
        return acc + jnp.dot(xq, wq, preferred_element_type=jnp.int32)

    acc_i = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.int32))
    sw = load(sw_ref.at[pl.ds(n0, bn)], None if nmask is None else nmask[0]).astype(jnp.float32)
    sx = load(sx_ref.at[pl.ds(m0, bm)], None if mmask is None else mmask[:, 0]).astype(jnp.float32)
    y = acc_i.astype(jnp.float32) * sx[:, None] * sw[None, :]
    if outliers:
        count = cnt_ref[0]
        rows_safe = jnp.where(mvec < m, mvec, 0) if m % bm else mvec

        def obody(c, acc):
            pos = c * OUTLIER_CHUNK + jnp.arange(OUTLIER_CHUNK)
            valid = pos < count
            kidx = idx_ref[pl.ds(c * OUTLIER_CHUNK, OUTLIER_CHUNK)]
            kidx = jnp.where(valid, kidx, 0)
            xo = x_ref[rows_safe[:, None], kidx[None, :]].astype(jnp.float32)  # (BM, 16) gathered columns
            xo = jnp.where(valid[None, :], xo, 0.0)
            if w_nk:  # the (BN, 16) columns of the (N, K) weight at the outlier dims (a gather along K)
                cols = n0 + jnp.arange(bn)
                cols = jnp.where(cols < n, cols, 0) if nmask is not None else cols
                wo = wq_ref[cols[:, None], kidx[None, :]].astype(jnp.float32) * sw[:, None]
                dims = (((1,), (1,)), ((), ()))
                return acc + jax.lax.dot_general(xo, wo, dims, preferred_element_type=jnp.float32)
            if nmask is not None:
                cols = jnp.where(n0 + jnp.arange(bn) < n, n0 + jnp.arange(bn), 0)
                wo = wq_ref[kidx[:, None], cols[None, :]]
            else:
                wo = wq_ref[kidx, pl.ds(n0, bn)]
            wo = wo.astype(jnp.float32) * sw[None, :]
            return acc + jnp.dot(xo, wo, preferred_element_type=jnp.float32)

        nchunks = jnp.where(sk == 0, (count + OUTLIER_CHUNK - 1) // OUTLIER_CHUNK, 0)  # split 0 only
        y = y + jax.lax.fori_loop(0, nchunks, obody, jnp.zeros((bm, bn), jnp.float32))
    omask = and_masks(mmask, nmask)
    if len(o_ref.shape) == 3:  # split-K partial sums
        store(o_ref.at[sk, pl.ds(m0, bm), pl.ds(n0, bn)], y, omask)
    else:
        store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype), omask)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "outliers", "w_layout"))
def int8_outlier_matmul(
    x: jax.Array,
    xq: jax.Array,
    sx: jax.Array,
    idx: jax.Array,
    count: jax.Array,
    wq: jax.Array,
    sw: jax.Array,
    *,
    config: BlockConfig,
    outliers: bool = True,
    w_layout: str = "kn",
    interpret: bool = False,
) -> jax.Array:
    """The fused LLM.int8 matmul (see module docstring); returns ``(M, N)`` in ``x.dtype``.

    Args:
      x: original activations ``(M, K)`` (outlier columns are read from here).
      xq, sx: int8 regular part ``(M, K)`` and its per-row float32 scales ``(M,)``.
      idx, count: compacted outlier dims (:func:`outlier_indices`).
      wq, sw: int8 weight and float32 per-column scales ``(N,)``.
      outliers: ``False`` skips the float part (``threshold=None``).
      w_layout: ``"kn"``: ``wq`` is ``(K, N)``; ``"nk"``: ``(N, K)`` (K-major, ``LLMInt8Scheme(layout="nk")``): every
        variant's int8 dot reads its tiles as stored (``"kmajor"`` then needs no copy) and the outlier loop gathers
        the weight's columns at the outlier dims.
    """
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"int8_outlier_matmul: w_layout must be 'kn' or 'nk', got {w_layout!r}")
    m, k = x.shape
    w_nk = w_layout == "nk"
    n = wq.shape[0] if w_nk else wq.shape[1]
    if xq.shape != (m, k) or wq.shape[1 if w_nk else 0] != k or sw.shape != (n,) or sx.shape != (m,):
        raise ValueError(
            f"int8_outlier_matmul: shapes disagree: x {x.shape}, xq {xq.shape}, sx {sx.shape}, wq {wq.shape} "
            f"({w_layout}), sw {sw.shape}"
        )
    why = supported(k, n, config)
    if why:
        raise ValueError(f"int8_outlier_matmul: unsupported: {why}")
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    # whole 16-entry chunks are read (entries from count on are masked): pad a (K,) index vector; prepass' is longer
    idx = idx.astype(jnp.int32)
    if idx.shape[0] < cdiv(k, OUTLIER_CHUNK) * OUTLIER_CHUNK:
        idx = jnp.pad(idx, (0, cdiv(k, OUTLIER_CHUNK) * OUTLIER_CHUNK - idx.shape[0]))
    nsteps = cdiv(k, bk)
    split = largest_divisor_at_most(nsteps, config.split_k)
    steps = nsteps // split
    kmajor = w_nk or config.variant == "kmajor"
    kernel = functools.partial(
        _kernel, m=m, k=k, n=n, bm=bm, bn=bn, bk=bk, steps=steps, outliers=outliers, kmajor=kmajor, w_nk=w_nk
    )
    operands = [x, xq, sx.astype(jnp.float32), idx, count.astype(jnp.int32).reshape(1), wq, sw.astype(jnp.float32)]
    if kmajor and not w_nk:  # the int8 dot's K-major copy, per call (the outlier rows are still gathered from wq)
        operands.append(wq.T)
    return split_k_call(
        kernel,
        operands,
        rows=m,
        n=n,
        split=split,
        out_dtype=x.dtype,
        config=config,
        interpret=interpret,
        name="int8_outlier_matmul",
    )
