"""K-major integer matmuls on the Mosaic GPU backend: ``y = x @ dequant(W)`` for ``IntScheme(layout="nk")``.

The other kernels of this package run on Pallas' Triton backend, whose loads reach a kernel through ``cp.async``
(when they feed a dot) or plain loads it waits for. These run on JAX's Mosaic GPU backend (``plgpu.kernel``,
``plgpu.emit_pipeline``): each program's weight tiles arrive by TMA into ``num_stages`` shared-memory buffers while
earlier ones are computed. They are two variants of :func:`pallas_kernels.int4_matmul.int_matmul` for K-major 4- and
8-bit codes, symmetric or with zero points:

* ``"mosaic-gemv+postscale"`` (:func:`mosaic_gemv`, ``M = 1``): no tensor cores; each step multiplies the tile with
  the broadcast activation row into a float32 register accumulator (the warpgroup layout ``WGMMA``), summed over K
  once at the end;
* ``"mosaic-dot"`` (:func:`mosaic_dot`, ``M <= block_m`` in {16, 32, 64}): the product computed transposed,
  ``y^T = W^T x^T``, so that the weight tile (64 output columns) is wgmma's 64-row operand A, dequantized in
  registers, and the ``block_m`` padded activation rows its N (8 to 256).

Storage (``IntScheme(bits, group_size, symmetric, layout="nk")``, 4 or 8 bits): ``data`` ``(N, K / per)`` uint8
(4 bits: K row ``2r`` in the low nibble of byte ``r``, row ``2r + 1`` in the high one; a symmetric code ``c`` means
``c - 8``, or ``c - layout.offset``) or int8 (8 bits: the values; uint8 8-bit codes mean ``c - 128``); ``scale``
``(G, N)`` (``G = K / group_size``, one row when per channel). With zero points (``range="zeropoint"``, GPTQ / AWQ),
``zero`` holds ``(G, N)`` uint8 codes and ``offset`` below is the step's zero-point row (read as float32: a TMA copy
moves a multiple of 128 bytes, and a uint8 row of 64 columns is 64). With ``x_e`` / ``x_o`` the even / odd
activation columns (split once per call by XLA), each step ``t`` of ``BK`` K rows (one ``(64, BK / per)`` byte
tile; ``BK`` divides the group, so one scale row ``s[g(t)]`` per step):

    GEMV:  acc += ((lo - offset) * x_e + (hi - offset) * x_o) * s[g(t)]     (8 bits: (c - offset) * x * s[g(t)])
    dot:   acc += round((lo - offset) * s[g(t)]) @ x_e^T + round((hi - offset) * s[g(t)]) @ x_o^T

The GEMV never rounds the weights ``(c - offset) * s`` to the activation dtype (the XLA path rounds each one), as the
Triton kernels' ``+postscale`` forms: within one output rounding of float64 ``x @ dequantize(w)``, not
bit-identical to the XLA path. The dot rounds each weight as the XLA path does (``round``: to the activation dtype,
through the QArray's dtype when that differs) and differs from it only in summation order.

Grid ``(N / 64, split_k)`` (64 output columns per program; ``split_k`` programs share K and write float32 partial
sums that XLA adds, then transposes for the dot). The byte tile is stored in shared memory with a ``BK / per``-byte
swizzle so that the warpgroup reads it without bank conflicts; the dot's activation tiles ``(BK / per, block_m)``
with a ``2 block_m``-byte one.

Without a GPU: ``interpret=True`` runs JAX's Mosaic GPU interpreter on plain tiles (it supports neither the
shared-memory tiling nor the register-layout casts, and takes wgmma's operand A from shared memory, so the dot
stores its dequantized tile there first), so it checks the arithmetic; ``jax.export(..., platforms=["cuda"])``
checks the lowering with the tiling, the layouts and A in registers. Mosaic compiles to machine code only on the
GPU. Not yet run on a GPU: no table or heuristic selects them; ``benchmarks/gpu_suite.py`` sweeps them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import BlockConfig

__all__ = ["DOT", "DOT_ROWS", "GEMV", "VARIANTS", "mosaic_dot", "mosaic_gemv", "supported"]

#: the :class:`~pallas_kernels._common.BlockConfig` variants that select these kernels in ``int_matmul``
GEMV = "mosaic-gemv+postscale"
DOT = "mosaic-dot"
VARIANTS = (GEMV, DOT)

#: output columns per program: the warpgroup register layout ``WGMMA`` covers 64 rows of the transposed product
BLOCK_N = 64

#: the dot's ``block_m``: activation rows padded to wgmma's N (a 32/64/128-byte swizzled row of the bf16/f16 tile)
DOT_ROWS = (16, 32, 64)


def supported(layout, cfg: BlockConfig, x_dtype, m: int | None = None) -> str | None:
    """``None`` when ``cfg.variant`` (:data:`GEMV` or :data:`DOT`) runs this case (``layout``: an
    :class:`~pallas_kernels.int4_matmul.IntLayout`; ``m``: the activation rows, when known), else the reason."""
    v = cfg.variant
    if v not in VARIANTS:
        return f"variant {v!r} is not a Mosaic GPU kernel ({', '.join(VARIANTS)})"
    if not layout.nk or layout.bits not in (4, 8) or layout.mode not in ("sym", "zeropoint"):
        return f"{v} runs K-major (nk) 4- and 8-bit codes, symmetric or with zero points, only"
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"{v}: activation dtype {jnp.dtype(x_dtype).name} (needs bfloat16/float16)"
    if v == GEMV and (cfg.block_m != 1 or (m is not None and m != 1)):
        return f"{v} computes one activation row (block_m = 1, M = 1)"
    if v == DOT and (cfg.block_m not in DOT_ROWS or (m is not None and m > cfg.block_m)):
        return f"{v} computes up to block_m rows, block_m in {DOT_ROWS} (got block_m={cfg.block_m}, M={m})"
    if cfg.block_n != BLOCK_N:
        return f"{v} needs block_n = {BLOCK_N} (one warpgroup's register layout)"
    tile_bytes = cfg.block_k * layout.bits // 8
    if tile_bytes not in (64, 128):  # a swizzled shared-memory row; the activation tiles then hold >= 128 bytes
        return f"{v}: a K step of {cfg.block_k} {layout.bits}-bit rows is {tile_bytes} bytes (needs 64 or 128)"
    group = layout.group_size if layout.group_size is not None else layout.k
    if group % cfg.block_k:
        return f"{v}: the K step ({cfg.block_k}) must divide the group ({group})"
    if layout.n % BLOCK_N or layout.k % (cfg.block_k * cfg.split_k):
        return (
            f"{v}: ({layout.k}, {layout.n}) must split into {cfg.split_k} x K steps of {cfg.block_k} and "
            f"{BLOCK_N}-row tiles (no ragged edges)"
        )
    return None


def _interpret_params():
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # a JAX without the Mosaic GPU interpreter
        raise NotImplementedError(
            f"Mosaic GPU kernels with interpret=True need JAX's Mosaic GPU interpreter: {e}"
        ) from None
    return InterpretGPUParams()


class _Plan:
    """What both kernels derive from the layout and config: checks, steps, offsets and the tile specs."""

    def __init__(self, fn: str, x, packed, scale, zero, layout, config: BlockConfig, interpret: bool):
        why = supported(layout, config, x.dtype, x.shape[0] if x.ndim == 2 else None)
        if why:
            raise ValueError(f"{fn}: unsupported: {why}")
        self.n, self.k = layout.n, layout.k
        self.per = 8 // layout.bits  # K rows per byte
        if x.ndim != 2 or x.shape[1] != self.k or packed.shape != (self.n, self.k // self.per):
            raise ValueError(f"{fn}: x {x.shape}, packed {packed.shape} do not fit {layout}")
        rows = (1 if layout.group_size is None else layout.groups, self.n)
        if scale.shape != rows:
            raise ValueError(f"{fn}: scale {scale.shape} does not fit {layout} (needs {rows})")
        if (zero is None) != (layout.mode == "sym") or (zero is not None and zero.shape != rows):
            raise ValueError(f"{fn}: zero {None if zero is None else zero.shape} does not fit mode {layout.mode!r}")
        # per-step rows: the scale, the zero point (as float32 here: a (1, 64) tile of uint8 codes is 64 bytes, less
        # than a TMA copy of Mosaic GPU moves, 128 bytes, one per warpgroup thread)
        self.stats = [scale] if zero is None else [scale, zero.astype(jnp.float32)]
        self.bk = config.block_k // self.per  # bytes per step
        self.split = config.split_k
        self.steps = self.k // (config.block_k * self.split)
        self.per_group = (layout.group_size or self.k) // config.block_k  # K steps per scale row
        # unsigned codes mean c - offset (IntScheme: 2**(bits-1)); int8 storage holds the values themselves
        offset = layout.offset if layout.offset is not None else 1 << (layout.bits - 1)
        self.off = 0.0 if packed.dtype == jnp.int8 else float(offset)
        self.interpret = interpret

    def codes(self, t, z=None):
        """The tile's codes minus the offset (or the zero points ``z``, a broadcast ``(64, bk)`` float32 column),
        float32: one ``(64, bk)`` tile per K position of a byte."""
        sub = z if z is not None else (self.off or None)
        if self.per == 1:
            v = t.astype(jnp.float32)
            return [v if sub is None else v - sub]
        c = t.astype(jnp.int32)
        return [(c & 15).astype(jnp.float32) - sub, ((c >> 4) & 15).astype(jnp.float32) - sub]

    def weight_spec(self, plgpu, j, sk):
        tiling = () if self.interpret else (plgpu.TilingTransform((8, self.bk)), plgpu.SwizzleTransform(self.bk))
        return plgpu.BlockSpec((BLOCK_N, self.bk), lambda t: (j, sk * self.steps + t), transforms=tiling)

    def stat_specs(self, plgpu, j, sk):
        """The step's scale (and zero-point) row: ``(1, 64)`` tiles of the ``(G, N)`` rows."""
        spec = plgpu.BlockSpec((1, BLOCK_N), lambda t: ((sk * self.steps + t) // self.per_group, j))
        return [spec] * len(self.stats)

    def step_stats(self, plgpu, smems):
        """The step's broadcast scales and zero points (``None`` without) from their shared-memory rows."""
        s = self.broadcast(plgpu, smems[0], per_row=True)
        return s, (self.broadcast(plgpu, smems[1], per_row=True) if len(smems) > 1 else None)

    def broadcast(self, plgpu, ref, per_row: bool):
        """A ``(1, L)`` shared-memory row as the ``(64, bk)`` float32 tile it is combined with: ``per_row``, one value
        per weight-tile row (scales, zero points; ``L = 64``) repeated along K; else one per K column (activations;
        ``L = bk``) repeated over the rows. On the GPU the row is loaded in the layout that broadcasts to ``WGMMA``."""
        if self.interpret:
            v = ref[...].astype(jnp.float32)
            return v.T if per_row else v
        dim = 1 if per_row else 0  # the dimension the loaded vector lacks
        v = plgpu.load(ref.at[0], (), layout=plgpu.Layout.WGMMA.reduce(dim)).astype(jnp.float32)
        return jax.lax.broadcast_in_dim(v, (BLOCK_N, self.bk), (1 - dim,))

    def tile(self, plgpu, ref):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)


def mosaic_gemv(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    layout,
    config: BlockConfig,
    interpret: bool = False,
    *,
    zero: jax.Array | None = None,
) -> jax.Array:
    """``(1, N)`` ``x @ dequant(W)`` in ``x.dtype`` for K-major codes (:data:`GEMV`; see the module
    docstring).

    Args:
      x: ``(1, K)`` bfloat16 / float16.
      packed: ``(N, K / per)`` uint8 (4 bits) or int8 (8 bits), ``IntScheme(layout="nk")``'s ``data``.
      scale: ``(G, N)`` rows (``G = K / group_size``; one row per channel).
      layout: the :class:`~pallas_kernels.int4_matmul.IntLayout` (``nk=True``).
      zero: ``mode="zeropoint"``: the ``(G, N)`` zero-point codes (``W = (c - z) * s``); ``None`` for ``"sym"``.
      config: ``block_m = 1``, ``block_n = 64``, ``block_k`` K rows per step, ``split_k``, ``num_stages`` (steps in
        flight); ``num_warps`` is one warpgroup.
      interpret: JAX's Mosaic GPU interpreter (CPU; plain tiles).

    Raises:
      ValueError: an unsupported case (:func:`supported`) or shapes that disagree with ``layout``.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    plan = _Plan("mosaic_gemv", x, packed, scale, zero, layout, config, interpret)
    bk, n = plan.bk, plan.n
    xs = [x[:, 0::2], x[:, 1::2]] if plan.per == 2 else [x]
    wl = plgpu.Layout.WGMMA

    def kernel(w_gmem, *refs):
        nx = len(xs)
        x_gmems, st_gmems, o_gmem, o_smem = refs[:nx], refs[nx:-2], refs[-2], refs[-1]
        j, sk = jax.lax.axis_index("n"), jax.lax.axis_index("s")

        def body(_, w_smem, *rest):
            x_smems, st_smems, acc = rest[:nx], rest[nx:-1], rest[-1]
            s_b, z_b = plan.step_stats(plgpu, st_smems)
            d = None
            for c, x_smem in zip(plan.codes(plan.tile(plgpu, w_smem), z_b), x_smems):
                cx = c * plan.broadcast(plgpu, x_smem, per_row=False)
                d = cx if d is None else d + cx
            return acc + d * s_b

        acc0 = jnp.zeros((BLOCK_N, bk), jnp.float32)
        acc = plgpu.emit_pipeline(
            body,
            grid=(plan.steps,),
            in_specs=[plan.weight_spec(plgpu, j, sk)]
            + [plgpu.BlockSpec((1, bk), lambda t: (0, sk * plan.steps + t)) for _ in xs]
            + plan.stat_specs(plgpu, j, sk),
            max_concurrent_steps=config.num_stages,
            init_carry=acc0 if interpret else plgpu.layout_cast(acc0, wl),
        )(w_gmem, *x_gmems, *st_gmems)
        o_smem[...] = jnp.sum(acc, axis=1)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[sk, pl.ds(j * BLOCK_N, BLOCK_N)])
        plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((plan.split, n), jnp.float32),
        grid=(n // BLOCK_N, plan.split),
        grid_names=("n", "s"),
        scratch_types=[plgpu.SMEM((BLOCK_N,), jnp.float32)],
        interpret=_interpret_params() if interpret else None,
    )(packed, *xs, *plan.stats)
    return jnp.sum(out, axis=0, keepdims=True).astype(x.dtype)


def mosaic_dot(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    layout,
    config: BlockConfig,
    w_round=None,
    interpret: bool = False,
    *,
    zero: jax.Array | None = None,
) -> jax.Array:
    """``(M, N)`` ``x @ dequant(W)`` in ``x.dtype`` on the tensor cores (:data:`DOT`; see the module docstring),
    ``M <= config.block_m``.

    Args:
      x: ``(M, K)`` bfloat16 / float16.
      packed, scale, layout, zero: as for :func:`mosaic_gemv`.
      config: ``block_m`` in :data:`DOT_ROWS` (the padded rows: wgmma's N), ``block_n = 64``, ``block_k`` K rows per
        step, ``split_k``, ``num_stages`` (steps in flight).
      w_round: the dtype the XLA path rounds each dequantized weight to before ``x.dtype`` (``None``: none).
      interpret: JAX's Mosaic GPU interpreter (CPU; plain tiles, operand A through shared memory).

    Raises:
      ValueError: an unsupported case (:func:`supported`) or shapes that disagree with ``layout``.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    plan = _Plan("mosaic_dot", x, packed, scale, zero, layout, config, interpret)
    bk, n, mp, cd = plan.bk, plan.n, config.block_m, x.dtype
    xp = jnp.pad(x, ((0, mp - x.shape[0]), (0, 0)))
    xts = [xp[:, 0::2].T, xp[:, 1::2].T] if plan.per == 2 else [xp.T]  # (K / per, block_m): operand B per position
    x_tiling = () if interpret else (plgpu.TilingTransform((8, mp)), plgpu.SwizzleTransform(2 * mp))

    def weights(c, s):  # the XLA path's weights: float32 products, its roundings
        w = c * s
        if w_round is not None and jnp.dtype(w_round) != jnp.dtype(cd):
            w = w.astype(w_round)
        return w.astype(cd)

    def kernel(w_gmem, *refs):
        nx, ns = len(xts), len(plan.stats)
        x_gmems, st_gmems, o_gmem, a_smems = refs[:nx], refs[nx : nx + ns], refs[nx + ns], refs[nx + ns + 1 :]
        j, sk = jax.lax.axis_index("n"), jax.lax.axis_index("s")

        def with_acc(acc_ref):
            def body(_, w_smem, *rest):
                x_smems, st_smems = rest[:nx], rest[nx:]
                s_b, z_b = plan.step_stats(plgpu, st_smems)
                for c, x_smem in zip(plan.codes(plan.tile(plgpu, w_smem), z_b), x_smems):
                    a = weights(c, s_b)
                    if interpret:  # the interpreter takes wgmma's operand A from shared memory only
                        a_smems[0][...] = a
                        plgpu.commit_smem()
                        a = a_smems[0]
                    plgpu.wgmma(acc_ref, a, x_smem)
                    plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                body,
                grid=(plan.steps,),
                in_specs=[plan.weight_spec(plgpu, j, sk)]
                + [plgpu.BlockSpec((bk, mp), lambda t: (sk * plan.steps + t, 0), transforms=x_tiling) for _ in xts]
                + plan.stat_specs(plgpu, j, sk),
                max_concurrent_steps=config.num_stages,
            )(w_gmem, *x_gmems, *st_gmems)
            o_gmem[sk, pl.ds(j * BLOCK_N, BLOCK_N), :] = acc_ref[...]

        pl.run_scoped(with_acc, plgpu.ACC((BLOCK_N, mp), jnp.float32))

    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((plan.split, n, mp), jnp.float32),
        grid=(n // BLOCK_N, plan.split),
        grid_names=("n", "s"),
        scratch_types=[plgpu.SMEM((BLOCK_N, bk), cd)] if interpret else [],
        interpret=_interpret_params() if interpret else None,
    )(packed, *xts, *plan.stats)
    return jnp.sum(out, axis=0).T[: x.shape[0]].astype(cd)
