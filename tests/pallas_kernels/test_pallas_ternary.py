"""Ternary kernels (W1.58A16 and W1.58A8), both packings: numerics, dispatch, lowering, cubin."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_helpers import (
    assert_compiles,
    cuda_lowering,
    np_unpack_rows,
    rel_err,
    requires_triton,
    round_to,
    shape_struct,
)

import jaxquant as jq
from pallas_kernels._common import BlockConfig
from pallas_kernels.ternary_matmul import supported, ternary_matmul, ternary_matmul_reference


def np_ternary(q, k, n, gran):
    """Float64 ternary values ``t`` from the 2-bit packing (along K per channel, row-major flat per tensor)."""
    if gran == "channel":
        return np_unpack_rows(np.asarray(q.data), 2, k).astype(np.float64) - 1
    flat = np_unpack_rows(np.asarray(q.data), 2, k * n)
    return flat.reshape(k, n).astype(np.float64) - 1


def _a8_case(m, k, n, dt, seed):
    """Per-channel ternary weights and ``(M, K)`` activations for the W1.58A8 quantization edge cases: row 0 has
    ``s_x = 1`` and the quotients are exact ties (2.5, -3.5, ...), row 1 is all zero and row 2's maximum sits in
    the last (possibly ragged) K column."""
    rng = np.random.default_rng(seed)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.TernaryScheme("channel"))
    xn = rng.standard_normal((m, k)).astype(np.float32) * 3
    xn[0, :8] = [127.0, 2.5, -3.5, 0.5, -0.5, 126.5, 1.5, -127.0]
    if m > 2:
        xn[1] = 0.0
        xn[2, k - 1] = 50.0
    return q, jnp.asarray(xn, dt)


@pytest.mark.parametrize(
    "m,k,n,gran,mode,split,bk,variant",
    [
        (1, 256, 96, "channel", "w16", 2, 64, ""),
        (17, 200, 80, "tensor", "w16", 1, 64, ""),
        (5, 256, 96, "channel", "a8", 1, 128, ""),
        (2, 300, 64, "tensor", "a8", 3, 64, ""),
        (3, 200, 80, "channel", "w16", 2, 64, "split"),  # ragged M, K, N; contiguous activation tile
        (18, 300, 64, "channel", "a8", 1, 128, "split"),
        (18, 300, 64, "channel", "a8", 2, 128, "split+ptx"),  # inline PTX, run by its emulator
        (1, 512, 96, "channel", "a8", 2, 128, "split+ptx"),
    ],
)
def test_interpret_matches_float64(m, k, n, gran, mode, split, bk, variant):
    rng = np.random.default_rng(m + k + n)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.TernaryScheme(gran))
    t = np_ternary(q, k, n, gran)
    s = np.broadcast_to(np.asarray(q.scale, np.float64), (n,))
    xn = rng.standard_normal((m, k)).astype(np.float32)
    x = jnp.asarray(xn)
    pk = "k" if gran == "channel" else "n"
    cfg = BlockConfig(16, 32, bk, split, variant=variant)
    y = ternary_matmul(x, q.data, q.scale, k=k, n=n, packing=pk, mode=mode, config=cfg, interpret=True)
    if mode == "w16":
        ref = xn.astype(np.float64) @ round_to(t * s[None, :], jnp.float32)
        assert rel_err(y, ref) < 1e-5
    else:
        sx = np.abs(xn).max(axis=1, keepdims=True) / np.float32(127.0)
        xq = np.clip(np.round(xn / sx), -127, 127).astype(np.float64)
        ref = (xq @ t) * sx.astype(np.float64) * s[None, :]
        assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize(
    "m,k,n,gran,mode,bm,split",
    [
        (1, 256, 96, "channel", "w16", 1, 2),
        (5, 200, 80, "channel", "w16", 8, 2),  # ragged M, K, N
        (3, 300, 64, "channel", "a8", 4, 1),
        (2, 256, 64, "tensor", "w16", 2, 2),  # no GEMV path for the flat packing: the dot kernel runs
    ],
)
def test_gemv_matches_float64(m, k, n, gran, mode, bm, split):
    rng = np.random.default_rng(m + k + n + 1)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.TernaryScheme(gran))
    t = np_ternary(q, k, n, gran)
    s = np.broadcast_to(np.asarray(q.scale, np.float64), (n,))
    xn = rng.standard_normal((m, k)).astype(np.float32)
    pk = "k" if gran == "channel" else "n"
    cfg = BlockConfig(bm, 32, 64, split, variant="gemv")
    y = ternary_matmul(jnp.asarray(xn), q.data, q.scale, k=k, n=n, packing=pk, mode=mode, config=cfg, interpret=True)
    assert y.shape == (m, n)
    if mode == "w16":
        ref = xn.astype(np.float64) @ round_to(t * s[None, :], jnp.float32)
    else:
        sx = np.abs(xn).max(axis=1, keepdims=True) / np.float32(127.0)
        xq = np.clip(np.round(xn / sx), -127, 127).astype(np.float64)
        ref = (xq @ t) * sx.astype(np.float64) * s[None, :]
    assert rel_err(y, ref) < 1e-5
    yr = ternary_matmul_reference(jnp.asarray(xn), q.data, q.scale, k=k, n=n, packing=pk, mode=mode)
    assert rel_err(y, yr) < 1e-5


def test_dispatch_and_a8_entry_point():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)
    for gran in ("tensor", "channel"):
        q = jq.quantize(jnp.asarray(rng.standard_normal((128, 64)), jnp.float32), jq.TernaryScheme(gran))
        with jq.ops.kernel_mode("interpret"):
            assert jq.ops.explain_qdot(x, q).startswith("kernel: ternary")
            y = jax.jit(jq.qdot)(x, q)
            y8 = jax.jit(jq.ops.qdot_ternary_a8)(x, q)
        with jq.ops.kernel_mode("off"):
            y0 = jax.jit(jq.qdot)(x, q)
            y80 = jax.jit(jq.ops.qdot_ternary_a8)(x, q)
        assert rel_err(y, y0) <= 4e-3
        assert rel_err(y8, y80) <= 4e-3
    q3 = jq.quantize(jnp.ones((128, 64)), jq.TernaryScheme(packing="base3"))
    with jq.ops.kernel_mode("interpret"):
        assert jq.ops.explain_qdot(x, q3).startswith("xla:")


def _lower(packing, mode, m, k=512, n=256, gemv=False, variant=""):
    data = shape_struct((k // 4, n), jnp.uint8) if packing == "k" else shape_struct((k * n // 4,), jnp.uint8)
    scale = shape_struct((n,) if packing == "k" else (), jnp.float32)
    cfg = BlockConfig(min(m, 128), 64, 128, 2 if m <= 16 else 1, variant=variant)
    if gemv:
        from pallas_kernels import tuning

        cfg = tuning.gemv_config("ternary" if mode == "w16" else "ternary_a8", m, k, n, sms=132)
    fn = functools.partial(ternary_matmul, k=k, n=n, packing=packing, mode=mode, config=cfg)
    return cuda_lowering(fn, shape_struct((m, k), jnp.bfloat16), data, scale)


@pytest.mark.parametrize("packing,mode,m", [("k", "w16", 16), ("n", "w16", 128), ("k", "a8", 16), ("n", "a8", 128)])
def test_lowers_to_triton_custom_call(packing, mode, m):
    assert _lower(packing, mode, m)[0].name == f"ternary_{mode}_matmul"


@requires_triton
@pytest.mark.parametrize("packing,mode,m", [("k", "a8", 16), ("n", "w16", 16)])
def test_compiles_to_cubin_sm90_sm80(packing, mode, m):
    assert_compiles(_lower(packing, mode, m), archs=(90, 80))


@requires_triton
@pytest.mark.parametrize("mode", ["w16", "a8"])
def test_split_variant_compiles_sm90(mode):
    assert_compiles(_lower("k", mode, 16, variant="split"), archs=(90,))


@requires_triton
@pytest.mark.parametrize("mode", ["w16", "a8"])
def test_split_k_loop_has_no_exposed_global_loads_sm90(mode):
    """sm_90 machine code of the K loop (16x64x128 tile, the H100 table's): the default variant's four strided
    activation loads per step are global loads into registers, each stored to shared memory behind a barrier
    and used in the same trip (four exposed memory latencies per trip); ``split`` loads one contiguous tile
    through the software pipeline: no ``LDG`` in the loop, only the pipeline's barriers."""
    from pallas_kernels import _triton_tools as tt

    def loop(variant):
        call = _lower("k", mode, 16, k=2048, n=512, variant=variant)[0]
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    default, split = loop(""), loop("split")
    assert default.exposed_loads >= 4 and default.barriers >= 4, (default.exposed_loads, default.barriers)
    assert split.exposed_loads == 0 and split.barriers <= 2, (split.exposed_loads, split.barriers)


@pytest.mark.parametrize("m,k,n", [(1, 512, 96), (21, 300, 80)])
def test_ptx_variant_bit_identical_to_split(m, k, n):
    """W1.58A8 ``split+ptx`` (int8 weights from the PTX program, emulated) equals ``split`` bit for bit: the
    same int8 operands, exact int32 sums, the same epilogue."""
    rng = np.random.default_rng(m * k)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.TernaryScheme("channel"))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)

    def run(variant):
        cfg = BlockConfig(16, 32, 128, 2, variant=variant)
        return ternary_matmul(x, q.data, q.scale, k=k, n=n, packing="k", mode="a8", config=cfg, interpret=True)

    np.testing.assert_array_equal(np.asarray(run("split+ptx"), np.float32), np.asarray(run("split"), np.float32))
    want = ternary_matmul_reference(x, q.data, q.scale, k=k, n=n, packing="k", mode="a8")
    np.testing.assert_array_equal(np.asarray(run("split+ptx"), np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("variant", ["split+ptx", "split+xq", "split+ptx+xq"])
def test_ptx_and_xq_variants_are_w158a8_k_packing_only(variant):
    cfg = BlockConfig(16, 64, 128, variant=variant)
    assert supported(256, 64, "k", cfg, jnp.bfloat16, "a8") is None
    assert "W1.58A8" in supported(256, 64, "k", cfg, jnp.bfloat16, "w16")
    assert "W1.58A8" in supported(256, 64, "n", cfg, jnp.bfloat16, "a8")


@pytest.mark.parametrize(
    "m,k,n,dt,variant,split",
    [
        (1, 512, 96, jnp.bfloat16, "split+xq", 2),
        (5, 300, 80, jnp.float32, "split+ptx+xq", 1),  # ragged M, K and N
        (21, 512, 64, jnp.float16, "split+ptx+xq", 4),  # two row blocks, split-K (each split finds the row maxima)
    ],
)
def test_in_kernel_activation_quantization_is_the_xla_pre_pass(m, k, n, dt, variant, split):
    """``+xq`` quantizes the activations inside the kernel (row maxima over all of K, correctly rounded divisions,
    ties to even): bit-identical to ``split`` with the XLA pre-pass and to the reference, including exact ties
    (``x / s_x`` = 2.5, -3.5, ...), an all-zero row and a row whose maximum sits in the last ragged K block."""
    q, x = _a8_case(m, k, n, dt, seed=m + k)

    def run(variant):
        cfg = BlockConfig(16, 32, 128, split, variant=variant)
        return ternary_matmul(x, q.data, q.scale, k=k, n=n, packing="k", mode="a8", config=cfg, interpret=True)

    got = np.asarray(run(variant), np.float32)
    np.testing.assert_array_equal(got, np.asarray(run("split"), np.float32))
    want = np.asarray(ternary_matmul_reference(x, q.data, q.scale, k=k, n=n, packing="k", mode="a8"), np.float32)
    if split == 1:
        np.testing.assert_array_equal(got, want)
    else:  # split-K adds float32 partial products acc_i * s_x * s: a float32 rounding from the exact int32 total
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@requires_triton
def test_in_kernel_quantization_uses_exact_division_and_rounding_sm90():
    """The kernel's division is ``div.rn.f32`` (Pallas' ``/`` would be ``div.full.f32``, approximate) and its
    rounding ``cvt.rni``; it compiles for sm_90 and sm_80, and costs instructions in the K loop (the trade against
    the pre-pass launch is for a GPU to time)."""
    from pallas_kernels import _triton_tools as tt
    from pallas_kernels._ptx import DIV_RN_ASM, RINT_ASM

    calls = _lower("k", "a8", 16, variant="split+ptx+xq")
    text = tt.ir_text(calls[0].ir)
    assert DIV_RN_ASM.split()[0] in text and RINT_ASM.split()[0] in text
    assert_compiles(calls, archs=(90, 80))


@requires_triton
def test_ptx_k_loop_halves_the_instructions_sm90():
    """sm_90 K loop of W1.58A8 at the H100 tile: the PTX program's packed int8 fields replace per-element integer
    arithmetic and its repacking into bytes; it compiles for sm_80 too."""
    from pallas_kernels import _triton_tools as tt

    def loop(variant):
        call = _lower("k", "a8", 16, k=2048, n=512, variant=variant)[0]
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    split, ptx = loop("split"), loop("split+ptx")
    assert ptx.instructions <= 0.6 * split.instructions, (split.instructions, ptx.instructions)
    assert ptx.count("IMMA") == split.count("IMMA") > 0 and ptx.exposed_loads == 0
    assert_compiles(_lower("k", "a8", 16, variant="split+ptx"), archs=(90, 80))


def test_heuristic_takes_split_at_small_m():
    """Unmeasured devices: ``split`` (no exposed activation loads) for both modes up to M=16, and for W1.58A8 at
    every M (at M=4096 too its K loop has no exposed load and half the byte stores); valid configs."""
    from pallas_kernels import tuning

    for name, mode in (("ternary", "w16"), ("ternary_a8", "a8")):
        for m in (1, 5, 16):
            cfg = tuning.heuristic(name, m, 8192, 8192, sms=132)
            assert cfg.variant == "split" and supported(8192, 8192, "k", cfg, jnp.bfloat16, mode) is None
    assert tuning.heuristic("ternary", 64, 8192, 8192, sms=132).variant == ""
    for m in (64, 4096):
        cfg = tuning.heuristic("ternary_a8", m, 8192, 8192, sms=132)
        assert cfg.variant == "split" and supported(8192, 8192, "k", cfg, jnp.bfloat16, "a8") is None


def test_unknown_variant_is_rejected():
    why = supported(256, 64, "k", BlockConfig(16, 64, 128, variant="interleave"), jnp.bfloat16, "w16")
    assert why is not None and "variant" in why


@requires_triton
@pytest.mark.parametrize("mode,m", [("w16", 1), ("a8", 4)])
def test_gemv_lowers_and_compiles_sm90(mode, m):
    calls = _lower("k", mode, m, gemv=True)
    assert calls[0].name == "int2_gemv"
    assert_compiles(calls, archs=(90,))


@pytest.mark.parametrize("x_dt,w_dtype", [(jnp.bfloat16, None), (jnp.float16, "bfloat16"), (jnp.float32, None)])
@pytest.mark.parametrize(
    "gran,variant",
    [("channel", ""), ("channel", "split"), ("tensor", ""), ("channel", "split-gemv"), ("channel", "gemv+postscale")],
)
def test_w16_weights_bit_identical_to_the_xla_path(x_dt, w_dtype, gran, variant):
    """One-hot activation rows return the dequantized weights themselves (exact float32 sums): the kernel's
    ``t * round(s)`` in the activation dtype must equal the XLA path's ``round(t * s)`` bit for bit (the
    ``+postscale`` GEMV scales the exact sum of ``x * t`` by the rounded ``s``)."""
    k, n = 256, 64
    rng = np.random.default_rng(5)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)) * 0.37, jnp.float32), jq.TernaryScheme(gran))
    pk = "k" if gran == "channel" else "n"
    eye = jnp.eye(k, dtype=x_dt)
    want = ternary_matmul_reference(eye, q.data, q.scale, k=k, n=n, packing=pk, w_dtype=w_dtype)
    cfg = BlockConfig(8 if "gemv" in variant else 64, 32, 128, 2, variant=variant)
    got = ternary_matmul(eye, q.data, q.scale, k=k, n=n, packing=pk, config=cfg, w_dtype=w_dtype, interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize(
    "m,k,n,dt",
    [(1, 512, 96, jnp.bfloat16), (5, 300, 80, jnp.float32), (8, 256, 64, jnp.float16)],  # ragged K, N; ragged M
)
def test_one_launch_w158a8_gemv_is_the_pre_pass_path(m, k, n, dt):
    """``split-gemv+xq``: the activation quantization inside the GEMV and no split-K give, bit for bit, the GEMV
    after the XLA pre-pass and the reference (exact ties, an all-zero row, a maximum in the last ragged K step),
    and lower to one Triton kernel with no XLA reduction before or after it."""
    from pallas_kernels import _triton_tools as tt
    from pallas_kernels import tuning

    q, x = _a8_case(m, k, n, dt, seed=m + k + 3)
    bm = tuning.gemv_config("ternary_a8", m, k, n, sms=2, variant="split-gemv+xq").block_m
    one = BlockConfig(bm, 16, 128, 1, variant="split-gemv+xq")
    got = ternary_matmul(x, q.data, q.scale, k=k, n=n, packing="k", mode="a8", config=one, interpret=True)
    pre = ternary_matmul(
        x, q.data, q.scale, k=k, n=n, packing="k", mode="a8", config=one.replace(variant="gemv"), interpret=True
    )
    want = ternary_matmul_reference(x, q.data, q.scale, k=k, n=n, packing="k", mode="a8")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(pre, np.float32))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    fn = functools.partial(ternary_matmul, k=k, n=n, packing="k", mode="a8", config=one)
    text = tt.export_cuda(fn, shape_struct((m, k), dt), q.data, q.scale)
    assert len(tt.triton_calls(text)) == 1 and "stablehlo.reduce" not in text


@pytest.mark.parametrize("m,k,n", [(1, 256, 96), (6, 300, 80)])
def test_w16_postscale_gemv_matches_float64(m, k, n):
    rng = np.random.default_rng(m + n)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.TernaryScheme("channel"))
    t = np_ternary(q, k, n, "channel")
    s = np.asarray(q.scale, np.float64)
    xn = rng.standard_normal((m, k)).astype(np.float32)
    for variant in ("gemv+postscale", "split-gemv+postscale"):
        cfg = BlockConfig(8, 32, 64, 2, variant=variant)
        y = ternary_matmul(jnp.asarray(xn), q.data, q.scale, k=k, n=n, packing="k", config=cfg, interpret=True)
        assert rel_err(y, xn.astype(np.float64) @ (t * s[None, :])) < 1e-5, variant


def test_gemv_variants_refuse_what_they_cannot_do():
    gemv = BlockConfig(1, 16, 128, 1, variant="split-gemv+xq")
    assert supported(8192, 8192, "k", gemv, jnp.bfloat16, "a8") is None
    assert "split_k" in supported(8192, 8192, "k", gemv.replace(split_k=2), jnp.bfloat16, "a8")
    assert "W1.58A8" in supported(8192, 8192, "k", gemv, jnp.bfloat16, "w16")
    post = BlockConfig(1, 128, 64, 4, variant="gemv+postscale")
    assert supported(8192, 8192, "k", post, jnp.bfloat16, "w16") is None
    assert "W1.58A16" in supported(8192, 8192, "k", post, jnp.bfloat16, "a8")
    # the float32 sums of int8 x ternary products are exact integers only below 2**24
    assert "exact" in supported(140000, 64, "k", BlockConfig(1, 128, 64, 4, variant="gemv"), jnp.bfloat16, "a8")


def test_one_launch_config_fills_the_gpu_without_split_k():
    from pallas_kernels import tuning

    for variant in ("split-gemv+xq", "dp4a-gemv+xq"):
        cfg = tuning.gemv_config("ternary_a8", 1, 8192, 8192, sms=132, variant=variant)
        assert cfg.split_k == 1 and cfg.block_n == 32 and 8192 // cfg.block_n >= 132 and cfg.variant == variant
        assert supported(8192, 8192, "k", cfg, jnp.bfloat16, "a8") is None
    assert tuning.gemv_config("ternary_a8", 1, 8192, 8192, sms=132, variant="dp4a-gemv").split_k > 1


@requires_triton
@pytest.mark.parametrize("variant", ["split-gemv+xq", "dp4a-gemv+xq", "dp4a-gemv"])
def test_gemvs_compile_sm90_without_spills(variant):
    """The GEMVs at the sweep's shape compile for sm_90 without spills; the integer one also for sm_80 (``dp4a``
    exists since sm_61) and its code holds the ``IDP.4A`` instructions the PTX asks for."""
    from pallas_kernels import tuning

    k, n = 8192, 8192
    cfg = tuning.gemv_config("ternary_a8", 1, k, n, sms=132, variant=variant)
    fn = functools.partial(ternary_matmul, k=k, n=n, packing="k", mode="a8", config=cfg)
    args = shape_struct((1, k), jnp.bfloat16), shape_struct((k // 4, n), jnp.uint8), shape_struct((n,), jnp.float32)
    calls = cuda_lowering(fn, *args)
    reports = assert_compiles(calls, archs=(90, 80) if variant.startswith("dp4a") else (90,))
    assert all(r.spill_bytes == 0 for r in reports), reports
    if variant.startswith("dp4a"):
        from pallas_kernels import _triton_tools as tt

        call = next(c for c in calls if c.name == "ternary_dp4a_gemv")
        assert "IDP.4A" in tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages)


@pytest.mark.parametrize(
    "m,k,n,dt,variant,bm,split",
    [
        (1, 512, 96, jnp.bfloat16, "dp4a-gemv", 1, 2),
        (3, 300, 80, jnp.float32, "dp4a-gemv", 4, 1),  # ragged M, K (a partial byte) and N
        (8, 256, 64, jnp.float16, "dp4a-gemv", 8, 2),
        (1, 300, 80, jnp.bfloat16, "dp4a-gemv+xq", 1, 1),
        (5, 512, 64, jnp.float32, "dp4a-gemv+xq", 8, 1),
    ],
)
def test_dp4a_gemv_is_bit_identical_to_the_reference(m, k, n, dt, variant, bm, split):
    """The integer GEMV (inline PTX code spreading and ``dp4a``, run by the emulator) gives the reference's int32
    product scaled as it scales it, bit for bit: exact ties, an all-zero row, a maximum in the last ragged K
    rows; ``+xq`` in one Triton kernel with no XLA reduction around it."""
    from pallas_kernels import _triton_tools as tt

    q, x = _a8_case(m, k, n, dt, seed=m * 31 + k)
    cfg = BlockConfig(bm, 32, 64, split, variant=variant)
    got = ternary_matmul(x, q.data, q.scale, k=k, n=n, packing="k", mode="a8", config=cfg, interpret=True)
    want = ternary_matmul_reference(x, q.data, q.scale, k=k, n=n, packing="k", mode="a8")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    if variant.endswith("+xq"):
        fn = functools.partial(ternary_matmul, k=k, n=n, packing="k", mode="a8", config=cfg)
        text = tt.export_cuda(fn, shape_struct((m, k), dt), q.data, q.scale)
        assert len(tt.triton_calls(text)) == 1 and "stablehlo.reduce" not in text


def test_dp4a_gemv_is_w158a8_only():
    cfg = BlockConfig(1, 128, 64, 4, variant="dp4a-gemv")
    assert supported(8192, 8192, "k", cfg, jnp.bfloat16, "a8") is None
    assert "W1.58A8" in supported(8192, 8192, "k", cfg, jnp.bfloat16, "w16")
    assert "W1.58A8" in supported(8192, 8192, "n", cfg, jnp.bfloat16, "a8")


def test_w158a8_gemvs_bit_identical_on_real_smollm2_layers(monkeypatch):
    """Real data: SmolLM2-135M's layer-5 MLP weights, ternary-quantized per channel, and activations from real
    text (the token embeddings of the evaluation text, and the MLP's own hidden activations from them): through
    ``jq.ops.qdot_ternary_a8`` in interpret mode, the integer and one-launch GEMVs equal jaxquant's XLA path bit for
    bit."""
    from jaxquant.eval import assets
    from jaxquant.models import load_gguf
    from pallas_kernels import tuning

    _, params, tok = load_gguf(assets.model_path())
    text = open(assets.wiki_path(), encoding="utf-8", errors="ignore").read()[:2000]
    x0 = jnp.asarray(params["embed"]["embedding"], jnp.float32)[jnp.asarray(tok.encode(text)[:4])]
    mlp = params["layers"][5]["mlp"]
    g, u, d = (jnp.asarray(mlp[n]["kernel"], jnp.float32) for n in ("gate_proj", "up_proj", "down_proj"))
    h = jax.nn.silu(x0 @ g) * (x0 @ u)
    monkeypatch.setattr(tuning, "device_key", lambda kind=None: "real-probe")
    for w, x in ((g, x0), (d, h)):
        q = jq.quantize(w, jq.TernaryScheme("channel"))
        for m, variant in ((4, "dp4a-gemv"), (1, "dp4a-gemv+xq"), (1, "split-gemv+xq")):
            xb = x[:m].astype(jnp.bfloat16)
            with jq.ops.kernel_mode("off"):
                want = np.asarray(jq.ops.qdot_ternary_a8(xb, q), np.float32)
            cfg = tuning.gemv_config("ternary_a8", m, *w.shape, sms=132, variant=variant)
            monkeypatch.setitem(tuning.TABLE, "real-probe", {"ternary_a8": [(1 << 62, cfg)]})
            jax.clear_caches()
            with jq.ops.kernel_mode("interpret"):
                assert "pallas_call" in str(jax.make_jaxpr(jq.ops.qdot_ternary_a8)(xb, q))
                got = np.asarray(jq.ops.qdot_ternary_a8(xb, q), np.float32)
            np.testing.assert_array_equal(got, want, err_msg=f"{w.shape} {variant}")
