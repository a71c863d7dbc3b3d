"""K-major integer GEMV (M = 1) on the Mosaic GPU backend: ``y = x @ dequant(W)`` for ``IntScheme(layout="nk")``.

The other kernels of this package run on Pallas' Triton backend, whose loads reach a kernel through ``cp.async``
(when they feed a dot) or plain loads it waits for. This one runs on JAX's Mosaic GPU backend (``plgpu.kernel``,
``plgpu.emit_pipeline``): each program's weight tiles arrive by TMA into ``num_stages`` shared-memory buffers while
earlier ones are computed. It is the ``variant="mosaic-gemv+postscale"`` of
:func:`pallas_kernels.int4_matmul.int_matmul`, for K-major 4- and 8-bit symmetric codes, one activation row.

Storage (``IntScheme(bits, group_size, layout="nk")``, 4 or 8 bits, symmetric): ``data`` ``(N, K / per)`` uint8 (4
bits: K row ``2r`` in the low nibble of byte ``r``, row ``2r + 1`` in the high one; code ``c`` meaning ``c - 8``, or
``c - layout.offset``) or int8 (8 bits: the values; uint8 8-bit codes mean ``c - 128``); ``scale`` ``(G, N)``
(``G = K / group_size``, one row when per channel). With ``x_e`` / ``x_o`` the even / odd activation columns (split
once per call by XLA), each step ``t`` of ``BK`` K rows (one ``(64, BK / per)`` byte tile; ``BK`` divides the
group) adds, in float32 registers of the warpgroup layout::

    acc += ((lo - offset) * x_e + (hi - offset) * x_o) * s[g(t)]       (4 bits)
    acc += (c - offset) * x * s[g(t)]                                   (8 bits; offset 0 for int8 storage)

and the program sums ``acc`` over K once at the end. The weights ``(c - offset) * s`` are never rounded to the
activation dtype (the XLA path rounds each one), as in the Triton kernels' ``+postscale`` forms: the result is within
one output rounding of float64 ``x @ dequantize(w)``, not bit-identical to the XLA path.

Grid ``(N / 64, split_k)`` (64 rows: one warpgroup's ``WGMMA`` register layout; ``split_k`` programs share K and
write float32 partial sums that XLA adds). The byte tile is stored in shared memory with a ``BK / per``-byte swizzle
so that the warpgroup reads it without bank conflicts; ``num_stages`` steps are in flight.

Without a GPU: ``interpret=True`` runs JAX's Mosaic GPU interpreter on plain tiles (it supports neither the
shared-memory tiling nor the register-layout casts), so it checks the arithmetic; ``jax.export(...,
platforms=["cuda"])`` checks the lowering with the tiling and layouts. Mosaic compiles to machine code only on the
GPU. Not yet run on a GPU: no table or heuristic selects it; ``benchmarks/gpu_suite.py`` sweeps it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import BlockConfig

__all__ = ["VARIANT", "mosaic_gemv", "supported"]

#: the :class:`~pallas_kernels._common.BlockConfig` variant that selects this kernel in ``int_matmul``
VARIANT = "mosaic-gemv+postscale"

#: rows per program: the warpgroup register layout ``WGMMA`` covers 64 rows
BLOCK_N = 64


def supported(layout, cfg: BlockConfig, x_dtype, m: int | None = None) -> str | None:
    """``None`` when :func:`mosaic_gemv` runs this case (``layout``: an
    :class:`~pallas_kernels.int4_matmul.IntLayout`), else the reason."""
    if not layout.nk or layout.bits not in (4, 8) or layout.mode != "sym":
        return "mosaic-gemv runs K-major (nk) symmetric 4- and 8-bit codes only"
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"mosaic-gemv: activation dtype {jnp.dtype(x_dtype).name} (needs bfloat16/float16)"
    if cfg.block_m != 1 or (m is not None and m != 1):
        return "mosaic-gemv computes one activation row (block_m = 1, M = 1)"
    if cfg.block_n != BLOCK_N:
        return f"mosaic-gemv needs block_n = {BLOCK_N} (one warpgroup's register layout)"
    tile_bytes = cfg.block_k * layout.bits // 8
    if tile_bytes not in (32, 64, 128):
        return f"mosaic-gemv: a K step of {cfg.block_k} {layout.bits}-bit rows is {tile_bytes} bytes (needs 32/64/128)"
    group = layout.group_size if layout.group_size is not None else layout.k
    if group % cfg.block_k:
        return f"mosaic-gemv: the K step ({cfg.block_k}) must divide the group ({group})"
    if layout.n % BLOCK_N or layout.k % (cfg.block_k * cfg.split_k):
        return (
            f"mosaic-gemv: ({layout.k}, {layout.n}) must split into {cfg.split_k} x K steps of {cfg.block_k} and "
            f"{BLOCK_N}-row tiles (no ragged edges)"
        )
    return None


def _interpret_params():
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # a JAX without the Mosaic GPU interpreter
        raise NotImplementedError(f"mosaic_gemv(interpret=True) needs JAX's Mosaic GPU interpreter: {e}") from None
    return InterpretGPUParams()


def mosaic_gemv(
    x: jax.Array, packed: jax.Array, scale: jax.Array, layout, config: BlockConfig, interpret: bool = False
) -> jax.Array:
    """``(1, N)`` ``x @ dequant(W)`` in ``x.dtype`` for K-major symmetric codes (see the module docstring).

    Args:
      x: ``(1, K)`` bfloat16 / float16.
      packed: ``(N, K / per)`` uint8 (4 bits) or int8 (8 bits), ``IntScheme(layout="nk")``'s ``data``.
      scale: ``(G, N)`` rows (``G = K / group_size``; one row per channel).
      layout: the :class:`~pallas_kernels.int4_matmul.IntLayout` (``nk=True``).
      config: ``block_m = 1``, ``block_n = 64``, ``block_k`` K rows per step, ``split_k``, ``num_stages`` (steps in
        flight); ``num_warps`` is one warpgroup.
      interpret: JAX's Mosaic GPU interpreter (CPU; plain tiles).

    Raises:
      ValueError: an unsupported case (:func:`supported`) or shapes that disagree with ``layout``.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    why = supported(layout, config, x.dtype, x.shape[0] if x.ndim == 2 else None)
    if why:
        raise ValueError(f"mosaic_gemv: unsupported: {why}")
    n, k = layout.n, layout.k
    per = 8 // layout.bits
    if x.shape != (1, k) or packed.shape != (n, k // per) or scale.shape[1:] != (n,):
        raise ValueError(f"mosaic_gemv: x {x.shape}, packed {packed.shape}, scale {scale.shape} do not fit {layout}")
    bk, split = config.block_k // per, config.split_k  # bytes per step
    steps = k // (config.block_k * split)
    per_group = (layout.group_size or k) // config.block_k  # K steps per scale row
    xs = [x[:, 0::2], x[:, 1::2]] if per == 2 else [x]
    # unsigned codes mean c - offset (IntScheme: 2**(bits-1)); int8 storage holds the values themselves
    off = 0.0 if packed.dtype == jnp.int8 else float(layout.offset or (1 << (layout.bits - 1)))
    wl = plgpu.Layout.WGMMA

    def kernel(w_gmem, *refs):
        x_gmems, s_gmem, o_gmem, o_smem = refs[:-3], refs[-3], refs[-2], refs[-1]
        j, sk = jax.lax.axis_index("n"), jax.lax.axis_index("s")

        def row(ref):  # the step's activations, broadcast over the tile's 64 rows
            if interpret:
                return ref[...].astype(jnp.float32)
            v = plgpu.load(ref.at[0], (), layout=wl.reduce(0)).astype(jnp.float32)
            return jax.lax.broadcast_in_dim(v, (BLOCK_N, bk), (1,))

        def column(ref):  # the step's scales, one per tile row, broadcast along K
            if interpret:
                return ref[...].astype(jnp.float32).T
            v = plgpu.load(ref.at[0], (), layout=wl.reduce(1)).astype(jnp.float32)
            return jax.lax.broadcast_in_dim(v, (BLOCK_N, bk), (0,))

        def body(_, w_smem, *rest):
            *x_smems, s_smem, acc = rest
            t = w_smem[...] if interpret else plgpu.load(w_smem, (), layout=wl)
            if per == 1:
                v = t.astype(jnp.float32)
                d = (v - off if off else v) * row(x_smems[0])
            else:
                c = t.astype(jnp.int32)
                lo = (c & 15).astype(jnp.float32) - off
                hi = ((c >> 4) & 15).astype(jnp.float32) - off
                d = lo * row(x_smems[0]) + hi * row(x_smems[1])
            return acc + d * column(s_smem)

        tiling = () if interpret else (plgpu.TilingTransform((8, bk)), plgpu.SwizzleTransform(bk))
        zero = jnp.zeros((BLOCK_N, bk), jnp.float32)
        acc = plgpu.emit_pipeline(
            body,
            grid=(steps,),
            in_specs=[plgpu.BlockSpec((BLOCK_N, bk), lambda t: (j, sk * steps + t), transforms=tiling)]
            + [plgpu.BlockSpec((1, bk), lambda t: (0, sk * steps + t)) for _ in xs]
            + [plgpu.BlockSpec((1, BLOCK_N), lambda t: ((sk * steps + t) // per_group, j))],
            max_concurrent_steps=config.num_stages,
            init_carry=zero if interpret else plgpu.layout_cast(zero, wl),
        )(w_gmem, *x_gmems, s_gmem)
        o_smem[...] = jnp.sum(acc, axis=1)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[sk, pl.ds(j * BLOCK_N, BLOCK_N)])
        plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((split, n), jnp.float32),
        grid=(n // BLOCK_N, split),
        grid_names=("n", "s"),
        scratch_types=[plgpu.SMEM((BLOCK_N,), jnp.float32)],
        interpret=_interpret_params() if interpret else None,
    )(packed, *xs, scale)
    return jnp.sum(out, axis=0, keepdims=True).astype(x.dtype)
