"""fp8 matmuls: weight-only (W8A16) and W8A8 with the dynamic activation quantization fused.

Weights (jaxquant ``FP8Scheme``): ``w`` ``(K, N)`` in ``float8_e4m3fn`` or ``float8_e5m2`` with a float32 scale
``s_w``, per tensor ``()`` or per output column ``(N,)``; stored as ``(K, N)`` or K-major ``(N, K)``
(``w_layout="nk"``, ``FP8Scheme(layout="nk")``: the layout fp8 ``wgmma`` reads, no transpose per tile or call).

``mode="w8a16"`` computes ``x @ dequant(W)`` exactly as the XLA path rounds it::

    W[k, n] = float32(w[k, n]) * s_w[n]   (rounded to the activation dtype)      y = sum_k x[m, k] W[k, n]

``mode="w8a8"`` quantizes the activations per row on the fly (FMAX = 448 for e4m3, 57344 for e5m2)::

    s_x[m] = max_k |x[m, k]| / FMAX   (XLA pre-pass: one read of x)      q[m, k] = fp8(clip(x[m, k] / s_x[m]))
    y[m, n] = (sum_k q[m, k] w[k, n]) * s_x[m] * s_w[n]                  (fp8 x fp8 dot, float32 accumulation)

where ``q`` is computed per tile inside the kernel and never written to memory. ``x_scale=`` replaces the per-row
scales by given ones (one per tensor, e.g. a calibrated static or a delayed scale, or one per row); the clip then
saturates whatever exceeds ``s_x * FMAX``.

``config.variant="gemv"`` (small ``M``, memory bound, ``block_m <= 8``): no dot; each program keeps one float32
``(BK, BN)`` accumulator per activation row and adds ``x * float32(w)`` elementwise (fp8 x fp8 products are
exact in float32), reducing over K once at the end. In W8A8 mode the activations are quantized by an XLA
pre-pass there (a tiny ``(K, M)`` tensor) and the scales applied afterwards. fp8 dots need sm_89+
(Ada/Hopper): this kernel does not compile for sm_80.

The W8A8 dot is :func:`pallas_kernels._triton_ext.fp8_dot`: JAX's Pallas Triton lowering does not set
``maxNumImpreciseAcc``, without which Triton runs fp8 dots as float16 ``mma.sync`` on Hopper; ``fp8_dot`` sets it
(sm_90: fp8 ``wgmma``, ``QGMMA`` in the machine code). ``variant="prequant"`` (large ``M``, compute bound) takes
the activations already quantized by an XLA pre-pass (``quantize_rows``: the reference's fp8 values, computed once
instead of once per N tile), so the K loop is a pure fp8 x fp8 GEMM; the scale epilogue stays fused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    BlockConfig,
    and_masks,
    cdiv,
    divide_rn,
    largest_divisor_at_most,
    load,
    split_k_call,
    store,
    weight_rounding,
)
from pallas_kernels._triton_ext import DEFAULT_IMPRECISE_ACC, fp8_dot

__all__ = ["VARIANTS", "activation_scales", "fmax", "fp8_matmul", "fp8_matmul_reference", "row_scales", "supported"]

_FP8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))

#: ``""``: dot kernel, W8A8 activations quantized per tile in the kernel; ``"gemv"``: no dot (small M);
#: ``"prequant"``: W8A8 activations quantized once by an XLA pre-pass and the weight transposed to ``(N, K)`` (the
#: K-major layout fp8 ``wgmma`` reads), the kernel a pure fp8 x fp8 GEMM with the scale epilogue (large M).
#: ``"+promote"``: the fp8 tensor-core partial sums are added to the float32 accumulator every K step
#: (``maxNumImpreciseAcc = block_k``) instead of once per dot (``2**30``, cuBLAS' fast accumulation).
VARIANTS = ("", "gemv", "+promote", "prequant", "prequant+promote")


def fmax(dtype) -> float:
    """Largest finite value of an fp8 dtype."""
    return float(ml_dtypes.finfo(np.dtype(jnp.dtype(dtype))).max)


def row_scales(x: jax.Array, w_dtype) -> jax.Array:
    """Per-row activation scales ``max_k |x[m, k]| / FMAX`` (float32 ``(M,)``; 1 for all-zero rows)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)
    return jnp.where(amax > 0, divide_rn(amax, np.float32(fmax(w_dtype))), 1.0)


def quantize_rows(x: jax.Array, sx: jax.Array, w_dtype) -> jax.Array:
    """``fp8(clip(x / s_x))`` per row (saturating; the division correctly rounded, as the scheme's)."""
    f = np.float32(fmax(w_dtype))
    return jnp.clip(divide_rn(x.astype(jnp.float32), sx[:, None]), -f, f).astype(w_dtype)


def activation_scales(x: jax.Array, x_scale: jax.Array | None, w_dtype, fn: str) -> jax.Array:
    """The float32 ``(M,)`` activation scales of a W8A8 call: :func:`row_scales` of ``x``, or ``x_scale`` (a scalar,
    one scale for every row, or ``(M,)``) broadcast to the rows."""
    if x_scale is None:
        return row_scales(x, w_dtype)
    sx = jnp.asarray(x_scale, jnp.float32)
    if sx.shape not in ((), (x.shape[0],)):
        raise ValueError(f"{fn}: x_scale must be a scalar or one scale per row {(x.shape[0],)}, got {sx.shape}")
    return jnp.broadcast_to(sx, (x.shape[0],))


@functools.partial(jax.jit, static_argnames=("mode", "w_dtype", "w_layout"))
def fp8_matmul_reference(
    x,
    w,
    sw,
    *,
    mode: str = "w8a16",
    w_dtype: str | None = None,
    w_layout: str = "kn",
    x_scale: jax.Array | None = None,
) -> jax.Array:
    """XLA reference of :func:`fp8_matmul` (``w`` ``(K, N)``, or ``(N, K)`` with ``w_layout="nk"``)."""
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"fp8_matmul_reference: w_layout must be 'kn' or 'nk', got {w_layout!r}")
    if x_scale is not None and mode != "w8a8":
        raise ValueError("fp8_matmul_reference: x_scale is for mode 'w8a8' (activation scales)")
    w = w.T if w_layout == "nk" else w
    sw = jnp.broadcast_to(jnp.asarray(sw, jnp.float32), (w.shape[1],))
    if mode == "w8a16":
        wd = w.astype(jnp.float32) * sw
        if w_dtype is not None:
            wd = wd.astype(w_dtype)
        wd = wd.astype(x.dtype)
        return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)
    sx = activation_scales(x, x_scale, w.dtype, "fp8_matmul_reference")
    q = quantize_rows(x, sx, w.dtype)
    acc = jnp.dot(q, w, preferred_element_type=jnp.float32)
    return (acc * sx[:, None] * sw[None, :]).astype(x.dtype)


def k_step(k: int, cfg: BlockConfig) -> int:
    """The K step: the largest power of two ``<= cfg.block_k`` that divides ``K``.

    fp8 tiles are never masked along K: Triton cannot materialise the masked-off fill value of an fp8 load
    (``tt.splat`` of an integer to fp8 does not lower), and unfilled rows could hold NaN bit patterns that would
    reach the sum through ``0 * NaN``. Along N a masked load leaves the fill undefined, which only touches output
    columns that are never stored.
    """
    return min(cfg.block_k, k & -k) if k > 0 else cfg.block_k


def supported(w_dtype, cfg: BlockConfig, x_dtype) -> str | None:
    """``None`` when the kernel can run this call, else the reason (the caller then takes the XLA path)."""
    if jnp.dtype(w_dtype) not in _FP8:
        return f"weight dtype {jnp.dtype(w_dtype).name} is not float8_e4m3fn/float8_e5m2"
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"activation dtype {jnp.dtype(x_dtype).name}"
    if cfg.variant not in VARIANTS:
        return f"variant {cfg.variant!r} (fp8 kernels: {', '.join(repr(v) for v in VARIANTS)})"
    if cfg.variant == "gemv":
        if cfg.block_m > 8 or cfg.block_n < 16 or cfg.block_k < 8:
            return "gemv needs block_m <= 8, block_n >= 16 and block_k >= 8"
        return None
    if cfg.block_m < 16 or cfg.block_n < 16 or cfg.block_k < 32:
        return "block_m, block_n >= 16 and block_k >= 32 needed"
    return None


def _kernel(*refs, m, k, n, bm, bn, bk, steps, mode, f8max, w_round, prequant, w_nk, imprecise_acc, interpret):
    if mode == "w8a8":
        x_ref, w_ref, sw_ref, sx_ref, o_ref = refs
    else:
        x_ref, w_ref, sw_ref, o_ref = refs
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    mmask = (m0 + jnp.arange(bm) < m)[:, None] if m % bm else None
    nmask = (n0 + jnp.arange(bn) < n)[None, :] if n % bn else None
    assert k % bk == 0, "fp8 tiles are never masked along K (k_step)"
    sw = load(sw_ref.at[pl.ds(0, 1), pl.ds(n0, bn)], nmask)  # (1, BN) float32
    cdtype = x_ref.dtype
    if mode == "w8a8":
        sx = load(sx_ref.at[pl.ds(m0, bm), pl.ds(0, 1)], mmask)  # (BM, 1)
        inv_guard = jnp.where(sx > 0, sx, 1.0)

    nk_dims = (((1,), (1,)), ((), ()))  # contract the K axes of an (BM, BK) and a (BN, BK) tile

    def body(t, acc):
        k0 = (sk * steps + t) * bk
        # fp8 tiles: masked without a fill value (an fp8 fill does not lower); unfilled rows / columns only reach
        # output entries that are never stored. K divides into bk: no K mask.
        xt = load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mmask, other=None if prequant else 0)
        if w_nk:  # (BN, BK) tile of the (N, K) weight (K-major: the layout fp8 wgmma reads)
            wt = load(w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], nmask.T if nmask is not None else None, other=None)
        else:
            wt = load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], nmask, other=None)
        if mode == "w8a8":
            # x already fp8 (the XLA pre-pass: both tiles go to the tensor cores as loaded), or quantized here
            q = xt if prequant else jnp.clip(xt.astype(jnp.float32) / inv_guard, -f8max, f8max).astype(wt.dtype)
            if interpret:
                dims = nk_dims if w_nk else (((1,), (0,)), ((), ()))
                return acc + jax.lax.dot_general(q, wt, dims, preferred_element_type=jnp.float32)
            return fp8_dot(q, wt, acc, max_num_imprecise_acc=imprecise_acc, transpose_b=w_nk)
        wd = wt.astype(jnp.float32) * (sw.T if w_nk else sw)
        if w_round is not None:
            wd = wd.astype(w_round)
        if w_nk:
            return acc + jax.lax.dot_general(xt, wd.astype(cdtype), nk_dims, preferred_element_type=jnp.float32)
        return acc + jnp.dot(xt, wd.astype(cdtype), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    if mode == "w8a8":
        acc = acc * sx * sw
    omask = and_masks(mmask, nmask)
    if len(o_ref.shape) == 3:
        store(o_ref.at[sk, pl.ds(m0, bm), pl.ds(n0, bn)], acc, omask)
    else:
        store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), omask)


def _gemv_kernel(xt_ref, w_ref, sw_ref, o_ref, *, k, n, bm, bn, bk, steps, cdtype, dequant, w_round, w_nk):
    """``variant="gemv"``: per-row float32 register accumulators, elementwise multiply-add, no dot. ``w_nk``: the
    weight is ``(N, K)``, the accumulators ``(BN, BK)`` and the activations ``(Mp, Kp)``; else ``(BK, BN)`` tiles
    and ``(Kp, Mp)`` activations (so that a row's chunk broadcasts along the tile's N axis either way)."""
    i, j, sk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = i * bm, j * bn
    nmask = (n0 + jnp.arange(bn) < n)[None, :] if n % bn else None
    assert k % bk == 0, "fp8 tiles are never masked along K (k_step)"
    sw = load(sw_ref.at[pl.ds(0, 1), pl.ds(n0, bn)], nmask)
    if w_nk:
        sw = sw.T

    def body(t, accs):
        k0 = (sk * steps + t) * bk
        if w_nk:
            wt = load(w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], None if nmask is None else nmask.T, other=None)
        else:
            wt = load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], nmask, other=None)
        wd = wt.astype(jnp.float32)
        if dequant:  # W8A16: the XLA path's rounding chain
            wd = wd * sw
            if w_round is not None:
                wd = wd.astype(w_round)
            if cdtype != jnp.float32 or w_round is not None:
                wd = wd.astype(cdtype).astype(jnp.float32)
        out = []
        for mi in range(bm):
            if w_nk:
                xc = xt_ref[pl.ds(m0 + mi, 1), pl.ds(k0, bk)].astype(jnp.float32)  # (1, BK), zero-padded
            else:
                xc = xt_ref[pl.ds(k0, bk), pl.ds(m0 + mi, 1)].astype(jnp.float32)  # (BK, 1), zero-padded
            out.append(accs[mi] + xc * wd)
        return tuple(out)

    shape = (bn, bk) if w_nk else (bk, bn)
    accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros(shape, jnp.float32) for _ in range(bm)))
    for mi in range(bm):
        row = jnp.sum(accs[mi], axis=1 if w_nk else 0).reshape(1, bn)
        if len(o_ref.shape) == 3:
            store(o_ref.at[sk, pl.ds(m0 + mi, 1), pl.ds(n0, bn)], row, nmask)
        else:
            store(o_ref.at[pl.ds(m0 + mi, 1), pl.ds(n0, bn)], row.astype(o_ref.dtype), nmask)


def _fp8_gemv(x, w, sw2, sx, *, mode, config: BlockConfig, w_round, w_nk, interpret):
    m, k = x.shape
    n = w.shape[0] if w_nk else w.shape[1]
    bm, bn, bk = config.block_m, config.block_n, k_step(k, config)
    nsteps = cdiv(k, bk)
    split = largest_divisor_at_most(nsteps, config.split_k)
    steps = nsteps // split
    mp = cdiv(m, bm) * bm
    if mode == "w8a8":
        xin = quantize_rows(x, sx, w.dtype).astype(jnp.float32)  # exact in float32
    else:
        xin = x
    xt = jnp.pad(xin, ((0, mp - m), (0, nsteps * bk - k)))  # (Mp, Kp); (Kp, Mp) for (K, N) weights
    xt = xt if w_nk else xt.T
    kernel = functools.partial(
        _gemv_kernel,
        k=k,
        n=n,
        bm=bm,
        bn=bn,
        bk=bk,
        steps=steps,
        cdtype=jnp.dtype(x.dtype),
        dequant=mode == "w8a16",
        w_round=w_round,
        w_nk=w_nk,
    )
    out = split_k_call(
        kernel,
        [xt, w, sw2],
        rows=mp,
        n=n,
        split=split,
        out_dtype=jnp.float32 if mode == "w8a8" else x.dtype,
        config=config,
        interpret=interpret,
        name=f"fp8_{mode}_gemv",
    )
    out = out[:m]
    if mode == "w8a8":
        out = out * sx[:, None] * sw2
    return out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("mode", "config", "w_dtype", "w_layout", "interpret"))
def fp8_matmul(
    x: jax.Array,
    w: jax.Array,
    sw: jax.Array,
    *,
    mode: str = "w8a16",
    config: BlockConfig,
    w_dtype: str | None = None,
    w_layout: str = "kn",
    x_scale: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """fp8 matmul (see module docstring); returns ``(M, N)`` in ``x.dtype``.

    Args:
      x: activations ``(M, K)``.
      w: fp8 weight ``(K, N)``, or ``(N, K)`` with ``w_layout="nk"``; sw: float32 scale ``()`` or ``(N,)``.
      mode: ``"w8a16"`` (weight-only, exact dequantization) or ``"w8a8"`` (dynamic per-row fp8 activations).
      w_dtype: ``"w8a16"`` only: the dtype the XLA path rounds the dequantized weight to before casting it to
        ``x.dtype`` (the QArray's original dtype); ``None`` or float32 skips that rounding.
      w_layout: ``"kn"`` or ``"nk"`` (K-major, ``FP8Scheme(layout="nk")``: every variant reads the weight tiles as
        stored, the layout fp8 ``wgmma`` reads; ``"prequant"`` then needs no transposed copy per call).
      x_scale: ``"w8a8"`` only: float32 activation scales to use instead of the per-row ``max |x| / FMAX``: a
        scalar (per tensor: a dynamic per-tensor, calibrated static or delayed scale) or ``(M,)``; they must be
        positive and finite, and ``x / s_x`` saturates at ``+-FMAX`` (a static scale below the data's amax).
    """
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"fp8_matmul: w_layout must be 'kn' or 'nk', got {w_layout!r}")
    w_nk = w_layout == "nk"
    m, k = x.shape
    n = w.shape[0] if w_nk else w.shape[1]
    if w.ndim != 2 or w.shape[1 if w_nk else 0] != k:
        raise ValueError(f"fp8_matmul: x {x.shape} and w {w.shape} ({w_layout}) do not contract")
    if mode not in ("w8a16", "w8a8"):
        raise ValueError(f"fp8_matmul: mode must be 'w8a16' or 'w8a8', got {mode!r}")
    if x_scale is not None and mode != "w8a8":
        raise ValueError("fp8_matmul: x_scale is for mode 'w8a8' (activation scales)")
    why = supported(w.dtype, config, x.dtype)
    if why:
        raise ValueError(f"fp8_matmul: unsupported: {why}")
    if mode == "w8a16" and config.variant.startswith("prequant"):
        raise ValueError(f"fp8_matmul: variant {config.variant!r} quantizes activations: mode 'w8a8' only")
    if k_step(k, config) < (8 if config.variant == "gemv" else 32):
        # K without a power-of-two step (rare: transformer widths are multiples of 64): zero-pad K to whole
        # blocks, a copy of the weight per call; zeros add nothing to the dot and do not change row absmax
        kp = cdiv(k, config.block_k) * config.block_k
        x = jnp.pad(x, ((0, 0), (0, kp - k)))
        w = jnp.pad(w, ((0, 0), (0, kp - k)) if w_nk else ((0, kp - k), (0, 0)))
        k = kp
    sw2 = jnp.broadcast_to(jnp.asarray(sw, jnp.float32), (n,)).reshape(1, n)
    operands = [x, w, sw2]
    sx = None
    if mode == "w8a8":
        sx = activation_scales(x, x_scale, w.dtype, "fp8_matmul")
        operands.append(sx.reshape(m, 1))
    w_round = weight_rounding(w_dtype)
    if config.variant == "gemv":
        return _fp8_gemv(x, w, sw2, sx, mode=mode, config=config, w_round=w_round, w_nk=w_nk, interpret=interpret)
    prequant = config.variant.startswith("prequant")
    if prequant:  # XLA pre-pass: the fp8 activations once (the reference's values), the weight K-major
        operands[0] = quantize_rows(x, sx, w.dtype)
        if not w_nk:  # a transposed copy per call: store the weight K-major (FP8Scheme(layout="nk")) to avoid it
            operands[1] = w.T
    bm, bn, bk = config.block_m, config.block_n, k_step(k, config)
    nsteps = cdiv(k, bk)
    split = largest_divisor_at_most(nsteps, config.split_k)
    steps = nsteps // split
    kernel = functools.partial(
        _kernel,
        m=m,
        k=k,
        n=n,
        bm=bm,
        bn=bn,
        bk=bk,
        steps=steps,
        mode=mode,
        f8max=fmax(w.dtype),
        w_round=w_round,
        prequant=prequant,
        w_nk=w_nk or prequant,
        imprecise_acc=bk if config.variant.endswith("+promote") else DEFAULT_IMPRECISE_ACC,
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
        name=f"fp8_{mode}_matmul",
    )
