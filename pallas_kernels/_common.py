"""Helpers shared by the Pallas kernels: block configs, masks, interleaving and column splitting, exact integer
codes to floats without conversions (``exact_int``), the split-K launcher (``split_k_call``), backend detection.

Rules of the Pallas Triton path these helpers respect (found by lowering and compiling, see PALLAS_NOTES):
every value inside a kernel has power-of-two dimensions; ``jnp.stack`` only joins two values along a new last
axis; the K loop runs inside the kernel (``lax.fori_loop``) with a float32 accumulator; edge blocks are handled
with masked loads/stores (``pallas.triton.load``/``store``), never by reading out of bounds unmasked.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._ptx import div_rn, int8_values

__all__ = [
    "BlockConfig",
    "and_masks",
    "cdiv",
    "compiler_params",
    "exact_field",
    "exact_int",
    "gpu_available",
    "interleave_cols",
    "interleave_rows",
    "is_pow2",
    "largest_divisor_at_most",
    "load",
    "rounded_mul",
    "row_slice",
    "split_cols",
    "split_k_call",
    "store",
    "weight_rounding",
]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Block sizes and launch parameters of a matmul kernel.

    Attributes:
      block_m, block_n, block_k: tile of the output (``block_m x block_n``) and logical K rows per loop step;
        powers of two (Triton).
      split_k: number of programs sharing one output tile along K; ``> 1`` writes float32 partial sums
        ``(split_k, M, N)`` that XLA adds afterwards (no atomics, deterministic).
      num_warps, num_stages: Triton launch parameters (warps per program, software-pipelining depth).
      variant: kernel-specific code path (e.g. how packed rows are matched to activations).
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    variant: str = ""

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not (isinstance(v, int) and is_pow2(v)):
                raise ValueError(f"BlockConfig.{name} must be a power of two, got {v!r}")
        if not (isinstance(self.split_k, int) and self.split_k >= 1):
            raise ValueError(f"BlockConfig.split_k must be an int >= 1, got {self.split_k!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"BlockConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not (isinstance(self.num_stages, int) and 1 <= self.num_stages <= 8):
            raise ValueError(f"BlockConfig.num_stages must be in 1..8, got {self.num_stages!r}")

    def replace(self, **kw) -> BlockConfig:
        return dataclasses.replace(self, **kw)


def compiler_params(cfg: BlockConfig) -> plgpu.CompilerParams:
    """Triton compiler params (their presence selects the Triton lowering over Mosaic GPU)."""
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@functools.cache
def gpu_available() -> bool:
    """True when JAX's default backend is a CUDA GPU (the kernels' target)."""
    try:
        return jax.default_backend() == "gpu" and any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def load(ref, mask=None, other=0):
    """``ref[...]`` as a value, masked where ``mask`` is given (masked-off elements read ``other``)."""
    if mask is None:
        return ref[...]
    return plgpu.load(ref, mask=mask, other=other)


def store(ref, value, mask=None) -> None:
    """``ref[...] = value``, masked where ``mask`` is given."""
    if mask is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=mask)


def largest_divisor_at_most(v: int, cap: int) -> int:
    """The largest divisor of ``v`` that is ``<= cap`` (at least 1): the split-K count that divides the K steps."""
    for d in range(min(cap, v), 0, -1):
        if v % d == 0:
            return d
    return 1


def and_masks(*masks):
    """Logical and of the non-``None`` masks (broadcasting), or ``None``."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else (out & m)
    return out


def interleave_rows(parts: Sequence[jax.Array]) -> jax.Array:
    """Interleave 2 or 4 ``(R, C)`` tiles along rows: row ``len(parts) * r + j`` of the result is
    ``parts[j][r]``. Built from transposes, last-axis two-way stacks and one reshape (all Triton-lowerable)."""
    return interleave_cols([p.T for p in parts]).T


def interleave_cols(parts: Sequence[jax.Array]) -> jax.Array:
    """Interleave 2 or 4 ``(R, C)`` tiles along columns: column ``len(parts) * c + j`` is ``parts[j][:, c]``."""
    r, c = parts[0].shape
    if len(parts) == 2:
        joined = jnp.stack([parts[0], parts[1]], axis=-1)  # (R, C, 2)
    elif len(parts) == 4:
        # (R, C, 2, 2) with [.., p, q] = parts[2p + q]
        joined = jnp.stack(
            [jnp.stack([parts[0], parts[2]], axis=-1), jnp.stack([parts[1], parts[3]], axis=-1)], axis=-1
        )
    else:
        raise ValueError(f"interleave of {len(parts)} parts is not supported (2 or 4)")
    return joined.reshape(r, c * len(parts))


def row_slice(start, size: int, stride: int = 1):
    """``pl.ds`` with an optional stride."""
    if stride == 1:
        return pl.ds(start, size)
    return pl.ds(start, size, stride=stride)


#: dtype -> (same-width int type, bit pattern, value) of a float whose unit in the last place is 1: OR-ing a
#: non-negative integer c below 2**7 (bf16), 2**10 (f16) or 2**23 (f32) into its low bits gives ``value + c``
_MAGIC = {
    jnp.dtype(jnp.bfloat16): (jnp.int16, 0x4300, 128.0),
    jnp.dtype(jnp.float16): (jnp.int16, 0x6400, 1024.0),
    jnp.dtype(jnp.float32): (jnp.int32, 0x4B000000, 8388608.0),
}


def exact_int(c: jax.Array, off, dtype=jnp.float32) -> jax.Array:
    """``c - off`` as ``dtype`` (bfloat16, float16 or float32), exactly, for non-negative integer codes ``c`` (below
    2**7, 2**10, 2**23 respectively) and an integer-valued ``off`` (a Python int, or an int/float array broadcasting
    against ``c``), with integer ops and one float subtraction: the code OR-ed into the mantissa of the float
    ``value`` (128, 1024, 2**23) is ``value + c`` by a same-width bitcast, and ``value + off`` is subtracted.

    Avoids the int-to-float conversion (``I2F``, a quarter-rate instruction on sm_90) of ``c.astype(dtype)``. Not
    used for signed int8 codes: there the extra ``(v & 0xFF) ^ 0x80`` costs more instructions than the ``I2F`` it
    saves (606 vs 414 per K-loop trip of the sm_90 W8A16 tile, ``benchmarks/kernel_sass.py``)."""
    itype, bits, value = _MAGIC[jnp.dtype(dtype)]
    f = jax.lax.bitcast_convert_type(c.astype(itype) | itype(bits), dtype)
    if isinstance(off, int | float):
        return f - (value + off)
    return f - (off.astype(jnp.float32) + value).astype(dtype)


def exact_field(word: jax.Array, off: int, bits: int, sub) -> jax.Array:
    """``((word >> off) & (2**bits - 1)) - sub`` as float32, exactly, for a non-negative int32 / uint32 ``word`` tile
    (static ``off``, ``bits``; ``sub`` an integer-valued Python number or float32 array broadcasting against it, with
    ``|sub| < 2**20``).

    The field is masked in place into the mantissa of a float32 whose exponent makes mantissa bit ``off`` worth 1:
    with exponent ``e = 23 - off`` the bits ``(word & (mask << off)) | bits(2**e)`` read as ``2**e + c``, and
    ``2**e + sub`` is subtracted (both exact: integers below ``2**24``). One ``LOP3`` (and + or) and one ``FADD`` per
    value: no shift and no separate mask for fields inside bits 0..22; a field above that is shifted down first.
    """
    if off + bits > 23:
        word = word >> (off + bits - 23)
        off = 23 - bits
    e = 23 - off
    dt = word.dtype
    field = jnp.asarray(((1 << bits) - 1) << off, dt)
    f = jax.lax.bitcast_convert_type((word & field) | jnp.asarray((127 + e) << 23, dt), jnp.float32)
    if isinstance(sub, int | float):
        return f - float(2**e + sub)
    return f - (sub.astype(jnp.float32) + float(2**e))


def divide_rn(a, b) -> jax.Array:
    """``a / b`` correctly rounded in XLA code (activation quantization pre-passes and references), also when ``b``
    broadcasts. XLA rewrites a division by a broadcast value into a product with its reciprocal (1 ulp off for
    many inputs; on XLA:CPU ``amax / 127.0`` was, for one in five random rows of a test), and a 1-ulp change of a
    scale flips rounding decisions. The divisor is made a full array behind an optimization barrier, tied to ``a``
    so that ``vmap`` batches it (``jaxquant.core.numerics.true_divide``, which this package may not import, does the
    same); inside kernels :func:`pallas_kernels._ptx.div_rn` computes the same quotients."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    dtype = jnp.result_type(a, b)
    a = jnp.broadcast_to(a.astype(dtype), shape)
    tie = jax.lax.stop_gradient(a) * jnp.zeros((), dtype)
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b.astype(dtype), shape) + tie)


def rounded_mul(a: jax.Array, b) -> jax.Array:
    """``a * b`` rounded on its own, also when an addition follows (``rounded_mul(c, s) + z``).

    Triton (like XLA:CPU) contracts ``a * b + c`` into one fused multiply-add, which skips the product's rounding;
    the XLA paths round it first (``jaxquant.core.numerics.rounded_product``), so the kernels must too. The product
    feeds a select (NaN stays NaN), not the add, so it cannot be contracted: sm_90 ``FMUL``, ``FSETP`` + ``FSEL``,
    ``FADD`` (three instructions more than one ``FFMA``; an inline ``mul.rn.f32`` would cost one)."""
    p = a * b
    return jnp.where(p != p, jnp.asarray(float("nan"), p.dtype), p)


def weight_rounding(w_dtype: str | None):
    """The dtype the XLA path rounds a float32 dequantized weight to before the activation dtype (the kernels'
    ``w_dtype`` argument), or ``None`` when that rounding is a no-op (``None`` / ``"float32"``)."""
    return None if w_dtype in (None, "float32") else jnp.dtype(w_dtype)


def split_cols(x: jax.Array, parts: int) -> list[jax.Array]:
    """The column sets ``x[:, j::parts]`` (``parts`` a power of two) of a ``(R, C)`` tile, ``j = 0..parts-1``, split in
    registers (reshape + two-way unstack, Triton's ``split``): the contiguous alternative to ``parts`` strided
    loads, which are neither vectorized nor pipelined by Triton."""
    xs = [x]
    while len(xs) < parts:  # [0::2, 1::2] -> halves [0::4, 2::4], [1::4, 3::4] -> [0::4, 1::4, 2::4, 3::4]
        halves = [jax.lax.unstack(v.reshape(v.shape[0], v.shape[1] // 2, 2), axis=2) for v in xs]
        xs = [h[0] for h in halves] + [h[1] for h in halves]
    if len(xs) != parts:
        raise ValueError(f"split_cols: parts must be a power of two, got {parts}")
    return xs


def split_k_call(
    kernel,
    operands: Sequence[jax.Array],
    *,
    rows: int,
    n: int,
    split: int,
    out_dtype,
    config: BlockConfig,
    interpret: bool,
    name: str,
) -> jax.Array:
    """Launch a matmul kernel on the grid ``(rows / BM, cdiv(n, BN), split)`` and return ``(rows, n)`` in ``out_dtype``.

    ``split == 1``: the kernel writes the ``(rows, n)`` output itself. ``split > 1``: it writes float32 partial sums
    ``(split, rows, n)`` (one per K share, indexed by ``program_id(2)``), which XLA adds in a second small pass
    (deterministic, no atomics) before the cast. ``rows`` is ``M``, or ``M`` padded to whole row blocks for kernels
    that store whole blocks.
    """
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, rows, n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((rows, n), out_dtype)
    out = pl.pallas_call(
        kernel,
        grid=(cdiv(rows, config.block_m), cdiv(n, config.block_n), split),
        out_shape=out_shape,
        compiler_params=compiler_params(config),
        interpret=interpret,
        name=name,
    )(*operands)
    return out.sum(axis=0).astype(out_dtype) if split > 1 else out


def row_int8_quantizer(xt_ref, row, pk: int, steps: int, interpret: bool):
    """For row ``row`` of GEMV activations stored ``(Mp, K/chunk, chunk)`` (zero-padded; ``steps`` steps of ``pk``
    units): its int8 scale ``s_x`` ``(1, 1)`` (the maximum of ``|x|`` over all of K, divided by 127 with correct
    rounding; 1 for an all-zero row) and the quantizer of one tile, ``clip(round(x / s_x), -127, 127)`` as float32
    (:func:`pallas_kernels._ptx.int8_values`), bit-identical to the XLA pre-pass
    ``pallas_kernels.ternary_matmul.quantize_activations`` (zero padding changes no maximum)."""

    def amax_step(t, amax):
        xt = jnp.abs(xt_ref[row, pl.ds(t * pk, pk), :].astype(jnp.float32))
        return jnp.maximum(amax, jnp.max(jnp.max(xt, axis=1, keepdims=True), axis=0, keepdims=True))

    amax = jax.lax.fori_loop(0, steps, amax_step, jnp.zeros((1, 1), jnp.float32))
    sx = jnp.where(amax > 0, div_rn(amax, jnp.full((1, 1), 127.0, jnp.float32), interpret=interpret), 1.0)
    return sx, lambda xt: int8_values(xt, sx, interpret=interpret)
