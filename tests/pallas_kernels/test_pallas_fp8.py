"""fp8 kernels (W8A16 and W8A8 with fused activation quantization): numerics, dispatch, lowering, cubin."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_helpers import assert_compiles, cuda_lowering, rel_err, requires_triton, round_to, shape_struct

import jaxquant as jq
from pallas_kernels._common import BlockConfig
from pallas_kernels.fp8_matmul import fmax, fp8_matmul, fp8_matmul_reference


@pytest.mark.parametrize(
    "m,k,n,fmt,gran,split,dt",
    [(1, 256, 96, "e4m3", "channel", 2, jnp.bfloat16), (17, 200, 80, "e5m2", "tensor", 1, jnp.float32)],
)
def test_w8a16_interpret_matches_float64(m, k, n, fmt, gran, split, dt):
    rng = np.random.default_rng(k + m)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.FP8Scheme(fmt, gran))
    w64 = np.asarray(q.data).astype(np.float64) * np.asarray(q.scale, np.float64)
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    y = fp8_matmul(x, q.data, q.scale, mode="w8a16", config=BlockConfig(16, 32, 64, split), interpret=True)
    bound = {jnp.float32: 1e-5, jnp.bfloat16: 4e-3}[dt]
    assert rel_err(y, np.asarray(x, np.float64) @ round_to(w64, dt)) <= bound


@pytest.mark.parametrize(
    "m,k,n,fmt,variant",
    [
        (3, 256, 96, "e4m3", ""),
        (20, 300, 64, "e5m2", ""),
        (3, 256, 96, "e4m3", "prequant"),  # ragged M (masked fp8 rows), 4 K steps
        (20, 300, 80, "e5m2", "prequant+promote"),  # ragged N, zero-padded K
    ],
)
def test_w8a8_interpret_matches_float64(m, k, n, fmt, variant):
    rng = np.random.default_rng(n + m)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.FP8Scheme(fmt, "channel"))
    xn = rng.standard_normal((m, k)).astype(np.float32)
    cfg = BlockConfig(16, 32, 64, 2 if variant.startswith("prequant") else 1, variant=variant)  # prequant: split-K
    y = fp8_matmul(jnp.asarray(xn), q.data, q.scale, mode="w8a8", config=cfg, interpret=True)
    # float64 model: per-row scale, saturating round-to-nearest fp8 of x / s_x, exact products
    sx = np.abs(xn).max(axis=1, keepdims=True).astype(np.float32) / np.float32(fmax(q.data.dtype))
    xq = np.clip(xn / sx, -fmax(q.data.dtype), fmax(q.data.dtype)).astype(q.data.dtype).astype(np.float64)
    ref = (xq @ np.asarray(q.data).astype(np.float64)) * sx * np.asarray(q.scale, np.float64)[None, :]
    assert rel_err(y, ref) < 1e-5


def test_dispatch_and_w8a8_entry_point():
    rng = np.random.default_rng(4)
    q = jq.quantize(jnp.asarray(rng.standard_normal((128, 64)), jnp.float32), jq.FP8Scheme())
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
    with jq.ops.kernel_mode("interpret"):
        assert jq.ops.explain_qdot(x, q).startswith("kernel: fp8_w8a16")
        y = jax.jit(jq.qdot)(x, q)
        y8 = jax.jit(jq.ops.qdot_fp8_w8a8)(x, q)
    with jq.ops.kernel_mode("off"):
        y0 = jax.jit(jq.qdot)(x, q)
        y80 = jax.jit(jq.ops.qdot_fp8_w8a8)(x, q)
    assert rel_err(y, y0) <= 4e-3
    assert rel_err(y8, y80) <= 4e-3
    assert rel_err(y8, y0) < 0.05  # fp8 activations: an approximation of x @ dequantize(w)


@pytest.mark.parametrize(
    "m,k,n,fmt,gran,bm,split,dt",
    [
        (1, 256, 96, "e4m3", "channel", 1, 2, jnp.bfloat16),
        (5, 200, 80, "e5m2", "tensor", 8, 2, jnp.float32),  # ragged M, K, N
    ],
)
def test_w8a16_gemv_matches_float64_and_xla(m, k, n, fmt, gran, bm, split, dt):
    rng = np.random.default_rng(k + m + 1)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.FP8Scheme(fmt, gran))
    w64 = np.asarray(q.data).astype(np.float64) * np.asarray(q.scale, np.float64)
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    cfg = BlockConfig(bm, 32, 32, split, variant="gemv")
    y = fp8_matmul(x, q.data, q.scale, mode="w8a16", config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == x.dtype
    bound = {jnp.float32: 1e-5, jnp.bfloat16: 4e-3, jnp.float16: 1e-3}[dt]
    assert rel_err(y, np.asarray(x, np.float64) @ round_to(w64, dt)) <= bound
    assert rel_err(y, fp8_matmul_reference(x, q.data, q.scale, mode="w8a16")) <= 2 * bound


def test_w8a8_gemv_matches_reference():
    rng = np.random.default_rng(5)
    q = jq.quantize(jnp.asarray(rng.standard_normal((300, 64)), jnp.float32), jq.FP8Scheme("e4m3", "channel"))
    x = jnp.asarray(rng.standard_normal((3, 300)), jnp.bfloat16)
    y = fp8_matmul(x, q.data, q.scale, mode="w8a8", config=BlockConfig(4, 32, 64, 2, variant="gemv"), interpret=True)
    assert rel_err(y, fp8_matmul_reference(x, q.data, q.scale, mode="w8a8")) <= 4e-3


def _lower(mode, m, k=512, n=256, dtype=jnp.float8_e4m3fn, gemv=False):
    if gemv:
        from pallas_kernels import tuning

        cfg = tuning.gemv_config("fp8_" + mode, m, k, n, sms=132)
    else:
        cfg = BlockConfig(min(m, 128), 64, 128, 2 if m <= 16 else 1)
    args = [shape_struct((m, k), jnp.bfloat16), shape_struct((k, n), dtype), shape_struct((n,), jnp.float32)]
    return cuda_lowering(functools.partial(fp8_matmul, mode=mode, config=cfg), *args)


@pytest.mark.parametrize("mode,m", [("w8a16", 16), ("w8a8", 128)])
def test_lowers_to_triton_custom_call(mode, m):
    assert _lower(mode, m)[0].name == f"fp8_{mode}_matmul"


@requires_triton
@pytest.mark.parametrize(
    "mode,m,gemv", [("w8a16", 16, False), ("w8a8", 16, False), ("w8a16", 1, True), ("w8a8", 4, True)]
)
def test_compiles_to_cubin_sm90(mode, m, gemv):
    """fp8 e4m3 needs sm_89+: compiled for sm_90 only (the kernel does not claim Ampere support)."""
    calls = _lower(mode, m, gemv=gemv)
    assert calls[0].name == f"fp8_{mode}_{'gemv' if gemv else 'matmul'}"
    assert_compiles(calls, archs=(90,))


@requires_triton
@pytest.mark.parametrize(
    "mode,m,k,n,gemv",
    [
        ("w8a16", 5, 640, 320, True),
        ("w8a8", 5, 640, 320, True),
        ("w8a16", 16, 200, 80, False),
        ("w8a8", 3, 200, 80, True),
    ],
)
def test_ragged_shapes_lower_and_compile(mode, m, k, n, gemv):
    """Regression (H100 run, 2026-11-27): a masked fp8 load with a fill value emitted ``tt.splat`` of an i32 to
    fp8, which Pallas cannot lower ("cannot cast ... to f8E4M3FN"): M=5, K=640, N=320 failed. Weight tiles are
    now masked along N without a fill and never along K (K steps divide K, or K is zero-padded)."""
    calls = _lower(mode, m, k=k, n=n, gemv=gemv)
    assert calls[0].name == f"fp8_{mode}_{'gemv' if gemv else 'matmul'}"
    assert_compiles(calls, archs=(90,))


def test_prequant_equals_the_reference_and_rejects_w8a16():
    """The pre-quantized form feeds the reference's own fp8 activations: the products are exact in float32, so for
    a K small enough that every partial sum is exact the result equals the XLA reference bit for bit."""
    rng = np.random.default_rng(8)
    q = jq.quantize(jnp.asarray(rng.standard_normal((64, 96)), jnp.float32), jq.FP8Scheme("e4m3", "channel"))
    x = jnp.asarray(rng.standard_normal((20, 64)), jnp.float32)
    cfg = BlockConfig(16, 32, 32, variant="prequant")
    y = fp8_matmul(x, q.data, q.scale, mode="w8a8", config=cfg, interpret=True)
    y0 = fp8_matmul_reference(x, q.data, q.scale, mode="w8a8")
    assert rel_err(y, y0) <= 1e-6
    with pytest.raises(ValueError, match="w8a8"):
        fp8_matmul(x, q.data, q.scale, mode="w8a16", config=cfg, interpret=True)
    with pytest.raises(ValueError, match="variant"):
        fp8_matmul(x, q.data, q.scale, mode="w8a8", config=BlockConfig(16, 32, 32, variant="tma"), interpret=True)
    with pytest.raises(ValueError, match="w_layout"):
        fp8_matmul(x, q.data, q.scale, mode="w8a8", config=cfg, w_layout="t", interpret=True)
    with pytest.raises(ValueError, match="w_layout"):
        fp8_matmul_reference(x, q.data, q.scale, mode="w8a8", w_layout="NK")
    with pytest.raises(ValueError, match="do not contract"):  # a (K, N) weight passed as (N, K)
        fp8_matmul(x, q.data, q.scale, mode="w8a8", config=cfg, w_layout="nk", interpret=True)


def test_fp8_dot_primitive_outside_kernels():
    """``fp8_dot`` is ``acc + a @ b`` in float32 wherever it runs (here XLA:CPU), in both operand layouts."""
    from pallas_kernels._triton_ext import fp8_dot

    rng = np.random.default_rng(9)
    a = jnp.asarray(rng.standard_normal((8, 32)), jnp.float8_e4m3fn)
    b = jnp.asarray(rng.standard_normal((32, 16)), jnp.float8_e5m2)
    acc = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    want = np.asarray(acc, np.float64) + np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    got = jax.jit(fp8_dot)(a, b, acc)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)
    got_t = jax.jit(functools.partial(fp8_dot, transpose_b=True))(a, b.T, acc)
    np.testing.assert_allclose(np.asarray(got_t, np.float64), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="float8"):
        fp8_dot(a.astype(jnp.bfloat16), b, acc)
    with pytest.raises(ValueError, match="must be"):
        fp8_dot(a, b.T, acc)
    with pytest.raises(ValueError, match="acc"):
        fp8_dot(a, b, acc.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="max_num_imprecise_acc"):
        fp8_dot(a, b, acc, max_num_imprecise_acc=0)


def _lower_w8a8_large(variant: str, bm=128, bn=128, bk=64, warps=8, stages=4):
    cfg = BlockConfig(bm, bn, bk, 1, num_warps=warps, num_stages=stages, variant=variant)
    n, k = 1024, 8192  # a long K loop (short constant loops are unrolled)
    args = [
        shape_struct((512, k), jnp.bfloat16),
        shape_struct((k, n), jnp.float8_e4m3fn),
        shape_struct((n,), jnp.float32),
    ]
    return cuda_lowering(functools.partial(fp8_matmul, mode="w8a8", config=cfg), *args)


@requires_triton
def test_w8a8_runs_on_fp8_tensor_cores_sm90():
    """JAX's Pallas lowering leaves ``maxNumImpreciseAcc`` unset, and Triton then runs fp8 dots as float16
    ``mma.sync`` (``HMMA``) on sm_90; ``fp8_dot`` sets it: fp8 ``wgmma`` (``QGMMA``). ``prequant`` (fp8 activations
    from the XLA pre-pass, K-major weight) leaves a K loop with no exposed load and a fraction of the instructions."""
    from pallas_kernels import _triton_tools as tt
    from pallas_kernels._triton_ext import AVAILABLE, UNAVAILABLE_REASON

    assert AVAILABLE, UNAVAILABLE_REASON

    def profile(variant):
        call = _lower_w8a8_large(variant)[0]
        assert "maxNumImpreciseAcc" in tt.ir_text(call.ir)
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    fused, pre, promote = profile(""), profile("prequant"), profile("prequant+promote")
    for p in (fused, pre, promote):
        assert p.count("QGMMA") > 0 and p.count("HMMA") == 0
    assert pre.exposed_loads == 0 and pre.count("STS") == 0  # no byte-wise transpose of the weight tile
    assert pre.instructions <= 0.3 * fused.instructions, (pre.instructions, fused.instructions)
    assert pre.instructions < promote.instructions  # promotion adds the per-step float32 additions


def test_heuristic_large_m_w8a8_is_prequant_and_dispatch_matches_the_reference():
    from pallas_kernels import tuning

    cfg = tuning.heuristic("fp8_w8a8", 4096, 8192, 8192, sms=132)
    assert cfg.variant == "prequant" and (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps) == (128, 128, 64, 8)
    assert tuning.heuristic("fp8_w8a8", 16, 8192, 8192, sms=132).variant == ""
    rng = np.random.default_rng(12)
    q = jq.quantize(jnp.asarray(rng.standard_normal((256, 128)), jnp.float32), jq.FP8Scheme("e4m3", "channel"))
    x = jnp.asarray(rng.standard_normal((300, 256)), jnp.bfloat16)  # M > 256: the heuristic's prequant tile
    with jq.ops.kernel_mode("interpret"):
        y = jax.jit(jq.ops.qdot_fp8_w8a8)(x, q)
    with jq.ops.kernel_mode("off"):
        y0 = jax.jit(jq.ops.qdot_fp8_w8a8)(x, q)
    assert rel_err(y, y0) <= 4e-3  # the same fp8 activations and products; bf16 output rounding


@pytest.mark.parametrize(
    "mode,variant,m,k",
    [
        ("w8a16", "", 5, 256),
        ("w8a16", "gemv", 1, 256),
        ("w8a16", "", 3, 200),  # K without a power-of-two step: zero-padded along the stored K axis
        ("w8a8", "", 20, 256),
        ("w8a8", "gemv", 2, 256),
        ("w8a8", "prequant", 20, 300),
        ("w8a8", "prequant+promote", 3, 256),
    ],
)
def test_kmajor_storage_gives_the_same_result_bit_for_bit(mode, variant, m, k):
    """``FP8Scheme(layout="nk")`` (codes stored ``(N, K)``, the layout fp8 ``wgmma`` reads): every variant gives
    the ``(K, N)`` storage's output bit for bit (the same products and float32 sums), ragged M and N included."""
    rng = np.random.default_rng(m * k)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, 80)), jnp.float32), jq.FP8Scheme("e4m3", "channel"))
    q_nk = jq.relayout(q, "nk")
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    bm = 8 if variant == "gemv" else 16
    cfg = BlockConfig(bm, 32, 64, 2, variant=variant)
    y = fp8_matmul(x, q.data, q.scale, mode=mode, config=cfg, interpret=True)
    y_nk = fp8_matmul(x, q_nk.data, q_nk.scale, mode=mode, config=cfg, w_layout="nk", interpret=True)
    np.testing.assert_array_equal(np.asarray(y_nk), np.asarray(y))
    ref = fp8_matmul_reference(x, q_nk.data, q_nk.scale, mode=mode, w_layout="nk")
    assert rel_err(y_nk, ref) <= 4e-3


def test_kmajor_storage_prequant_copies_nothing_per_call():
    """``prequant`` reads a K-major weight: from ``(K, N)`` storage XLA transposes the whole weight in every call,
    from ``(N, K)`` storage (``FP8Scheme(layout="nk")``) nothing is transposed (the CUDA lowering's StableHLO)."""
    from pallas_kernels import _triton_tools as tt

    cfg = BlockConfig(128, 128, 64, 1, num_warps=8, num_stages=4, variant="prequant")
    x = shape_struct((512, 1024), jnp.bfloat16)
    sw = shape_struct((256,), jnp.float32)

    def hlo(layout, shape):
        fn = functools.partial(fp8_matmul, mode="w8a8", config=cfg, w_layout=layout)
        return tt.export_cuda(fn, x, shape_struct(shape, jnp.float8_e4m3fn), sw)

    assert "stablehlo.transpose" in hlo("kn", (1024, 256))
    assert "stablehlo.transpose" not in hlo("nk", (256, 1024))


@requires_triton
def test_kmajor_storage_small_m_has_no_byte_loads_sm90():
    """At M = 16 (``mma.sync``) a ``(K, N)`` fp8 tile is read from shared memory byte by byte (``LDS.U8``); stored
    ``(N, K)`` it is read by ``ldmatrix`` (sm_90 machine code of the 16x64x128 W8A16 and W8A8 tiles)."""
    from pallas_kernels import _triton_tools as tt

    cfg = BlockConfig(16, 64, 128, 4, num_warps=4, num_stages=4)
    k = n = 8192

    def profile(mode, layout):
        w = shape_struct((n, k) if layout == "nk" else (k, n), jnp.float8_e4m3fn)
        fn = functools.partial(fp8_matmul, mode=mode, config=cfg, w_layout=layout)
        call = cuda_lowering(fn, shape_struct((16, k), jnp.bfloat16), w, shape_struct((n,), jnp.float32))[-1]
        return tt.k_loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages), k // (128 * 4))

    for mode in ("w8a16", "w8a8"):
        kn, nk = profile(mode, "kn"), profile(mode, "nk")
        assert kn.count("LDS.U8") >= 32 and nk.count("LDS.U8") == 0, mode
        assert nk.instructions < kn.instructions, (mode, nk.instructions, kn.instructions)


@pytest.mark.parametrize("variant,m", [("", 20), ("gemv", 3), ("prequant", 20)])
@pytest.mark.parametrize("per_row", [False, True])
def test_given_activation_scales_saturate_as_float64(variant, m, per_row):
    """``x_scale=``: given scales (a per-tensor static / delayed scale, or one per row) replace the row absmax; a
    scale below ``amax / FMAX`` saturates the large activations at ``+-FMAX`` in the kernel as in float64."""
    rng = np.random.default_rng(m + per_row)
    k, n = 256, 80
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.FP8Scheme("e4m3", "channel"))
    xn = (rng.standard_normal((m, k)) * 4).astype(np.float32)
    f = fmax(q.data.dtype)
    sx = (rng.uniform(0.5, 1.5, m) if per_row else np.full(m, 1.0)).astype(np.float32) * np.float32(6.0 / f)
    assert (np.abs(xn) > 6.0 * 1.5).any()  # some activations do saturate
    cfg = BlockConfig(8 if variant == "gemv" else 16, 32, 64, 2, variant=variant)
    x_scale = jnp.asarray(sx) if per_row else jnp.float32(sx[0])
    y = fp8_matmul(jnp.asarray(xn), q.data, q.scale, mode="w8a8", config=cfg, x_scale=x_scale, interpret=True)
    y0 = fp8_matmul_reference(jnp.asarray(xn), q.data, q.scale, mode="w8a8", x_scale=x_scale)
    xq = np.clip(xn / sx[:, None], -f, f).astype(q.data.dtype).astype(np.float64)
    ref = (xq @ np.asarray(q.data).astype(np.float64)) * sx[:, None] * np.asarray(q.scale, np.float64)[None, :]
    assert rel_err(y, ref) < 1e-5 and rel_err(y0, ref) < 1e-5
    # the row absmax scales give a different (unsaturated) result: the given scales were used
    assert rel_err(fp8_matmul_reference(jnp.asarray(xn), q.data, q.scale, mode="w8a8"), ref) > 1e-3


def test_given_activation_scales_are_checked():
    rng = np.random.default_rng(13)
    q = jq.quantize(jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), jq.FP8Scheme("e4m3", "channel"))
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    cfg = BlockConfig(16, 32, 32)
    with pytest.raises(ValueError, match="one scale per row"):
        fp8_matmul(x[0], q.data, q.scale, mode="w8a8", config=cfg, x_scale=jnp.ones(2), interpret=True)
    with pytest.raises(ValueError, match="mode 'w8a8'"):
        fp8_matmul(x[0], q.data, q.scale, mode="w8a16", config=cfg, x_scale=jnp.float32(1), interpret=True)
    with pytest.raises(ValueError, match="shape"):
        jq.ops.qdot_fp8_w8a8(x, q, x_scale=jnp.ones(6))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive and finite"):
            jq.ops.qdot_fp8_w8a8(x, q, x_scale=bad)
    # one scale per row over the leading axes, and under jit (no concrete check there)
    sx = jnp.asarray(rng.uniform(0.01, 0.02, (2, 3)), jnp.float32)
    y = jax.jit(jq.ops.qdot_fp8_w8a8)(x, q, sx)
    want = fp8_matmul_reference(x.reshape(6, 64), q.data, q.scale, mode="w8a8", x_scale=sx.reshape(6))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want).reshape(2, 3, 32))
