"""Inline PTX for the Pallas-Triton kernels, with an emulator that runs the same program on the CPU.

Pallas' Triton backend passes PTX through ``jax.experimental.pallas.triton.elementwise_inline_asm``; the
Pallas interpreter cannot run it. Every program here is therefore a plain string of a small PTX subset (``mov``,
``and``, ``or``, ``xor``, ``shl``, ``shr``, ``prmt``, ``lop3`` on ``.b32``; ``sub.u32``, ``mul.lo.u32``,
``mad.lo.u32``; ``dp4a.u32.s32``) that :func:`emulate`
executes instruction by instruction with NumPy or ``jax.numpy`` integer operations, following the PTX ISA's
definitions (``prmt`` in its default mode: each selector nibble picks one of the 8 bytes of ``{b, a}``, its top
bit replicating that byte's sign bit instead). On a GPU the string goes to ``ptxas``; in interpret mode
(:func:`inline_asm`) the emulator runs it inside the kernel, so interpret-mode tests exercise the very program a
GPU runs. Two things only a GPU can confirm: that the hardware follows the ISA text as emulated, and Triton's
packing of ``pack`` consecutive elements of a thread into one register (element ``j`` in byte ``j``: LLVM's
little-endian vector bitcast, visible in the LLVM IR the CPU compiles).

``nf4_lookup_asm`` is the NF4 table lookup with byte permutes: four codes per instruction instead of a select
tree per code (15 selects of float32 constants per weight). ``ternary_field_asm`` turns four packed 2-bit
ternary codes into four int8 values in one register (SWAR arithmetic), the operand layout of the int8 dot.
:data:`CODE_QUAD_ASM` spreads the four 2-bit codes of one byte (four consecutive K rows of one column) to the four
bytes of a word, and :data:`DP4A_ASM` multiplies such a word with four int8 activations and accumulates (one
``dp4a`` per four weights and activation row): the ternary W1.58A8 GEMV's integer inner product.

:func:`div_rn` is float32 division correctly rounded (``div.rn.f32``, IEEE 754 round to nearest even, no
flush to zero), which is what XLA's GPU compiler emits for a float32 divide; Pallas-Triton lowers ``/`` to
``div.full.f32``, an approximation (up to 2 ulp). Kernels that must reproduce an XLA ``x / s`` bit for bit (an
int8 activation quantization ``round(x / s)``) use it; its emulation is the float32 ``/`` of XLA:CPU / NumPy,
which is correctly rounded too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "CODE_QUAD_ASM",
    "DIV_RN_ASM",
    "DP4A_ASM",
    "RINT_ASM",
    "code_quads",
    "div_rn",
    "dp4a",
    "emulate",
    "inline_asm",
    "nf4_lookup",
    "nf4_lookup_asm",
    "quantize_int8",
    "rint",
    "ternary_field",
    "ternary_field_asm",
]

#: correctly rounded float32 division (IEEE 754 round to nearest even; denormals kept: no ``.ftz``)
DIV_RN_ASM = "div.rn.f32 $0, $1, $2;"
#: float32 rounded to the nearest integer, ties to even (``jnp.round``; ``lax.round`` has no Triton lowering)
RINT_ASM = "cvt.rni.f32.f32 $0, $1;"


def _table_bits(code_vals: Sequence[float], dtype: str) -> tuple[list[int], int]:
    """The table's bit patterns in ``dtype`` (float32, or rounded to nearest bfloat16 / float16) and their bytes."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"nf4_lookup_asm: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    vals = np.asarray([np.float32(v) for v in code_vals], np.float32).astype(np_dtype)
    width = np.dtype(np_dtype).itemsize
    return [int(b) for b in vals.view(np.uint32 if width == 4 else np.uint16)], width


def nf4_lookup_asm(code_vals: Sequence[float], high: bool, dtype: str = "float32") -> str:
    """PTX mapping 4 packed code bytes (last operand) to the bits of ``T[code]`` in ``dtype`` for each byte.

    ``code = byte >> 4`` when ``high`` (the even element of a bitsandbytes NF4 byte), else ``byte & 15``. With
    ``t_e`` the bits of ``T[e]`` (float32, or rounded to nearest in bfloat16 / float16), plane ``i`` (byte ``i`` of
    every ``t_e``) is held by four immediates: entries 0-3, 4-7, 8-11, 12-15. Per call (four weights): the 3-bit
    selectors packed into one ``prmt`` selector and a byte mask of ``code >= 8`` (a sign-replicating ``prmt``),
    then per plane two ``prmt`` (entries 0-7 and 8-15) and one ``lop3`` choosing by the mask, then a byte
    transpose from planes to values: float32 (4 planes, results ``$0..$3``): 26 instructions per 4 weights;
    16-bit (2 planes, results ``$0`` = values 0-1, ``$1`` = values 2-3, the low half first): 14.
    """
    if len(code_vals) != 16:
        raise ValueError(f"nf4_lookup_asm: need 16 table values, got {len(code_vals)}")
    t, width = _table_bits(code_vals, dtype)
    src = f"${width}"  # the outputs come first: one 32-bit register per 4 bytes of results

    def plane(i: int, first: int) -> str:
        return hex(sum(((t[first + e] >> (8 * i)) & 0xFF) << (8 * e) for e in range(4)))

    lines = ["{", ".reg .b32 s, m, p, q, r0, r1, r2, r3, x0, x1, y0, y1;"]
    if high:  # code j = bits 8j+4..8j+7
        lines += [f"shr.b32 s, {src}, 4;", "and.b32 s, s, 0x07070707;", f"prmt.b32 m, {src}, 0, 0xBA98;"]
    else:  # code j = bits 8j..8j+3; its bit 3 moved to the byte's sign bit for the mask
        lines += [f"and.b32 s, {src}, 0x07070707;", f"shl.b32 m, {src}, 4;", "prmt.b32 m, m, 0, 0xBA98;"]
    # nibble j of the selector = the low 3 bits of code j: bytes 0 and 2 of s | s >> 4 hold nibbles (0, 1), (2, 3)
    lines += ["shr.b32 p, s, 4;", "or.b32 s, s, p;", "prmt.b32 s, s, 0, 0x20;"]
    for i in range(width):
        lines += [
            f"prmt.b32 p, {plane(i, 0)}, {plane(i, 4)}, s;",
            f"prmt.b32 q, {plane(i, 8)}, {plane(i, 12)}, s;",
            f"lop3.b32 r{i}, p, q, m, 0xD8;",  # (p & ~m) | (q & m)
        ]
    if width == 2:  # value j: bytes (r0.j, r1.j); values 0-1 in $0, 2-3 in $1
        lines += ["prmt.b32 $0, r0, r1, 0x5140;", "prmt.b32 $1, r0, r1, 0x7362;", "}"]
        return "\n".join(lines)
    lines += [
        "prmt.b32 x0, r0, r1, 0x5140;",
        "prmt.b32 x1, r0, r1, 0x7362;",
        "prmt.b32 y0, r2, r3, 0x5140;",
        "prmt.b32 y1, r2, r3, 0x7362;",
        "prmt.b32 $0, x0, y0, 0x5410;",
        "prmt.b32 $1, x0, y0, 0x7632;",
        "prmt.b32 $2, x1, y1, 0x5410;",
        "prmt.b32 $3, x1, y1, 0x7632;",
        "}",
    ]
    return "\n".join(lines)


_INSTR = re.compile(r"^([a-z0-9]+)((?:\.[a-z0-9]+)+)\s+(.+)$")
#: the type suffix each supported opcode takes (anything else is refused)
_SUFFIX = {
    **dict.fromkeys(("mov", "and", "or", "xor", "shl", "shr", "prmt", "lop3"), ".b32"),
    "sub": ".u32",
    "mul": ".lo.u32",
    "mad": ".lo.u32",
    "dp4a": ".u32.s32",
}


def emulate(asm: str, inputs: Sequence[Any], n_out: int, xp: Any = np) -> list[Any]:
    """Run a PTX program of the supported subset on uint32 arrays; returns the ``n_out`` outputs ``$0..``.

    Operands: ``$k`` (outputs first, then ``inputs``), registers declared with ``.reg .b32``, and integer
    immediates (hex or decimal). ``xp`` is ``numpy`` or ``jax.numpy`` (inside a jitted or interpreted kernel).
    Raises ``ValueError`` on anything outside the subset, so a program change cannot silently escape the tests.
    """
    if xp is np:
        with np.errstate(over="ignore"):  # integer arithmetic wraps modulo 2**32, as on the GPU
            return _emulate(asm, inputs, n_out, xp)
    return _emulate(asm, inputs, n_out, xp)


def _emulate(asm: str, inputs: Sequence[Any], n_out: int, xp: Any) -> list[Any]:
    u32 = xp.uint32
    regs: dict[str, Any] = {f"${n_out + i}": xp.asarray(v).astype(u32) for i, v in enumerate(inputs)}

    def val(tok: str):
        if tok in regs:
            return regs[tok]
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", tok):
            return u32(int(tok, 0))
        raise ValueError(f"emulate: unknown operand {tok!r}")

    for raw in asm.replace("\n", ";").split(";"):
        ins = raw.strip()
        if not ins or ins in ("{", "}") or ins.startswith(".reg"):
            continue
        m = _INSTR.match(ins)
        if not m:
            raise ValueError(f"emulate: unsupported instruction {ins!r}")
        op, ops = m.group(1), [o.strip() for o in m.group(3).split(",")]
        if op in _SUFFIX and m.group(2) != _SUFFIX[op]:
            raise ValueError(f"emulate: unsupported instruction type {ins!r}")
        d, src = ops[0], [val(o) for o in ops[1:]]
        if op == "mov":
            out = src[0]
        elif op == "and":
            out = src[0] & src[1]
        elif op == "or":
            out = src[0] | src[1]
        elif op == "xor":
            out = src[0] ^ src[1]
        elif op == "sub":  # modulo 2**32
            out = src[0] - src[1]
        elif op == "mul":  # the low 32 bits of the product
            out = src[0] * src[1]
        elif op == "mad":
            out = src[0] * src[1] + src[2]
        elif op == "dp4a":  # c + sum of the 4 byte products, a's bytes unsigned, b's signed, modulo 2**32
            a, b, out = src
            for i in range(4):
                ua = (a >> u32(8 * i)) & u32(0xFF)
                ub = (b >> u32(8 * i)) & u32(0xFF)
                # a signed byte ub - 256 (ub >= 128): the product minus 256 * ua, in wrapping uint32 arithmetic
                out = out + ua * ub - xp.where(ub >= u32(0x80), ua << u32(8), u32(0))
        elif op == "shl":
            out = src[0] << src[1]
        elif op == "shr":
            out = src[0] >> src[1]
        elif op == "lop3":
            a, b, c, lut = src[0], src[1], src[2], int(ops[4], 0)
            out = u32(0) * a
            for bit in range(8):  # minterm bit: (a, b, c) = (bit & 4, bit & 2, bit & 1) as in the PTX LUT index
                if lut >> bit & 1:
                    ta = a if bit & 4 else ~a
                    tb = b if bit & 2 else ~b
                    tc = c if bit & 1 else ~c
                    out = out | (ta & tb & tc)
        elif op == "prmt":
            a, b, c = src
            out = u32(0) * a
            for i in range(4):
                sel = (c >> u32(4 * i)) & u32(15)
                idx = sel & u32(7)
                lo = (a >> ((idx & u32(3)) * u32(8))) & u32(0xFF)
                hi = (b >> ((idx & u32(3)) * u32(8))) & u32(0xFF)
                byte = xp.where(idx >= 4, hi, lo)
                sign = xp.where((byte & u32(0x80)) != 0, u32(0xFF), u32(0))
                byte = xp.where((sel & u32(8)) != 0, sign, byte)
                out = out | (byte << u32(8 * i))
        else:
            raise ValueError(f"emulate: unsupported opcode {op!r}")
        regs[d] = xp.asarray(out).astype(u32)
    return [regs[f"${i}"] for i in range(n_out)]


def inline_asm(asm: str, x: Any, out_dtype: Any, *, interpret: bool) -> Any:
    """Apply a 4-way packed elementwise PTX program to a uint8 tile inside a Pallas kernel.

    The program reads 4 uint8 elements from one register (``$n``, after the outputs) and writes the 4 results
    into ``n`` 32-bit registers ``$0..$n-1`` (``n`` = the result's byte size: 4 for float32, 2 for bfloat16 /
    float16, 1 for int8), results packed least significant first (16-bit: results 0-1 in ``$0``, 2-3 in ``$1``, as
    Triton's LLVM IR unpacks ``{<2 x bfloat>, <2 x bfloat>}``). On a GPU: ``elementwise_inline_asm`` with
    ``pack=4``; in interpret mode: :func:`emulate` on groups of 4 consecutive elements along the last axis."""
    import jax
    import jax.numpy as jnp

    n = jnp.dtype(out_dtype).itemsize
    if n not in (1, 2, 4):
        raise ValueError(f"inline_asm: results must be 8-, 16- or 32-bit, got {jnp.dtype(out_dtype).name}")
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        (out,) = plgpu.elementwise_inline_asm(
            asm,
            args=[x],
            constraints=",".join(["=r"] * n + ["r"]),
            pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, out_dtype)],
        )
        return out
    if x.shape[-1] % 4:
        raise ValueError(f"inline_asm: the last axis must be a multiple of 4, got shape {x.shape}")
    b = x.astype(jnp.uint32).reshape(*x.shape[:-1], x.shape[-1] // 4, 4)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    outs = emulate(asm, [word], n, xp=jnp)
    if n == 4:
        y = jnp.stack(outs, axis=-1).reshape(x.shape)
        return jax.lax.bitcast_convert_type(y, out_dtype)
    if n == 2:
        y = jnp.stack([(outs[j // 2] >> (16 * (j % 2))) & 0xFFFF for j in range(4)], axis=-1).reshape(x.shape)
        return jax.lax.bitcast_convert_type(y.astype(jnp.uint16), out_dtype)
    y = jnp.stack([(outs[0] >> (8 * j)) & 0xFF for j in range(4)], axis=-1).reshape(x.shape)
    return jax.lax.bitcast_convert_type(y.astype(jnp.uint8), out_dtype)


def ternary_field_asm(j: int) -> str:
    """PTX mapping 4 packed bytes (``$1``) to the int8 ternary values ``t = field_j - 1`` of each byte (``$0``).

    Field ``j`` is bits ``2j..2j+1`` of a byte (a code ``c`` in {0, 1, 2}); four at once, without a borrow between
    bytes: ``((c | 0x80) - 1) ^ 0x80`` per byte is ``c - 1`` in two's complement. 5 instructions (4 for ``j=0``)
    per 4 weights."""
    if j not in range(4):
        raise ValueError(f"ternary_field_asm: field must be 0..3, got {j}")
    src = "$1"
    lines = ["{", ".reg .b32 t;"]
    if j:
        lines.append(f"shr.b32 t, $1, {2 * j};")
        src = "t"
    lines += [
        f"and.b32 t, {src}, 0x03030303;",
        "or.b32 t, t, 0x80808080;",
        "sub.u32 t, t, 0x01010101;",
        "xor.b32 $0, t, 0x80808080;",
        "}",
    ]
    return "\n".join(lines)


#: the four 2-bit codes of a byte ``$1`` (0..255; code ``j`` in bits ``2j..2j+1``) to byte ``j`` of ``$0``, in five
#: instructions: ``(b & 0x33) * 0x1001`` puts codes 0 and 2 in bytes 0 and 2, ``(b & 0xCC) * 0x40040`` codes 1 and 3
#: in bytes 1 and 3 (the copies the products also leave, and the one carry their sum can make, land in bits the
#: final mask clears)
CODE_QUAD_ASM = """{
.reg .b32 t, u;
and.b32 t, $1, 0x33;
and.b32 u, $1, 0xCC;
mul.lo.u32 t, t, 0x1001;
mad.lo.u32 t, u, 0x40040, t;
and.b32 $0, t, 0x03030303;
}"""
#: ``$0 = $3 + sum_i a_i * b_i`` over the four bytes, ``a = $1`` unsigned (codes), ``b = $2`` signed (int8 activations)
DP4A_ASM = "dp4a.u32.s32 $0, $1, $2, $3;"


def code_quads(p: Any, *, interpret: bool) -> Any:
    """Int32 words holding in byte ``j`` the 2-bit code ``j`` of each byte of the int32 tile ``p`` (values 0..255):
    :data:`CODE_QUAD_ASM`."""
    return _int32_asm(CODE_QUAD_ASM, p, interpret=interpret)


def dp4a(a: Any, b: Any, c: Any, *, interpret: bool) -> Any:
    """``c + sum_i a_i * b_i`` over the four bytes of int32 tiles of one shape (``a``'s bytes unsigned, ``b``'s
    signed, int32 wrapping): :data:`DP4A_ASM`."""
    return _int32_asm(DP4A_ASM, a, b, c, interpret=interpret)


def _int32_asm(asm: str, *args: Any, interpret: bool) -> Any:
    """One int32 result per element of int32 tiles of one shape; :func:`emulate` in interpret mode."""
    import jax
    import jax.numpy as jnp

    args = [jnp.asarray(a) for a in args]
    if any(a.shape != args[0].shape or a.dtype != jnp.int32 for a in args):
        raise ValueError(f"int32 tiles of one shape needed, got {[(a.shape, a.dtype.name) for a in args]}")
    if interpret:
        words = [jax.lax.bitcast_convert_type(a, jnp.uint32) for a in args]
        (out,) = emulate(asm, words, 1, xp=jnp)
        return jax.lax.bitcast_convert_type(out, jnp.int32)
    return _asm32(asm, args, jnp.int32)


def ternary_field(p: Any, j: int, *, interpret: bool) -> Any:
    """Int8 ``t = ((p >> 2j) & 3) - 1`` for each byte of the uint8 tile ``p`` by :func:`ternary_field_asm`."""
    import jax.numpy as jnp

    return inline_asm(ternary_field_asm(j), p, jnp.int8, interpret=interpret)


def nf4_lookup(p: Any, code_vals: Sequence[float], high: bool, *, interpret: bool, dtype: Any = None) -> Any:
    """``T[code]`` for each byte of the uint8 tile ``p`` (high or low nibble) by :func:`nf4_lookup_asm`, in float32
    (default) or with the table rounded to ``dtype`` (bfloat16 / float16)."""
    import jax.numpy as jnp

    dt = jnp.dtype(dtype or jnp.float32)
    return inline_asm(nf4_lookup_asm(code_vals, high, dt.name), p, dt, interpret=interpret)


def div_rn(a: Any, b: Any, *, interpret: bool) -> Any:
    """``a / b`` for float32 tiles of one shape, correctly rounded (see the module docstring), inside a Pallas
    kernel: inline ``div.rn.f32`` on a GPU; the float32 ``/`` (also correctly rounded) in interpret mode."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"div_rn: operands of one shape needed, got {a.shape} and {b.shape}")
    if interpret:  # the barrier keeps XLA from turning a division by a broadcast constant into a reciprocal product
        return a / jax.lax.optimization_barrier(b)
    return _asm32(DIV_RN_ASM, [a, b], jnp.float32)


def rint(a: Any, *, interpret: bool) -> Any:
    """Float32 ``a`` rounded to the nearest integer, ties to even, as ``jnp.round`` (inline ``cvt.rni.f32.f32`` on a
    GPU; ``jnp.round`` in interpret mode). The usual ``(a + 1.5 * 2**23) - 1.5 * 2**23`` is not an option: XLA's
    algebraic simplifier folds it to ``a`` (checked on XLA:CPU), so interpret mode would not round at all."""
    import jax.numpy as jnp

    a = jnp.asarray(a, jnp.float32)
    return jnp.round(a) if interpret else _asm32(RINT_ASM, [a], jnp.float32)


def quantize_int8(x: Any, scale: Any, *, interpret: bool) -> Any:
    """``clip(round(x / scale), -127, 127)`` as int8 for a float32 tile and a broadcastable scale (``(BM, 1)`` row
    scales), bit-identical to XLA's correctly rounded division and ties-to-even ``jnp.round`` (:func:`div_rn`,
    :func:`rint`): the absmax int8 quantization of LLM.int8 and W1.58A8 inside a kernel."""
    import jax.numpy as jnp

    return int8_values(x, scale, interpret=interpret).astype(jnp.int8)


def int8_values(x: Any, scale: Any, *, interpret: bool) -> Any:
    """:func:`quantize_int8`'s values as float32 (integers in -127..127), for kernels that multiply them in float32:
    no float -> int8 -> float round trip (two conversions per element)."""
    import jax.numpy as jnp

    v = div_rn(x, jnp.broadcast_to(scale, x.shape), interpret=interpret)
    return jnp.clip(rint(v, interpret=interpret), -127.0, 127.0)


def _asm32(asm: str, args: Sequence[Any], out_dtype: Any) -> Any:
    """``elementwise_inline_asm`` with one 32-bit register per operand and result (``pack=1``) on tiles of one
    shape: the GPU path of :func:`div_rn`, :func:`rint` (float32) and :func:`dp4a`, :func:`code_quads` (int32)."""
    import jax
    from jax.experimental.pallas import triton as plgpu

    (out,) = plgpu.elementwise_inline_asm(
        asm,
        args=list(args),
        constraints=",".join(["=r"] + ["r"] * len(args)),
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, out_dtype)],
    )
    return out
