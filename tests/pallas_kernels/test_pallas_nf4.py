"""NF4 kernel (bitsandbytes layout, optional double quant): interpret numerics, dispatch, lowering, cubin."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_helpers import NF4_VALUES, assert_compiles, cuda_lowering, rel_err, requires_triton, round_to, shape_struct

import jaxquant as jq
from jaxquant.core.formats import NF4_CODE
from jaxquant.schemes.nf4 import DYNAMIC_CODE
from pallas_kernels._common import BlockConfig
from pallas_kernels.nf4_matmul import NF4Layout, nf4_matmul, nf4_matmul_reference, supported

CODE_VALS = tuple(float(v) for v in NF4_CODE)


def np_dequant(q, k, n, block, dq):
    """Float64 NumPy NF4 dequantization from the bitsandbytes layout definition (W.T flattened, high nibble
    first, one absmax per block of ``block`` values)."""
    d = np.asarray(q.data).astype(np.int64)
    codes = np.empty(d.size * 2, np.int64)
    codes[0::2], codes[1::2] = d >> 4, d & 15
    vals = NF4_VALUES.astype(np.float64)[codes[: k * n]]
    if dq:
        qa = np.asarray(q.scale).astype(np.int64)
        a2 = np.asarray(q.aux["absmax_scale"], np.float32)
        absmax = (DYNAMIC_CODE[qa] * np.repeat(a2, 256)[: qa.size]).astype(np.float32) + np.float32(
            q.aux["absmax_offset"]
        )
    else:
        absmax = np.asarray(q.scale, np.float32)
    wt = vals.reshape(-1, block) * absmax.astype(np.float64)[:, None]
    return wt.reshape(n, k).T


def test_code_table_is_bitsandbytes():
    np.testing.assert_array_equal(np.asarray(NF4_CODE), NF4_VALUES)


# (m, k, n, double_quant, variant, split_k, block_k, x dtype)
CASES = [
    (1, 256, 96, False, "lut", 2, 128, jnp.bfloat16),
    (5, 192, 80, True, "select", 1, 64, jnp.float32),  # ragged N, 3 blocks per column
    (17, 128, 64, True, "lut-interleave", 1, 128, jnp.float16),
    (1, 256, 96, False, "select-gemv", 1, 128, jnp.bfloat16),  # two blocks per K step
    (5, 192, 80, True, "select-gemv", 3, 64, jnp.float32),  # ragged M (block_m 8) and N, double quant
    (5, 192, 80, True, "select-split", 1, 64, jnp.float32),  # contiguous tile, masked ragged M (no padding)
    (17, 256, 96, False, "lut-split", 2, 128, jnp.bfloat16),
    (5, 192, 80, False, "select-split-gemv", 3, 64, jnp.float16),
    # byte-permute lookup (inline PTX, run by its emulator in interpret mode)
    (1, 256, 96, False, "prmt", 2, 128, jnp.bfloat16),
    (5, 192, 80, True, "prmt-split", 1, 64, jnp.float32),
    (17, 128, 64, False, "prmt-interleave", 1, 128, jnp.float16),
    (5, 192, 80, True, "prmt-split-gemv", 3, 64, jnp.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}dq{int(c[3])}{c[4]}")
def test_interpret_matches_float64(case):
    m, k, n, dq, variant, split, bk, dt = case
    rng = np.random.default_rng(k + n + m)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.NF4Scheme(64, double_quant=dq))
    w64 = np_dequant(q, k, n, 64, dq)
    np.testing.assert_allclose(w64, np.asarray(jax.jit(jq.dequantize)(q), np.float64), rtol=1e-7, atol=1e-7)
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    extra = (q.aux["absmax_scale"], q.aux["absmax_offset"], DYNAMIC_CODE) if dq else ()
    layout = NF4Layout(k=k, n=n, block=64, double_quant=dq)
    y = nf4_matmul(
        x,
        q.data,
        q.scale,
        NF4_CODE,
        *extra,
        layout=layout,
        config=BlockConfig(8 if variant.endswith("gemv") else 16, 32, bk, split, variant=variant),
        code_vals=CODE_VALS,
        interpret=True,
    )
    bound = {jnp.float32: 1e-5, jnp.bfloat16: 4e-3, jnp.float16: 1e-3}[dt]
    assert y.shape == (m, n)
    assert rel_err(y, np.asarray(x, np.float64) @ round_to(w64, dt)) <= bound


def test_select_tree_reads_both_nibbles_in_place():
    """The bit tree picks T[code] for every code, from either nibble of a byte, without extracting it."""
    from pallas_kernels.nf4_matmul import _select_lut

    byte = jnp.arange(256, dtype=jnp.int32)
    np.testing.assert_array_equal(_select_lut(byte, CODE_VALS, 4), NF4_VALUES[np.arange(256) >> 4])
    np.testing.assert_array_equal(_select_lut(byte, CODE_VALS, 0), NF4_VALUES[np.arange(256) & 15])


def test_heuristic_small_m_is_the_select_dot_and_gemv_configs_stay_valid():
    """Unmeasured devices take the 16-row ``select-split`` dot kernel at every small M (its sm_90 K loop has the
    lower static issue floor at M = 1..8); ``gemv_config("nf4", ...)`` gives the GEMV for sweeps and benchmarks.
    The H100/H200 table keeps its measured GEMV row at M=1 and the dot kernel from M=2."""
    from pallas_kernels import tuning

    layout = NF4Layout(k=8192, n=8192)
    for m in (1, 2, 3, 8, 16):
        cfg = tuning.heuristic("nf4", m, 8192, 8192, sms=132)
        assert cfg.variant == "select-split" and cfg.block_m == 16 and supported(layout, cfg, jnp.bfloat16) is None
        if m <= 8:
            g = tuning.gemv_config("nf4", m, 8192, 8192, sms=132)
            assert g.variant == "select-split-gemv" and g.block_m >= m and g.split_k > 1
            assert supported(layout, g, jnp.bfloat16) is None
    for dev in ("h100", "h200"):
        assert tuning.get_config("nf4", 1, 8192, 8192, device=dev).variant == "select-gemv"
        assert tuning.get_config("nf4", 2, 8192, 8192, device=dev).variant == "select"
        assert "lut" not in tuning.get_config("nf4", 4, 8192, 8192, device=dev).variant


def test_unknown_variant_is_rejected():
    why = supported(NF4Layout(k=256, n=64), BlockConfig(variant="select-strided"), jnp.bfloat16)
    assert why is not None and "variant" in why


@requires_triton
def test_split_k_loops_have_fewer_exposed_loads_sm90():
    """sm_90 K loops: the strided activation loads of ``select`` (16 per step at this tile) and the 2-byte ones of
    ``select-gemv`` are global loads used in the same step; ``select-split`` loads through the pipeline (none),
    ``select-split-gemv`` with 128-bit loads (several times fewer)."""
    from pallas_kernels import _triton_tools as tt

    def loop(variant, m):
        call = _lower(False, variant, m, k=2048, n=512)[0]
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    dot, dot_split = loop("select", 16), loop("select-split", 16)
    assert dot.exposed_loads >= 8 and dot_split.exposed_loads == 0, (dot.exposed_loads, dot_split.exposed_loads)
    assert dot_split.instructions <= dot.instructions
    gemv, gemv_split = loop("select-gemv", 1), loop("select-split-gemv", 1)
    assert gemv_split.exposed_loads * 3 <= gemv.exposed_loads, (gemv.exposed_loads, gemv_split.exposed_loads)


@pytest.mark.parametrize("variant", ["prmt-split", "prmt-split-gemv", "select-split"])
@pytest.mark.parametrize("dq", [False, True])
def test_weights_bit_identical_to_the_xla_path(variant, dq):
    """One-hot activation rows return the dequantized weights themselves (one nonzero product per sum): the
    byte-permute lookup (its PTX run by the emulator) and the select tree give the XLA path's weights bit for bit."""
    k, n = 128, 64
    rng = np.random.default_rng(11)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.NF4Scheme(64, double_quant=dq))
    extra = (q.aux["absmax_scale"], q.aux["absmax_offset"], DYNAMIC_CODE) if dq else ()
    layout = NF4Layout(k=k, n=n, block=64, double_quant=dq)
    eye = jnp.eye(k, dtype=jnp.bfloat16)
    cfg = BlockConfig(8 if variant.endswith("gemv") else 16, 32, 64, 1, variant=variant)
    got = nf4_matmul(
        eye, q.data, q.scale, NF4_CODE, *extra, layout=layout, config=cfg, code_vals=CODE_VALS, interpret=True
    )
    want = nf4_matmul_reference(eye, q.data, q.scale, layout, NF4_CODE, *extra)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@requires_triton
def test_prmt_k_loop_needs_fewer_instructions_sm90():
    """sm_90 K loops at the H100 table's dot tile (16x64x128) and GEMV tile: the byte-permute lookup replaces the
    select tree (no ``FSEL`` left) with far fewer instructions per trip."""
    from pallas_kernels import _triton_tools as tt

    def loop(variant, m):
        call = _lower(False, variant, m, k=2048, n=512)[0]
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    for sel, prmt, m in (("select-split", "prmt-split", 16), ("select-split-gemv", "prmt-split-gemv", 1)):
        a, b = loop(sel, m), loop(prmt, m)
        assert b.count("FSEL") == 0 and b.count("PRMT") > 0
        assert b.instructions <= 0.75 * a.instructions, (sel, a.instructions, b.instructions)


@pytest.mark.parametrize(
    "m,k,n,dq,variant,split,bk,dt",
    [
        (1, 256, 96, False, "prmt16-split", 2, 128, jnp.bfloat16),  # one (BN, 2) absmax load per K step
        (5, 192, 80, True, "prmt16-split", 1, 64, jnp.float16),  # double quant, ragged M and N
        (17, 512, 64, False, "prmt16", 1, 256, jnp.bfloat16),  # strided activation loads
    ],
)
def test_prmt16_postscale_matches_its_float64_model(m, k, n, dq, variant, split, bk, dt):
    """``prmt16*``: table values rounded to the activation dtype, the block absmax applied to each block's partial
    product. Within an output rounding of the float64 value of exactly that product, and within the weight
    rounding (which it moves, like int4 ``+postscale``) of the XLA path."""
    rng = np.random.default_rng(m + k + dq)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.NF4Scheme(64, double_quant=dq))
    extra = (q.aux["absmax_scale"], q.aux["absmax_offset"], DYNAMIC_CODE) if dq else ()
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    layout = NF4Layout(k=k, n=n, block=64, double_quant=dq)
    cfg = BlockConfig(16, 32, bk, split, variant=variant)
    y = nf4_matmul(x, q.data, q.scale, NF4_CODE, *extra, layout=layout, config=cfg, code_vals=CODE_VALS, interpret=True)
    d = np.asarray(q.data).astype(np.int64)
    codes = np.empty(d.size * 2, np.int64)
    codes[0::2], codes[1::2] = d >> 4, d & 15
    table = np.asarray(NF4_CODE, np.float32).astype(jnp.dtype(dt)).astype(np.float64)
    absmax = np.asarray(q.scheme.absmax(q), np.float64)
    w_model = (table[codes].reshape(-1, 64) * absmax[:, None]).reshape(n, k).T
    bound = {jnp.bfloat16: 4e-3, jnp.float16: 5e-4}[dt]
    assert rel_err(y, np.asarray(x, np.float64) @ w_model) <= bound
    assert rel_err(y, nf4_matmul_reference(x, q.data, q.scale, layout, NF4_CODE, *extra)) <= 2.5 * bound
    assert "float16 only" in supported(layout, cfg, jnp.float32)


@requires_triton
def test_prmt16_k_loop_sm90():
    """sm_90 K loop of the 16x64x128 tile: 16-bit table lookups and no per-weight scale or rounding: well under
    the float32 ``prmt-split`` loop, with the absmax row as one load per step."""
    from pallas_kernels import _triton_tools as tt

    def loop(variant):
        call = _lower(False, variant, 16, k=8192, n=1024)[0]
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    f32, b16 = loop("prmt-split"), loop("prmt16-split")
    assert b16.instructions <= 0.6 * f32.instructions, (f32.instructions, b16.instructions)
    assert b16.count("FMUL") < f32.count("FMUL") and b16.count("F2FP") == 0 and b16.exposed_loads <= 1
    assert_compiles(_lower(True, "prmt16-split", 16), archs=(90, 80))


def test_prmt_needs_byte_codes():
    layout = NF4Layout(k=128, n=64)
    with pytest.raises(ValueError, match="byte codes"):
        nf4_matmul(
            jnp.ones((1, 128), jnp.bfloat16),
            jnp.zeros((64 * 64,), jnp.int32),
            jnp.ones((128,), jnp.float32),
            NF4_CODE,
            layout=layout,
            config=BlockConfig(16, 32, 64, 1, variant="prmt-split"),
            code_vals=CODE_VALS,
            interpret=True,
        )


def test_dispatch_equals_xla_path():
    rng = np.random.default_rng(1)
    q = jq.quantize(jnp.asarray(rng.standard_normal((128, 48)), jnp.float32), jq.NF4Scheme(double_quant=True))
    x = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.bfloat16)
    with jq.ops.kernel_mode("interpret"):
        assert jq.ops.explain_qdot(x, q).startswith("kernel: nf4")
        y = jax.jit(jq.qdot)(x, q)
    with jq.ops.kernel_mode("off"):
        y0 = jax.jit(jq.qdot)(x, q)
    assert y.shape == (2, 3, 48)
    assert rel_err(y, y0) <= 4e-3


def test_unsupported_falls_back():
    assert supported(NF4Layout(k=100, n=8), BlockConfig(), jnp.bfloat16)  # blocks would span two columns
    q = jq.quantize(jnp.ones((100, 8), jnp.float32), jq.NF4Scheme())
    with jq.ops.kernel_mode("interpret"):
        assert jq.ops.explain_qdot(jnp.ones((1, 100), jnp.bfloat16), q).startswith("xla: K=100")


def _weight_args(k, n, dq):
    """Shapes of the NF4 kernels' weight operands: codes, absmax, the table (and the double-quant ones)."""
    nb = k * n // 64
    args = [
        shape_struct((k * n // 2,), jnp.uint8),
        shape_struct((nb,), jnp.uint8 if dq else jnp.float32),
        shape_struct((16,), jnp.float32),
    ]
    if dq:
        args += [
            shape_struct((nb // 256,), jnp.float32),
            shape_struct((), jnp.float32),
            shape_struct((256,), jnp.float32),
        ]
    return args


def _lower(dq, variant, m, k=512, n=256):
    layout = NF4Layout(k=k, n=n, double_quant=dq)
    args = [shape_struct((m, k), jnp.bfloat16), *_weight_args(k, n, dq)]
    cfg = BlockConfig(min(m, 8 if variant.endswith("gemv") else 64), 64, 128, 2, variant=variant)
    return cuda_lowering(functools.partial(nf4_matmul, layout=layout, config=cfg, code_vals=CODE_VALS), *args)


@pytest.mark.parametrize("dq,variant,m", [(False, "lut", 16), (True, "select", 16), (False, "lut-interleave", 128)])
def test_lowers_to_triton_custom_call(dq, variant, m):
    assert _lower(dq, variant, m)[0].name == "nf4_matmul"


@requires_triton
@pytest.mark.parametrize(
    "dq,variant,m",
    [
        (True, "lut", 16),
        (False, "select-interleave", 128),
        (False, "select-gemv", 1),
        (True, "select-gemv", 4),
        (True, "select-split", 16),
        (False, "select-split-gemv", 1),
        (True, "prmt-split", 16),
        (False, "prmt-split-gemv", 1),
    ],
)
def test_compiles_to_cubin_sm90_sm80(dq, variant, m):
    calls = _lower(dq, variant, m)
    assert calls[0].name == ("nf4_gemv" if variant.endswith("gemv") else "nf4_matmul")
    assert_compiles(calls, archs=(90, 80))


# ---------------------------------------------------------------------------------------------------------------
# dequantization kernel (large M: dequantize once, then the dense dot)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lookup", ["select", "lut", "prmt"])
@pytest.mark.parametrize("dq", [False, True])
def test_dequantize_kernel_bit_identical_to_the_xla_path(lookup, dq):
    """``nf4_dequantize`` returns exactly ``dequantize(w).astype(dt)`` for float32 and bfloat16 stored weights and
    every activation dtype (double quantization too: its absmax product is rounded before the offset is added)."""
    from jaxquant.core.api import dequantize
    from pallas_kernels.nf4_matmul import nf4_dequantize

    rng = np.random.default_rng(5 + dq)
    k, n = 256, 256
    layout = NF4Layout(k=k, n=n, block=64, double_quant=dq)
    for w_dt in (jnp.float32, jnp.bfloat16):
        q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), w_dt), jq.NF4Scheme(64, double_quant=dq))
        extra = (q.aux["absmax_scale"], q.aux["absmax_offset"], DYNAMIC_CODE) if dq else ()
        for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
            w_dtype = None if jnp.dtype(w_dt) in (jnp.dtype(jnp.float32), jnp.dtype(dt)) else jnp.dtype(w_dt).name
            got = nf4_dequantize(
                q.data, q.scale, NF4_CODE, *extra, layout=layout, out_dtype=dt, code_vals=CODE_VALS,
                w_dtype=w_dtype, lookup=lookup, interpret=True,
            )  # fmt: skip
            assert got.dtype == dt and got.shape == (k, n)
            want = dequantize(q).astype(dt)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
            if w_dt == jnp.float32 and dt == jnp.float32:  # the layout understood: float64 NumPy from its definition
                np.testing.assert_allclose(np.asarray(got, np.float64), np_dequant(q, k, n, 64, dq), rtol=1e-6)


def test_qdot_dequant_dot_nf4_equals_the_xla_path():
    from jaxquant.ops import _dequant_kernel_name, kernel_mode, qdot_dequant_dot

    rng = np.random.default_rng(2)
    q = jq.quantize(jnp.asarray(rng.standard_normal((256, 128)), jnp.float32), jq.NF4Scheme(double_quant=True))
    assert _dequant_kernel_name(q) == "nf4"
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
    with kernel_mode("interpret"):
        assert "pallas_call" in str(jax.make_jaxpr(qdot_dequant_dot)(x, q))
        y = jax.jit(qdot_dequant_dot)(x, q)
    with kernel_mode("off"):
        y0 = jax.jit(jq.qdot)(x, q)
    assert y.shape == (2, 3, 128)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))


def test_dequantize_kernel_rejects_partial_tiles_and_falls_back():
    from jaxquant.ops import kernel_mode, qdot_dequant_dot
    from pallas_kernels.nf4_matmul import dequantize_supported, nf4_dequantize

    assert "multiple" in dequantize_supported(NF4Layout(k=192, n=128))
    assert "block size" in dequantize_supported(NF4Layout(k=256, n=128, block=48))
    q = jq.quantize(jnp.ones((192, 128), jnp.float32), jq.NF4Scheme())
    with pytest.raises(ValueError, match="unsupported"):
        nf4_dequantize(
            q.data, q.scale, NF4_CODE, layout=NF4Layout(192, 128), out_dtype=jnp.bfloat16, code_vals=CODE_VALS
        )
    with pytest.raises(ValueError, match="lookup"):
        nf4_dequantize(
            q.data, q.scale, NF4_CODE, layout=NF4Layout(256, 128), out_dtype=jnp.bfloat16, code_vals=CODE_VALS,
            lookup="table",
        )  # fmt: skip
    x = jnp.ones((2, 192), jnp.bfloat16)
    with kernel_mode("interpret"):
        assert "pallas_call" not in str(jax.make_jaxpr(qdot_dequant_dot)(x, q))
        y = qdot_dequant_dot(x, q)
    with kernel_mode("off"):
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jq.qdot(x, q), np.float32))
    with kernel_mode("on"), pytest.raises(ValueError, match="no dequantization kernel"):
        qdot_dequant_dot(x, q)


def _lower_dequant(dq: bool, lookup: str, k=512, n=256):
    from pallas_kernels.nf4_matmul import nf4_dequantize

    args = _weight_args(k, n, dq)
    fn = functools.partial(
        nf4_dequantize, layout=NF4Layout(k=k, n=n, double_quant=dq), out_dtype=jnp.bfloat16, code_vals=CODE_VALS,
        lookup=lookup,
    )  # fmt: skip
    return cuda_lowering(fn, *args)


@requires_triton
@pytest.mark.parametrize("dq,lookup", [(False, "select"), (True, "select"), (True, "prmt")])
def test_dequantize_kernel_compiles_sm90_sm80(dq, lookup):
    calls = _lower_dequant(dq, lookup)
    assert [c.name for c in calls] == ["nf4_dequantize"]
    assert_compiles(calls, archs=(90, 80))


@requires_triton
def test_double_quant_absmax_is_not_contracted_into_an_fma_sm90():
    """The XLA path rounds ``D[q] * a2`` before adding the offset; Triton would contract ``a * b + c`` into one
    ``FFMA`` (one rounding, a different absmax in the last bit). The kernels' absmax keeps the separate rounding."""
    from pallas_kernels import _triton_tools as tt

    call = _lower_dequant(True, "select")[0]
    code = tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages)
    assert "FFMA" not in code and "FADD" in code
