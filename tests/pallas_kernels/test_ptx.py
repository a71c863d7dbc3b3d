"""Inline PTX programs (pallas_kernels/_ptx.py): the emulator's instruction semantics (written from the PTX ISA),
and the NF4 byte-permute lookup run through it exhaustively: the same program text a GPU compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core.formats import NF4_CODE
from pallas_kernels._ptx import emulate, inline_asm, nf4_lookup_asm, ternary_field, ternary_field_asm

CODE_VALS = tuple(float(v) for v in NF4_CODE)
BITS = NF4_CODE.astype(np.float32).view(np.uint32)


def _words(n_random: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(0)
    same = np.arange(256, dtype=np.uint32) * np.uint32(0x01010101)  # every byte value in every position
    return np.concatenate([same, rng.integers(0, 2**32, n_random, dtype=np.uint64).astype(np.uint32)])


def test_prmt_follows_the_isa_default_mode():
    """``prmt.b32 d, a, b, c``: nibble i of ``c`` picks byte ``c_i & 7`` of ``{b, a}`` (``a`` = bytes 0-3) for
    byte i of ``d``; a nibble with its top bit set gives that byte's sign bit replicated instead."""
    a, b = np.uint32(0x83_02_81_00), np.uint32(0x07_86_05_84)  # bytes 0..7: 00 81 02 83 84 05 86 07
    (d,) = emulate("prmt.b32 $0, $1, $2, $3;", [a, b, np.uint32(0x7531)], 1)
    assert int(d) == 0x07_05_83_81
    (d,) = emulate("prmt.b32 $0, $1, $2, $3;", [a, b, np.uint32(0xF9B8)], 1)
    assert int(d) == 0x00_FF_FF_00  # signs of bytes 0 (00), 3 (83), 1 (81), 7 (07)
    (d,) = emulate("prmt.b32 $0, $1, 0x44332211, 0x4567;", [a], 1)  # immediate b, upper selector bits ignored
    assert int(d) == 0x11_22_33_44


@pytest.mark.parametrize("lut,fn", [(0xD8, lambda a, b, c: (a & ~c) | (b & c)), (0x96, lambda a, b, c: a ^ b ^ c)])
def test_lop3_truth_table_index(lut, fn):
    """``lop3.b32 d, a, b, c, lut``: bit ``4a + 2b + c`` of ``lut`` (the ISA's 0xF0 / 0xCC / 0xAA convention)."""
    rng = np.random.default_rng(lut)
    a, b, c = (rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32) for _ in range(3))
    (d,) = emulate(f"lop3.b32 $0, $1, $2, $3, {lut:#x};", [a, b, c], 1)
    np.testing.assert_array_equal(d, fn(a, b, c))


def test_scalar_ops_and_scoped_registers():
    asm = "{\n.reg .b32 t;\nshl.b32 t, $1, 4;\nshr.b32 t, t, 8;\nand.b32 t, t, 0xFF;\nor.b32 $0, t, 0x100;\n}"
    (d,) = emulate(asm, [np.uint32(0xABCD)], 1)
    assert int(d) == ((0xABCD << 4) >> 8) & 0xFF | 0x100


@pytest.mark.parametrize("bad", ["add.s32 $0, $1, 1;", "prmt.b32 $0, $1, %r9, 0;", "bra done;"])
def test_unsupported_programs_are_rejected(bad):
    with pytest.raises(ValueError, match="emulate"):
        emulate(bad, [np.uint32(1)], 1)


@pytest.mark.parametrize("high", [True, False])
def test_nf4_lookup_program_is_the_table(high):
    """All 256 byte values in each of the 4 packed positions, plus random words: output j is the float32 bits of
    ``T[code]`` of byte j (its high or low nibble), with NumPy and with jax.numpy (the interpret-mode path)."""
    w = _words()
    asm = nf4_lookup_asm(CODE_VALS, high)
    for xp in (np, jnp):
        outs = emulate(asm, [xp.asarray(w)], 4, xp=xp)
        for j in range(4):
            byte = (w >> np.uint32(8 * j)) & np.uint32(0xFF)
            code = byte >> np.uint32(4) if high else byte & np.uint32(15)
            np.testing.assert_array_equal(np.asarray(outs[j]), BITS[code])
    n = sum(ln.strip().endswith(";") and not ln.startswith(".reg") for ln in asm.splitlines())
    assert n == 26, n  # instructions per 4 weights


def test_inline_asm_interpret_packs_consecutive_elements():
    """Interpret mode groups 4 consecutive elements of the last axis into one word (element j in byte j), as
    Triton packs a thread's elements for ``pack=4``; the result keeps the tile's shape."""
    p = jnp.asarray(np.random.default_rng(1).integers(0, 256, (6, 12)), jnp.uint8)
    got = jax.jit(lambda v: inline_asm(nf4_lookup_asm(CODE_VALS, False), v, jnp.float32, interpret=True))(p)
    np.testing.assert_array_equal(np.asarray(got), NF4_CODE.astype(np.float32)[np.asarray(p) & 15])
    with pytest.raises(ValueError, match="multiple of 4"):
        inline_asm(nf4_lookup_asm(CODE_VALS, False), p[:, :6], jnp.float32, interpret=True)


def test_table_size_is_checked():
    with pytest.raises(ValueError, match="16 table values"):
        nf4_lookup_asm(CODE_VALS[:8], True)


@pytest.mark.parametrize("j", range(4))
def test_ternary_field_program_is_code_minus_one(j):
    """Every byte value in every position: byte ``i`` of the result is ``((byte_i >> 2j) & 3) - 1`` as int8 for the
    codes 0..2 (the code 3 never occurs; it gives 2 without disturbing the other bytes)."""
    w = _words()
    (out,) = emulate(ternary_field_asm(j), [w], 1)
    for i in range(4):
        code = (w >> np.uint32(8 * i + 2 * j)) & np.uint32(3)
        got = ((out >> np.uint32(8 * i)) & np.uint32(0xFF)).astype(np.uint8).view(np.int8)
        np.testing.assert_array_equal(got, code.astype(np.int8) - 1)


def test_ternary_field_interpret_path():
    p = jnp.asarray(np.random.default_rng(2).integers(0, 256, (8, 16)), jnp.uint8)
    for j in range(4):
        got = jax.jit(lambda v, j=j: ternary_field(v, j, interpret=True))(p)
        assert got.dtype == jnp.int8
        np.testing.assert_array_equal(np.asarray(got), ((np.asarray(p) >> (2 * j)) & 3).astype(np.int8) - 1)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        ternary_field_asm(4)


def test_sub_wraps_and_needs_u32():
    (d,) = emulate("sub.u32 $0, $1, 2;", [np.uint32(1)], 1)
    assert int(d) == 2**32 - 1
    with pytest.raises(ValueError, match="type"):
        emulate("sub.b32 $0, $1, 2;", [np.uint32(1)], 1)


def test_div_rn_and_rint_interpret_paths_and_programs():
    """The interpret-mode forms are the float32 operations the PTX instructions define: IEEE division (correctly
    rounded, checked here against float64 rounded once) and rounding to the nearest integer with ties to even."""
    from pallas_kernels._ptx import DIV_RN_ASM, RINT_ASM, div_rn, rint

    assert DIV_RN_ASM == "div.rn.f32 $0, $1, $2;" and RINT_ASM == "cvt.rni.f32.f32 $0, $1;"
    rng = np.random.default_rng(3)
    a = rng.standard_normal(4096).astype(np.float32) * 100
    b = (rng.random(4096).astype(np.float32) + 0.01) / 127
    got = np.asarray(div_rn(jnp.asarray(a), jnp.asarray(b), interpret=True))
    np.testing.assert_array_equal(got, (a.astype(np.float64) / b.astype(np.float64)).astype(np.float32))
    ties = jnp.asarray([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 3.4999998, -3.5000002], jnp.float32)
    np.testing.assert_array_equal(np.asarray(rint(ties, interpret=True)), [0, 2, 2, -0, -2, 126, 3, -4])
    with pytest.raises(ValueError, match="one shape"):
        div_rn(jnp.ones((2, 3)), jnp.ones((2, 1)), interpret=True)


def test_divide_rn_is_correctly_rounded_where_plain_xla_division_is_not():
    """The XLA-side quotient the activation pre-passes use (``_common.divide_rn``) is the correctly rounded one
    (float64 rounded once) by a broadcast scalar and row scales, in eager, jit and vmap; XLA's own ``/`` by a
    broadcast constant is not always (on XLA:CPU with JAX 0.10.2, 1 ulp off for some of these rows: the reason
    for the helper)."""
    from pallas_kernels._common import divide_rn

    rng = np.random.default_rng(11)
    a = (rng.random((64, 256)).astype(np.float32) + 0.01) * 50
    amax = a.max(axis=1)
    want = (amax.astype(np.float64) / 127).astype(np.float32)
    for fn in (divide_rn, jax.jit(divide_rn)):
        np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(amax), jnp.float32(127.0))), want)
    np.testing.assert_array_equal(np.asarray(jax.vmap(divide_rn, (0, None))(jnp.asarray(amax), 127.0)), want)
    rows = np.asarray(divide_rn(jnp.asarray(a), jnp.asarray(want)[:, None]))
    np.testing.assert_array_equal(rows, (a.astype(np.float64) / want[:, None].astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("high", [True, False])
def test_nf4_lookup_16bit_program_is_the_rounded_table(dtype, high):
    """The two-plane program returns, for every byte value, the NF4 value of its high or low nibble rounded to
    ``dtype`` (results 0-1 in the first register, 2-3 in the second, as Triton unpacks ``<2 x bfloat>`` pairs)."""
    from jaxquant.core.formats import NF4_CODE
    from pallas_kernels._ptx import nf4_lookup, nf4_lookup_asm

    cv = tuple(float(v) for v in NF4_CODE)
    body = [ln for ln in nf4_lookup_asm(cv, high, dtype).splitlines() if ln.strip() not in ("{", "}")]
    assert len(body) - 1 == 14  # instructions per four weights (one line declares registers)
    p = jnp.asarray(np.arange(256).reshape(4, 64), jnp.uint8)
    got = np.asarray(nf4_lookup(p, cv, high, interpret=True, dtype=jnp.dtype(dtype)))
    codes = (np.arange(256) >> 4) if high else (np.arange(256) & 15)
    want = np.asarray(NF4_CODE, np.float32).astype(jnp.dtype(dtype))[codes].reshape(4, 64)
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    with pytest.raises(ValueError, match="dtype"):
        nf4_lookup_asm(cv, high, "float64")
