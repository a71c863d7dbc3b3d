"""Weight-only integer kernels (2 to 8 bits): interpret-mode numerics, CUDA lowering, cubin compilation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_helpers import (
    assert_compiles,
    cuda_lowering,
    np_group_rows,
    np_unpack_rows,
    rel_err,
    requires_triton,
    round_to,
    shape_struct,
)

import jaxquant as jq
from jaxquant.ops import _INT_KERNEL
from pallas_kernels import _triton_tools as tt
from pallas_kernels._common import BlockConfig
from pallas_kernels.int4_matmul import IntLayout, int_matmul, int_matmul_reference, supported

# output rounding bounds, relative (norm): float32 = summation order only; bf16/f16 = one output rounding
BOUND = {jnp.float32: 1e-5, jnp.bfloat16: 4e-3, jnp.float16: 1e-3}

# (m, k, n, bits, group, symmetric, range, variant, split_k, x dtype)
CASES = [
    (1, 256, 128, 4, 128, True, "zeropoint", "strided", 1, jnp.bfloat16),
    (5, 200, 80, 4, 64, False, "zeropoint", "interleave", 2, jnp.float32),  # ragged K and N, short last group
    (33, 256, 96, 4, 128, False, "minmax", "strided", 1, jnp.float16),
    (3, 384, 64, 8, None, True, "zeropoint", "interleave", 3, jnp.float32),
    (2, 300, 64, 8, 128, False, "zeropoint", "strided", 1, jnp.bfloat16),
    (4, 256, 64, 2, 64, True, "zeropoint", "strided", 2, jnp.float32),
    (1, 256, 128, 4, 128, True, "zeropoint", "split", 2, jnp.bfloat16),
    (5, 200, 80, 4, 64, False, "minmax", "split", 1, jnp.float16),  # ragged M, K, N; short last group
    (17, 320, 48, 2, 64, False, "zeropoint", "split", 1, jnp.float32),  # 2-bit: four column sets
]


def np_dequant(q, bits, group, symmetric, rng_mode, k, n):
    """Float64 NumPy dequantization straight from the IntScheme storage definition."""
    c = np_unpack_rows(np.asarray(q.data), bits, k).astype(np.float64)
    if symmetric and bits == 8:
        c = np.asarray(q.data).astype(np.float64)  # plain int8 codes
    elif symmetric:
        c = c - 2 ** (bits - 1)
    s = np_group_rows(np.asarray(q.scale, np.float64), group, k, n)
    if symmetric:
        return c * s
    z = np_group_rows(np.asarray(q.zero, np.float64), group, k, n)
    return (c - z) * s if rng_mode == "zeropoint" else c * s + z


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}b{c[3]}g{c[4]}{c[7]}s{c[8]}")
def test_interpret_matches_reference_and_float64(case):
    m, k, n, bits, group, sym, rng_mode, variant, split, dt = case
    rng = np.random.default_rng(m * 1000 + k + bits)
    w = rng.standard_normal((k, n)).astype(np.float32)
    scheme = jq.IntScheme(bits=bits, group_size=group, symmetric=sym, range=rng_mode)
    q = jq.quantize(jnp.asarray(w), scheme)
    mode = "sym" if sym else rng_mode
    layout = IntLayout(bits=bits, mode=mode, k=k, n=n, group_size=group)
    wd64 = np_dequant(q, bits, group, sym, rng_mode, k, n)
    np.testing.assert_array_equal(wd64, np.asarray(jax.jit(jq.dequantize)(q), np.float64))  # layout understood
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    cfg = BlockConfig(block_m=16, block_n=32, block_k=128, split_k=split, variant=variant)
    zero = None if sym else q.zero
    y = int_matmul(x, q.data, q.scale, zero, layout=layout, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == x.dtype
    yr = int_matmul_reference(x, q.data, q.scale, zero, layout)
    y64 = np.asarray(x, np.float64) @ round_to(wd64, dt)
    assert rel_err(y, y64) <= BOUND[dt]
    assert rel_err(y, yr) <= 2 * BOUND[dt]


def _check_kernel(x, q, zero, layout: IntLayout, cfg: BlockConfig, wd64) -> None:
    """``int_matmul`` (interpret mode) with ``cfg``: supported, right shape and dtype, within the output-rounding
    bound of float64 ``x @ round(W)`` and twice that of the XLA path."""
    dt = x.dtype.type
    assert supported(layout, cfg, dt) is None
    y = int_matmul(x, q.data, q.scale, zero, layout=layout, config=cfg, interpret=True)
    assert y.shape == (x.shape[0], layout.n) and y.dtype == x.dtype
    y64 = np.asarray(x, np.float64) @ round_to(wd64, dt)
    assert rel_err(y, y64) <= BOUND[dt]
    assert rel_err(y, int_matmul_reference(x, q.data, q.scale, zero, layout)) <= 2 * BOUND[dt]


# the GEMV path (M <= 8): (m, k, n, bits, group, symmetric, range, block_m, block_k, split_k, x dtype)
GEMV_CASES = [
    (1, 256, 128, 4, 128, True, "zeropoint", 1, 64, 2, jnp.bfloat16),
    (5, 200, 80, 4, 64, False, "zeropoint", 8, 32, 2, jnp.float32),  # ragged K, N and M; short last group
    (3, 300, 64, 8, 128, False, "minmax", 4, 16, 1, jnp.float16),
    (2, 384, 64, 8, None, True, "zeropoint", 2, 32, 3, jnp.bfloat16),  # int8 storage, per channel
    # 3-bit dense stream (GEMV only): 32 code tiles per 128-row step, the straddling codes 10 and 21
    (1, 256, 128, 3, 128, True, "zeropoint", 1, 128, 2, jnp.bfloat16),
    (5, 200, 80, 3, 64, False, "zeropoint", 8, 64, 2, jnp.float32),  # ragged K (a partial chunk), N and M
    (3, 300, 64, 3, 128, False, "minmax", 4, 128, 1, jnp.float16),  # short last group
    (2, 384, 64, 3, None, True, "zeropoint", 2, 256, 3, jnp.bfloat16),  # per channel
    (4, 96, 48, 3, 32, True, "zeropoint", 4, 32, 1, jnp.float32),  # one chunk per step
    # 5/6/7 bits (the mixed-bits search's widths): the same dense stream with 5/6/7 words per chunk
    (1, 256, 128, 5, 128, True, "zeropoint", 1, 128, 2, jnp.bfloat16),
    (5, 200, 80, 6, 64, False, "zeropoint", 8, 64, 2, jnp.float32),  # ragged K (a partial chunk), N and M
    (3, 300, 64, 7, 128, False, "minmax", 4, 128, 1, jnp.float16),  # short last group
    (2, 384, 64, 6, None, True, "zeropoint", 2, 256, 3, jnp.bfloat16),  # per channel
]  # 2-bit GEMV: see test_pallas_ternary.py::test_gemv_matches_float64


@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}b{c[3]}g{c[4]}bm{c[7]}s{c[9]}")
def test_gemv_matches_reference_and_float64(case):
    m, k, n, bits, group, sym, rng_mode, bm, bk, split, dt = case
    rng = np.random.default_rng(m * 100 + k + bits)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = jq.quantize(jnp.asarray(w), jq.IntScheme(bits=bits, group_size=group, symmetric=sym, range=rng_mode))
    layout = IntLayout(bits=bits, mode="sym" if sym else rng_mode, k=k, n=n, group_size=group)
    wd64 = np_dequant(q, bits, group, sym, rng_mode, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    cfg = BlockConfig(block_m=bm, block_n=32, block_k=bk, split_k=split, variant="gemv")
    _check_kernel(x, q, None if sym else q.zero, layout, cfg, wd64)


# (m, k, n, bits, group, symmetric, range, block_m, block_k, x dtype)
GEMV_VARIANT_CASES = [
    (1, 256, 128, 3, 128, False, "zeropoint", 1, 128, jnp.bfloat16),
    (5, 200, 80, 3, 64, True, "zeropoint", 8, 64, jnp.float16),  # ragged K, N, M
    (3, 300, 96, 4, 128, False, "zeropoint", 4, 64, jnp.bfloat16),
    (2, 384, 64, 8, None, True, "zeropoint", 2, 32, jnp.float32),  # int8 storage
    (1, 256, 64, 8, 128, False, "zeropoint", 1, 32, jnp.bfloat16),  # uint8 codes with zero points
    (4, 320, 48, 2, 64, True, "zeropoint", 4, 64, jnp.float16),
    (3, 200, 80, 5, 64, False, "zeropoint", 4, 64, jnp.bfloat16),
    (1, 256, 64, 7, 128, True, "zeropoint", 1, 128, jnp.float16),
]


@pytest.mark.parametrize("case", GEMV_VARIANT_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}b{c[3]}g{c[4]}")
def test_gemv_variants(case):
    """``split-gemv`` (contiguous activation tiles split in registers) computes exactly what ``gemv`` does (same
    weights, same order); the ``+postscale`` forms (exact integer tiles, the group scale once per step) match
    float64 ``x @ dequantize(w)`` within the output rounding."""
    m, k, n, bits, group, sym, rng_mode, bm, bk, dt = case
    rng = np.random.default_rng(k + n + bits)
    q = jq.quantize(
        jnp.asarray(rng.standard_normal((k, n)), jnp.float32),
        jq.IntScheme(bits=bits, group_size=group, symmetric=sym, range=rng_mode),
    )
    layout = IntLayout(bits=bits, mode="sym" if sym else rng_mode, k=k, n=n, group_size=group)
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    zero = None if sym else q.zero
    y64 = np.asarray(x, np.float64) @ np.asarray(jq.dequantize(q), np.float64)
    out = {}
    for variant in ("gemv", "split-gemv", "gemv+postscale", "split-gemv+postscale"):
        cfg = BlockConfig(block_m=bm, block_n=32, block_k=bk, split_k=2, variant=variant)
        assert supported(layout, cfg, dt) is None, variant
        out[variant] = np.asarray(int_matmul(x, q.data, q.scale, zero, layout=layout, config=cfg, interpret=True))
    np.testing.assert_array_equal(out["split-gemv"], out["gemv"])
    np.testing.assert_array_equal(out["split-gemv+postscale"], out["gemv+postscale"])
    assert rel_err(out["split-gemv+postscale"], y64) <= BOUND[dt]
    minmax = IntLayout(bits=bits, mode="minmax", k=k, n=n, group_size=group)
    assert "minmax" in supported(minmax, BlockConfig(block_m=bm, variant="gemv+postscale"), dt)


def test_gemv_w_dtype_rounding_matches_xla_path():
    """A float32 QArray with bf16 activations: same rounding chain as the XLA path (weights rounded once)."""
    rng = np.random.default_rng(11)
    q = jq.quantize(jnp.asarray(rng.standard_normal((256, 64)), jnp.bfloat16), jq.IntScheme(4, 128))
    layout = IntLayout(bits=4, mode="sym", k=256, n=64, group_size=128)
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.float16)
    cfg = BlockConfig(block_m=1, block_n=64, block_k=64, split_k=1, variant="gemv")
    y = int_matmul(x, q.data, q.scale, None, layout=layout, config=cfg, w_dtype="bfloat16", interpret=True)
    yr = int_matmul_reference(x, q.data, q.scale, None, layout, w_dtype="bfloat16")
    assert rel_err(y, yr) <= 1e-3


def test_heuristic_and_gemv_configs_are_supported():
    """Unmeasured devices: the tensor-core kernel with split-K at small M (the GEMV lost to it wherever measured);
    the GEMV configs (``gemv_config``, for tables and benchmarks) stay valid for M <= 8."""
    from pallas_kernels import tuning

    for name in ("int4", "int8w", "int2w"):
        layout = IntLayout(bits={"int4": 4, "int8w": 8, "int2w": 2}[name], mode="sym", k=8192, n=8192, group_size=128)
        for m in (1, 2, 5, 8, 16):
            cfg = tuning.heuristic(name, m, 8192, 8192, sms=132)
            assert cfg.variant != "gemv" and cfg.split_k > 1 and supported(layout, cfg, jnp.bfloat16) is None
            if name == "int4":
                assert cfg.variant == "split"
            if m <= 8:
                g = tuning.gemv_config(name, m, 8192, 8192, sms=132)
                assert g.variant == "gemv" and g.block_m >= m and g.split_k > 1
                assert supported(layout, g, jnp.bfloat16) is None, (name, m, g)
    assert supported(IntLayout(4, "sym", 256, 64, 128), BlockConfig(block_m=16, variant="gemv"), jnp.bfloat16)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_dense_widths_route_gemv_then_chunk_dot_then_xla(bits):
    """3/5/6/7-bit weights: the heuristic gives the GEMV up to M=8 and the chunk dot above (both supported at g128,
    g64, g96 and per channel, on Hopper, A100 and unknown GPUs); above the estimated limit (256 rows) ``qdot`` takes
    the XLA path and says the limit is an estimate. M=1 and M=16 run the kernels (interpret mode) and agree with
    the XLA path."""
    from pallas_kernels import tuning

    name = _INT_KERNEL[bits]
    for g in (128, 64, 96, None):
        layout = IntLayout(bits=bits, mode="sym", k=8192, n=8192, group_size=g)
        for m in (1, 2, 5, 8):
            cfg = tuning.heuristic(name, m, 8192, 8192, sms=132)
            assert cfg.variant == "split-gemv" and cfg.block_m >= m and cfg.split_k > 1
            assert supported(layout, cfg, jnp.bfloat16) is None, (g, m, cfg)
        for dev in ("h100", "a100", "unknown"):
            with tuning.as_device(dev):
                for m in (9, 16, 64, 256):
                    cfg = tuning.heuristic(name, m, 8192, 8192, sms=132)
                    assert cfg.variant == "" and cfg.block_k == 512 and cfg.block_m >= min(m, 16)
                    assert supported(layout, cfg, jnp.bfloat16) is None, (g, m, cfg)
    w = jax.ShapeDtypeStruct((8192, 8192), jnp.float32)
    q8k = jax.eval_shape(lambda w: jq.quantize(w, jq.IntScheme(bits, 128, symmetric=False)), w)
    assert jq.ops.explain_qdot(shape_struct((256, 8192), jnp.bfloat16), q8k, device="h100").startswith(
        f"kernel: {name}"
    )
    why = jq.ops.explain_qdot(shape_struct((257, 8192), jnp.bfloat16), q8k, device="h100")
    assert why.startswith("xla:") and "estimated limit 256" in why, why
    rng = np.random.default_rng(5)
    q = jq.quantize(jnp.asarray(rng.standard_normal((256, 96)), jnp.float32), jq.IntScheme(bits, 128, symmetric=False))
    for m in (1, 16):
        x = jnp.asarray(rng.standard_normal((m, 256)), jnp.bfloat16)
        with jq.ops.kernel_mode("interpret"):
            assert jq.ops.explain_qdot(x, q).startswith(f"kernel: {name}")
            y = jax.jit(jq.qdot)(x, q)
        with jq.ops.kernel_mode("off"):
            y0 = jax.jit(jq.qdot)(x, q)
        assert rel_err(y, y0) <= 2 * BOUND[jnp.bfloat16]


# the dense chunk dot (M > 8): (m, k, n, bits, group, symmetric, range, block_m, block_n, block_k, split_k, x dtype)
CHUNK_CASES = [
    (16, 1024, 64, 3, 128, True, "zeropoint", 16, 64, 512, 1, jnp.bfloat16),
    (20, 1000, 100, 3, 128, False, "zeropoint", 16, 64, 512, 2, jnp.bfloat16),  # ragged M, N, K (partial chunk)
    (9, 1536, 64, 5, 64, False, "minmax", 16, 32, 1024, 1, jnp.float16),  # 32 chunks per step, 16 groups
    (33, 700, 48, 6, None, True, "zeropoint", 32, 32, 512, 1, jnp.float16),  # per channel; ragged everything
    (17, 2048, 64, 7, 96, False, "zeropoint", 16, 64, 512, 4, jnp.bfloat16),  # 3-chunk groups straddle steps
    (12, 640, 32, 3, 32, False, "minmax", 16, 16, 512, 2, jnp.bfloat16),  # one chunk per group; a partial step
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}b{c[3]}g{c[4]}{c[6]}s{c[10]}")
def test_chunk_dot_matches_reference_and_float64(case):
    m, k, n, bits, group, sym, rng_mode, bm, bn, bk, split, dt = case
    rng = np.random.default_rng(m * 1000 + k + bits)
    scheme = jq.IntScheme(bits=bits, group_size=group, symmetric=sym, range=rng_mode)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), scheme)
    layout = IntLayout(bits=bits, mode="sym" if sym else rng_mode, k=k, n=n, group_size=group)
    wd64 = np.asarray(jax.jit(jq.dequantize)(q), np.float64)
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    cfg = BlockConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split)
    _check_kernel(x, q, None if sym else q.zero, layout, cfg, wd64)


def test_chunk_dot_refuses_what_it_cannot_do():
    """The chunk dot's limits are reasons (``qdot`` takes the XLA path), never a wrong answer."""
    lay = IntLayout(3, "sym", 1024, 64, group_size=128)
    ok = BlockConfig(block_m=16, block_n=64, block_k=512)
    assert supported(lay, ok, jnp.bfloat16) is None and supported(lay, ok, jnp.float16) is None
    assert "512" in supported(lay, ok.replace(block_k=256), jnp.bfloat16)  # one mma K step per position
    assert "float32" in supported(lay, ok, jnp.float32)  # (BM, 512) activation tiles sized for 2-byte dtypes
    assert "multiple of 32" in supported(IntLayout(3, "sym", 1024, 64, group_size=48), ok, jnp.bfloat16)
    assert "chunk dot" in supported(lay, ok.replace(variant="strided"), jnp.bfloat16)


def test_fresh_inputs_every_config_agree():
    """Every variant / split / block shape computes the same function on fresh random inputs."""
    rng = np.random.default_rng(7)
    k, n, m = 256, 64, 3
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.IntScheme(4, 64, symmetric=False))
    layout = IntLayout(bits=4, mode="zeropoint", k=k, n=n, group_size=64)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    ref = np.asarray(int_matmul_reference(x, q.data, q.scale, q.zero, layout), np.float64)
    for cfg in (
        BlockConfig(16, 16, 64, 1, variant="strided"),
        BlockConfig(32, 64, 128, 4, variant="interleave"),
        BlockConfig(16, 64, 32, 2, variant="strided"),
    ):
        y = int_matmul(x, q.data, q.scale, q.zero, layout=layout, config=cfg, interpret=True)
        assert rel_err(y, ref) < 1e-5, cfg


def test_unsupported_cases_are_reported():
    cfg = BlockConfig()
    assert supported(IntLayout(4, "sym", 256, 64, group_size=16), cfg, jnp.bfloat16)  # group too small
    assert supported(IntLayout(4, "sym", 256, 64, group_size=128), cfg, jnp.int8)  # activation dtype
    assert supported(IntLayout(4, "sym", 256, 64, group_size=128), cfg, jnp.bfloat16) is None
    for bad in (1, 9, True):
        with pytest.raises(ValueError, match="bits"):
            IntLayout(bad, "sym", 256, 64)
    lay3 = IntLayout(3, "sym", 256, 64, group_size=128)
    assert "512" in supported(lay3, cfg, jnp.bfloat16)  # 3-bit tensor-core steps are 16 chunks of 32 rows
    q3 = jq.quantize(jnp.ones((256, 64), jnp.float32), jq.IntScheme(3, 128))
    gemv = BlockConfig(block_m=1, block_n=64, block_k=128, variant="gemv")
    with pytest.raises(ValueError, match="uint32"):  # 3-bit storage read as bytes would be a silent wrong answer
        int_matmul(jnp.ones((1, 256)), q3.data.astype(jnp.uint8), q3.scale, None, layout=lay3, config=gemv)
    with pytest.raises(ValueError, match="power of two"):
        BlockConfig(block_m=24)


LOWER_CASES = [  # (bits, mode, group, variant, m)
    (4, "sym", 128, "gemv", 1),
    (8, "sym", None, "gemv", 4),
    (4, "sym", 128, "strided", 16),
    (4, "zeropoint", 64, "interleave", 128),
    (8, "sym", None, "", 16),
    (2, "sym", 128, "strided", 16),
    (3, "sym", 128, "gemv", 1),
    (3, "zeropoint", 64, "gemv", 8),
    (3, "sym", 128, "split-gemv+postscale", 4),
    (8, "zeropoint", 128, "split-gemv+postscale", 1),
    (5, "sym", 128, "gemv", 1),
    (6, "zeropoint", 64, "gemv", 4),
    (7, "minmax", 128, "split-gemv", 2),
    (3, "zeropoint", 128, "", 16),  # the dense chunk dot (the heuristic's config)
    (6, "sym", None, "", 64),
]


def _lower(bits, mode, group, variant, m, k=512, n=256):
    layout = IntLayout(bits=bits, mode=mode, k=k, n=n, group_size=group)
    cfg = BlockConfig(block_m=min(m, 64), block_n=64, block_k=128, split_k=2, variant=variant)
    from pallas_kernels import tuning

    if "gemv" in variant:  # "gemv": the config the tables and the heuristic use (split-gemv for 3 bits)
        cfg = tuning.gemv_config(_INT_KERNEL[bits], m, k, n, sms=132)
        cfg = cfg if variant == "gemv" else cfg.replace(variant=variant)
    elif layout.dense:  # the chunk dot, as the heuristic sizes it for an H100
        with tuning.as_device("h100"):
            cfg = tuning.heuristic(_INT_KERNEL[bits], m, k, n, sms=132)
    g = layout.groups
    args = [
        shape_struct((m, k), jnp.bfloat16),
        shape_struct((layout.packed_rows, n), jnp.int8 if (bits == 8 and mode == "sym") else layout.storage_dtype),
        shape_struct((g, n), jnp.float16),
        shape_struct((g, n), jnp.uint8) if mode != "sym" else None,
    ]
    return cuda_lowering(functools.partial(int_matmul, layout=layout, config=cfg), *args)


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"b{c[0]}{c[1]}g{c[2]}{c[3]}m{c[4]}")
def test_lowers_to_triton_custom_call(case):
    calls = _lower(*case)
    assert calls[0].name.startswith(f"int{case[0]}_{'gemv' if 'gemv' in case[3] else 'matmul'}")


@requires_triton
@pytest.mark.parametrize("case", LOWER_CASES[:5] + LOWER_CASES[6:], ids=lambda c: f"b{c[0]}{c[1]}g{c[2]}{c[3]}m{c[4]}")
def test_compiles_to_cubin_sm90_sm80(case):
    assert_compiles(_lower(*case), archs=(90, 80))


def test_jit_and_vmap_of_dispatch():
    """qdot through the kernel (interpret) composes with jit and vmap."""
    rng = np.random.default_rng(3)
    q = jq.quantize(jnp.asarray(rng.standard_normal((128, 32)), jnp.float32), jq.IntScheme(4, 64))
    xs = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.float32)
    with jq.ops.kernel_mode("interpret"):
        y = jax.jit(jax.vmap(jq.qdot, in_axes=(0, None)))(xs, q)
    with jq.ops.kernel_mode("off"):
        y0 = jax.vmap(jq.qdot, in_axes=(0, None))(xs, q)
    assert rel_err(y, y0) < 1e-5


# "+postscale": exact integer tiles, group scale applied to the dot result (not bit-identical to the XLA path)
POST_CASES = [
    (1, 256, 128, 4, 128, True, "zeropoint", "interleave+postscale", 4, jnp.bfloat16),
    (5, 200, 80, 4, 64, False, "zeropoint", "strided+postscale", 2, jnp.float16),  # ragged K, N; short group
    (3, 384, 64, 8, None, True, "zeropoint", "interleave+postscale", 3, jnp.float32),  # int8 per channel
    (17, 256, 96, 4, 128, False, "zeropoint", "interleave+postscale", 1, jnp.bfloat16),
    (2, 256, 64, 4, 128, True, "zeropoint", "strided+postscale", 2, jnp.bfloat16),  # sym: offset 8
    (4, 320, 48, 2, 64, True, "zeropoint", "interleave+postscale", 1, jnp.float32),  # 2-bit sym, f32 magic
    (3, 256, 64, 2, 128, False, "zeropoint", "strided+postscale", 1, jnp.float16),  # 2-bit zero points
]


@pytest.mark.parametrize("case", POST_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}b{c[3]}g{c[4]}{c[7]}")
def test_postscale_matches_float64(case):
    """y = sum_g (x_g @ (c_g - z_g)) * s_g in float32: within one output rounding of float64 x @ dequantize(w)
    (tighter than the XLA path, which also rounds every weight to the activation dtype)."""
    m, k, n, bits, group, sym, rng_mode, variant, split, dt = case
    rng = np.random.default_rng(m * 7 + k + bits)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = jq.quantize(jnp.asarray(w), jq.IntScheme(bits=bits, group_size=group, symmetric=sym, range=rng_mode))
    layout = IntLayout(bits=bits, mode="sym" if sym else rng_mode, k=k, n=n, group_size=group)
    wd64 = np_dequant(q, bits, group, sym, rng_mode, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    cfg = BlockConfig(block_m=16, block_n=32, block_k=128, split_k=split, variant=variant)
    assert supported(layout, cfg, dt) is None
    zero = None if sym else q.zero
    y = int_matmul(x, q.data, q.scale, zero, layout=layout, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == x.dtype
    x64 = np.asarray(x, np.float64)
    y64 = x64 @ wd64  # unrounded weights
    assert rel_err(y, y64) <= BOUND[dt]
    yr = int_matmul_reference(x, q.data, q.scale, zero, layout)
    assert rel_err(y, yr) <= 2 * BOUND[dt] + (4e-3 if dt != jnp.float32 else 0.0)
    if dt != jnp.float32:  # the default variant rounds each weight: postscale is at least as close to float64
        yd = int_matmul(
            x, q.data, q.scale, zero, layout=layout, config=cfg.__class__(16, 32, 128, split), interpret=True
        )
        assert rel_err(y, y64) <= rel_err(yd, y64) * 1.05 + 1e-7


def test_postscale_rejects_minmax_and_unknown_variants():
    lay = IntLayout(bits=4, mode="minmax", k=256, n=64, group_size=128)
    assert "minmax" in supported(lay, BlockConfig(16, 32, 128, variant="strided+postscale"), jnp.bfloat16)
    lay = IntLayout(bits=4, mode="sym", k=256, n=64, group_size=128)
    assert "variant" in supported(lay, BlockConfig(16, 32, 128, variant="postscale"), jnp.bfloat16)


@requires_triton
@pytest.mark.parametrize("variant,mode", [("interleave+postscale", "sym"), ("strided+postscale", "zeropoint")])
def test_postscale_compiles_to_cubin_sm90(variant, mode):
    layout = IntLayout(bits=4, mode=mode, k=8192, n=256, group_size=128)
    cfg = BlockConfig(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3, variant=variant)
    g = layout.groups
    args = [
        shape_struct((1, 8192), jnp.bfloat16),
        shape_struct((layout.packed_rows, 256), jnp.uint8),
        shape_struct((g, 256), jnp.float16),
        shape_struct((g, 256), jnp.uint8) if mode != "sym" else None,
    ]
    calls = cuda_lowering(functools.partial(int_matmul, layout=layout, config=cfg), *args)
    assert calls[0].name.startswith("int4_matmul")
    assert_compiles(calls, archs=(90,))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_exact_int_tile_equals_integer_subtraction(dtype):
    """The bit trick (code OR-ed into a float's mantissa, then one subtraction) gives exactly ``c - off`` for
    every 7-bit code and every offset the kernels use (fixed 2/8, per-column uint8 zero points)."""
    from pallas_kernels._common import exact_int

    c = jnp.arange(128, dtype=jnp.int32)[:, None]
    for off in (0, 2, 8, 64):
        got = np.asarray(exact_int(c, off, dtype), np.float64)
        np.testing.assert_array_equal(got, np.arange(128)[:, None] - off)
    z = jnp.arange(16, dtype=jnp.int32)[None, :]
    got = np.asarray(exact_int(c[:16], z, dtype), np.float64)
    np.testing.assert_array_equal(got, np.arange(16)[:, None] - np.arange(16)[None, :])
    assert exact_int(c, 8, dtype).dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("dtype", [jnp.uint32, jnp.int32])
def test_exact_field_equals_integer_extraction(dtype):
    """``exact_field`` (field masked in place into a float32 mantissa, then one subtraction) gives exactly
    ``((w >> off) & mask) - sub`` for every field position of a 32-bit word (including fields above bit 22, which
    are shifted down first), widths 2..8, integer and per-column offsets."""
    from pallas_kernels._common import exact_field

    rng = np.random.default_rng(0)
    hi = 2**32 if dtype == jnp.uint32 else 2**31
    w_np = rng.integers(0, hi, size=(64, 8), dtype=np.uint64)
    w = jnp.asarray(w_np.astype(np.dtype(dtype)))
    z = rng.integers(0, 256, size=(1, 8))
    for bits in (2, 3, 4, 8):
        for off in range(0, (31 if dtype == jnp.int32 else 32) - bits + 1):
            want = ((w_np >> np.uint64(off)) & np.uint64((1 << bits) - 1)).astype(np.int64)
            for sub, ref in ((1 << (bits - 1), want - (1 << (bits - 1))), (jnp.asarray(z, jnp.float32), want - z)):
                got = exact_field(w, off, bits, sub)
                assert got.dtype == jnp.float32
                np.testing.assert_array_equal(np.asarray(got, np.float64), ref, err_msg=f"bits={bits} off={off}")


def _int4_loop(variant: str, scale_dtype=jnp.float32) -> tt.LoopProfile:
    layout = IntLayout(bits=4, mode="sym", k=8192, n=8192, group_size=128)
    cfg = BlockConfig(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3, variant=variant)
    args = [
        shape_struct((1, 8192), jnp.bfloat16),
        shape_struct((layout.packed_rows, 8192), jnp.uint8),
        shape_struct((layout.groups, 8192), scale_dtype),
        None,
    ]
    fn = functools.partial(int_matmul, layout=layout, config=cfg, w_dtype="bfloat16")
    call = cuda_lowering(fn, *args)[0]
    return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))


@requires_triton
def test_k_loop_instruction_counts_sm90():
    """Machine-code check of the W4A16 K loop for sm_90 (M=1, 8192^2, the H100 table's 16x64x128 tile): codes
    become floats by integer ops (no I2F, a quarter-rate conversion on sm_90), and the ``split`` variants (one
    contiguous activation tile) need far fewer instructions per trip than ``interleave`` (the measured H100 row,
    whose K-order rebuild costs shuffles) and ``strided`` (one uncoalesced activation load per element). Float32
    scales (the benchmark's weights): the dequantization runs in float32."""
    loops = {v: _int4_loop(v) for v in ("interleave", "strided", "split", "split+postscale")}
    n = {v: p.instructions for v, p in loops.items()}
    for v, p in loops.items():
        assert p.count("I2F") == 0, v
        assert p.count("HMMA") == loops["interleave"].count("HMMA") > 0, v
    assert n["split"] <= 0.7 * n["interleave"], n
    assert n["split"] < n["strided"], n
    assert n["split+postscale"] <= 0.8 * n["split"], n  # no per-weight multiply and rounding
    # strided activation loads are global loads into registers used in the same trip (exposed latency); the
    # split tile goes through the software pipeline (cp.async), as the weights do. (+postscale's scale row is
    # loaded into registers and used in the same trip: Triton stages only loads that feed a dot.)
    assert loops["strided"].exposed_loads >= 8
    assert loops["split"].exposed_loads == 0
    assert loops["split+postscale"].exposed_loads <= 2


@requires_triton
def test_zero_point_gemv_has_no_per_position_layout_conversions_sm90():
    """Zero-point GEMVs (3-bit g128, M=1, 8192^2, float16 scales) compute ``c * s - z * s`` (the same weights)
    instead of subtracting a row ``z + 2**e`` per code position, which Triton moved into each position's layout
    through shared memory: 45 barriers per K-loop trip before, 5 now, as few as the symmetric GEMV's."""
    from pallas_kernels import tuning

    def loop(mode):
        layout = IntLayout(bits=3, mode=mode, k=8192, n=8192, group_size=128)
        cfg = tuning.gemv_config("int3w", 1, 8192, 8192, sms=132)
        zero = shape_struct((64, 8192), jnp.uint8) if mode != "sym" else None
        args = [shape_struct((1, 8192), jnp.bfloat16), shape_struct((layout.packed_rows, 8192), jnp.uint32)]
        call = cuda_lowering(
            functools.partial(int_matmul, layout=layout, config=cfg), *args, shape_struct((64, 8192), jnp.float16), zero
        )[0]
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    sym, zp = loop("sym"), loop("zeropoint")
    assert zp.count("BAR") <= sym.count("BAR") + 4, (zp.count("BAR"), sym.count("BAR"))
    assert zp.instructions <= 1.05 * sym.instructions, (zp.instructions, sym.instructions)


@requires_triton
@pytest.mark.parametrize("m", [4, 8])
def test_dense_gemv_configs_do_not_spill_sm90(m):
    """The heuristic's dense-width GEMV for 4-8 rows (4 warps, a 256/BM-column tile): no register spills and few
    barriers per K-loop trip (8 warps and 128 columns spilled 240 bytes at BM=8 and synchronised 32-64 times per
    trip to move activation columns through shared memory)."""
    from pallas_kernels import tuning

    layout = IntLayout(bits=6, mode="zeropoint", k=8192, n=8192, group_size=128)
    cfg = tuning.heuristic("int6w", m, 8192, 8192, sms=132)
    args = [shape_struct((m, 8192), jnp.bfloat16), shape_struct((layout.packed_rows, 8192), jnp.uint32)]
    stats = [shape_struct((64, 8192), jnp.float16), shape_struct((64, 8192), jnp.uint8)]
    call = cuda_lowering(functools.partial(int_matmul, layout=layout, config=cfg), *args, *stats)[0]
    text = tt.ir_text(call.ir)
    report = tt.compile_cubin(text, 90, call.num_warps, call.num_stages)
    assert report.ok and report.spill_bytes == 0, report
    assert tt.loop_profile(tt.sass(text, 90, call.num_warps, call.num_stages)).count("BAR") <= 8


@requires_triton
def test_k_loop_bf16_scales_use_packed_bf16_math_sm90():
    """Scales stored in the activation dtype (here bf16; jaxquant's IntScheme stores float16 scales, so this is
    the float16-activation case of a default QArray): the default numerics dequantize with packed arithmetic
    (``HADD2``/``HMUL2``, two weights per instruction; bit-identical, see
    test_weights_bit_identical_to_the_xla_path) instead of float32 (``FADD``/``FMUL`` + packing)."""
    f32, b16 = _int4_loop("split"), _int4_loop("split", jnp.bfloat16)
    assert f32.count("FMUL") > 0 and b16.count("FMUL") == 0
    assert b16.count("HMUL2") > 0 and b16.count("I2F") == 0
    assert b16.instructions <= 0.85 * f32.instructions, (b16.instructions, f32.instructions)


@pytest.mark.parametrize(
    "x_dt,s_dt,w_dtype",
    [
        (jnp.bfloat16, jnp.bfloat16, None),  # scales in the activation dtype: the packed bf16 multiply
        (jnp.float16, jnp.float16, "float16"),
        (jnp.bfloat16, jnp.float32, None),  # float32 scales: float32 arithmetic
        (jnp.float16, jnp.float32, "bfloat16"),  # rounded to bf16 first, then to f16 (the XLA path's chain)
        (jnp.float16, jnp.bfloat16, None),
    ],
)
@pytest.mark.parametrize("bits,mode", [(4, "sym"), (4, "zeropoint"), (4, "minmax"), (2, "zeropoint")])
def test_weights_bit_identical_to_the_xla_path(x_dt, s_dt, w_dtype, bits, mode):
    """With one-hot activation rows the product returns the dequantized weights themselves (one nonzero term per
    sum, exact in float32), so every default-numerics variant must reproduce the XLA path's weights bit for bit."""
    k, n = 256, 64
    rng = np.random.default_rng(bits * 10 + len(mode))
    q = jq.quantize(
        jnp.asarray(rng.standard_normal((k, n)), jnp.float32),
        jq.IntScheme(bits=bits, group_size=64, symmetric=mode == "sym", range="zeropoint" if mode == "sym" else mode),
    )
    layout = IntLayout(bits=bits, mode=mode, k=k, n=n, group_size=64)
    scale = q.scale.astype(s_dt)
    zero = None if mode == "sym" else (q.zero if mode == "zeropoint" else q.zero.astype(s_dt))
    eye = jnp.eye(k, dtype=x_dt)
    want = np.asarray(int_matmul_reference(eye, q.data, scale, zero, layout, w_dtype=w_dtype), np.float32)
    for variant in ("strided", "interleave", "split"):
        cfg = BlockConfig(block_m=64, block_n=32, block_k=64, split_k=2, variant=variant)
        got = int_matmul(eye, q.data, scale, zero, layout=layout, config=cfg, w_dtype=w_dtype, interpret=True)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=variant)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize(
    "mode,x_dt,s_dt",
    [
        ("sym", jnp.bfloat16, jnp.bfloat16),
        ("zeropoint", jnp.float16, jnp.float16),
        ("minmax", jnp.float32, jnp.float16),
        ("zeropoint", jnp.bfloat16, jnp.float16),  # jaxquant's default scales: the zero-point fold c*s - z*s
        ("minmax", jnp.float16, jnp.bfloat16),
        ("zeropoint", jnp.bfloat16, jnp.float32),  # float32 scales: z subtracted per code position
    ],
)
def test_dense_gemv_weights_bit_identical_to_the_xla_path(bits, mode, x_dt, s_dt):
    """The dense widths' GEMVs and chunk dot (3 bits, and 5/6/7 bits, whose streams straddle four, four and six
    codes across two words) with one-hot activation rows: every code position of every chunk comes back as the XLA
    path's weight, bit for bit (a partial last chunk included: K = 200)."""
    k, n = 200, 48
    rng = np.random.default_rng(bits * 10 + len(mode))
    scheme = jq.IntScheme(bits, 64, symmetric=mode == "sym", range="zeropoint" if mode == "sym" else mode)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), scheme)
    layout = IntLayout(bits=bits, mode=mode, k=k, n=n, group_size=64)
    scale = q.scale.astype(s_dt)
    zero = None if mode == "sym" else (q.zero if mode == "zeropoint" else q.zero.astype(s_dt))
    eye = jnp.eye(k, dtype=x_dt)
    want = np.asarray(int_matmul_reference(eye, q.data, scale, zero, layout), np.float32)
    cfgs = [BlockConfig(block_m=8, block_n=16, block_k=64, split_k=2, variant=v) for v in ("gemv", "split-gemv")]
    if x_dt != jnp.float32:  # the chunk dot (2-byte activations)
        cfgs.append(BlockConfig(block_m=64, block_n=16, block_k=512, split_k=1))
    for cfg in cfgs:
        got = int_matmul(eye, q.data, scale, zero, layout=layout, config=cfg, interpret=True)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=cfg.variant)


# ---------------------------------------------------------------------------------------------------------------
# dequantization kernel (large M: dequantize once, then the dense dot)
# ---------------------------------------------------------------------------------------------------------------
DEQUANT_SCHEMES = [
    jq.IntScheme(4, 128),
    jq.IntScheme(4, 64, symmetric=False),
    jq.IntScheme(4, 128, symmetric=False, range="minmax"),
    jq.IntScheme(8),
    jq.IntScheme(2, 128),
    jq.IntScheme(3, 128),
    jq.IntScheme(3, 64, symmetric=False),
    jq.IntScheme(4, 128, scale_dtype="float32"),
    jq.IntScheme(5, 128, symmetric=False),
    jq.IntScheme(6, 64),
    jq.IntScheme(7, 128, symmetric=False, range="minmax"),
    jq.IntScheme(4, 128, layout="nk"),  # K-major codes: each tile transposed in the kernel
    jq.IntScheme(8, 128, symmetric=False, layout="nk"),
    jq.IntScheme(2, 64, symmetric=False, range="minmax", layout="nk"),
]


# every scheme with every activation dtype; dense widths (32 strided stores per tile, slow to interpret) with one each
DEQUANT_CASES = [
    (s, dt)
    for s in DEQUANT_SCHEMES
    for dt in (jnp.bfloat16, jnp.float16, jnp.float32)
    if s.bits in (2, 4, 8) or dt == (jnp.bfloat16 if s.symmetric else jnp.float16)
]


@pytest.mark.parametrize(
    "scheme,dt",
    DEQUANT_CASES,
    ids=[
        f"b{s.bits}{'s' if s.symmetric else s.range}{'' if s.scale_dtype == 'float16' else s.scale_dtype}-"
        f"{'nk-' if s.layout == 'nk' else ''}{jnp.dtype(dt).name}"
        for s, dt in DEQUANT_CASES
    ],
)
def test_qdot_dequant_dot_bit_identical_to_the_xla_path(scheme, dt):
    """The Pallas dequantization returns exactly ``dequantize(w).astype(dt)`` (sym, zero point, min-max; 2 to 8
    bits; float16 and float32 scales, including the packed-half-precision path), so ``qdot_dequant_dot`` equals
    the XLA path bit for bit."""
    from jaxquant.core.api import dequantize
    from jaxquant.ops import _dequant_kernel_weight, kernel_mode, qdot_dequant_dot

    rng = np.random.default_rng(scheme.bits + scheme.group_size if scheme.group_size else 3)
    k, n = 512, 256
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)) * 0.3, jnp.float32), scheme)
    wd, why = _dequant_kernel_weight(q, dt, interpret=True)
    assert wd is not None, why
    np.testing.assert_array_equal(np.asarray(wd, np.float32), np.asarray(dequantize(q).astype(dt), np.float32))
    x = jnp.asarray(rng.standard_normal((3, k)), dt)
    with kernel_mode("interpret"):
        jaxpr = str(jax.make_jaxpr(qdot_dequant_dot)(x, q))
        y = jax.jit(qdot_dequant_dot)(x, q)
    assert "pallas_call" in jaxpr
    with kernel_mode("off"):
        y0 = jax.jit(jq.qdot)(x, q)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))


def test_dequant_dot_falls_back_or_fails_loudly():
    """A ragged shape has no whole tiles: the XLA dequantization (same result), or an error in mode "on"."""
    from jaxquant.ops import kernel_mode, qdot_dequant_dot
    from pallas_kernels.int4_matmul import dequantize_supported

    q = jq.quantize(jnp.ones((384, 100), jnp.float32), jq.IntScheme(4, 128))
    assert "multiple" in dequantize_supported(IntLayout(4, "sym", 384, 100, 128))
    x = jnp.ones((2, 384), jnp.bfloat16)
    with kernel_mode("interpret"):
        assert "pallas_call" not in str(jax.make_jaxpr(qdot_dequant_dot)(x, q))
        y = qdot_dequant_dot(x, q)
    with kernel_mode("off"):
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jq.qdot(x, q), np.float32))
    with kernel_mode("on"), pytest.raises(ValueError, match="no dequantization kernel"):
        qdot_dequant_dot(x, q)
    with pytest.raises(ValueError, match="do not contract"):
        qdot_dequant_dot(jnp.ones((2, 100)), q)


@requires_triton
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("s_dtype", [jnp.float32, jnp.float16])
def test_minmax_weights_are_not_contracted_into_an_fma_sm90(bits, s_dtype):
    """min-max weights ``c * s + min``: the XLA path rounds the product first (on every backend), and Triton would
    contract the expression into one ``FFMA`` (one rounding: another weight in the last bit). With float32 scales
    the dequantization kernel's sm_90 code has ``FMUL`` + ``FADD`` per weight and no ``FFMA``. With float16 scales
    every product is exact (8-bit codes times 11-bit significands), so the ``FFMA`` is the same weight and the
    kernel keeps it (no ``FSEL`` of the NaN select that blocks the contraction)."""
    import re

    from pallas_kernels.int4_matmul import int_dequantize

    lay = IntLayout(bits=bits, mode="minmax", k=1024, n=1024, group_size=128)
    fn = functools.partial(int_dequantize, layout=lay, out_dtype=jnp.bfloat16)
    stat = shape_struct((8, 1024), s_dtype)
    call = cuda_lowering(fn, shape_struct((lay.packed_rows, 1024), lay.storage_dtype), stat, stat)[0]
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)", tt.sass(tt.ir_text(call.ir)))
    if s_dtype == jnp.float32:
        assert "FFMA" not in ops and ops.count("FMUL") >= 128 and ops.count("FADD") >= 128
    else:
        assert ops.count("FFMA") >= 128 and "FSEL" not in ops


@requires_triton
@pytest.mark.parametrize("nk", [False, True])
def test_dequant_kernel_compiles_sm90_with_vector_stores(nk):
    """sm_90 machine code of the 8192^2 int4 -> bf16 dequantization: 128-bit global stores, no int-to-float
    conversion, a few instructions per weight (memory bound: 160 MB moved vs ~15 us of issue on an H100); from
    K-major codes too (the tiles transposed in the kernel), without spills."""
    import re

    from pallas_kernels.int4_matmul import int_dequantize

    lay = IntLayout(bits=4, mode="sym", k=8192, n=8192, group_size=128, nk=nk)
    fn = functools.partial(int_dequantize, layout=lay, out_dtype=jnp.bfloat16)
    packed = shape_struct((8192, 4096) if nk else (4096, 8192), jnp.uint8)
    call = cuda_lowering(fn, packed, shape_struct((64, 8192), jnp.float16), None)[0]
    assert call.name == "int4_dequantize" and call.grid == (64, 64, 1)
    (rep,) = assert_compiles([call])
    assert rep.spill_bytes == 0
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)", tt.sass(tt.ir_text(call.ir)))
    assert ops.count("STG.E.128") > 0 and not any(o.startswith("I2F") for o in ops)
    assert len(ops) * 128 / (128 * 128) <= 10  # thread instructions per weight


# ---------------------------------------------------------------------------------------------------------------
# a static code offset (ternary's 2-bit codes t + 1 read with offset 1), and the int8-activation GEMV
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,offset", [(4, 3), (2, 1)])
def test_sym_code_offset_reaches_every_kernel(bits, offset):
    """``IntLayout.offset``: ``W = (c - offset) * s``. The reference against float64 NumPy, then every kernel form
    (dot variants, GEMVs, the dequantization kernel) returns the reference's weights bit for bit from one-hot
    activations (each output is one weight); the ``+postscale`` forms within one output rounding of float64."""
    from pallas_kernels.int4_matmul import dequantize_reference, int_dequantize

    k, n = 256, 64
    rng = np.random.default_rng(bits + offset)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), jq.IntScheme(bits=bits, group_size=64))
    layout = IntLayout(bits=bits, mode="sym", k=k, n=n, group_size=64, offset=offset)
    c = np_unpack_rows(np.asarray(q.data), bits, k).astype(np.float64)
    w64 = (c - offset) * np_group_rows(np.asarray(q.scale, np.float64), 64, k, n)
    np.testing.assert_array_equal(np.asarray(dequantize_reference(q.data, q.scale, None, layout), np.float64), w64)
    eye = jnp.eye(k, dtype=jnp.bfloat16)
    want = np.asarray(int_matmul_reference(eye, q.data, q.scale, None, layout), np.float32)
    configs = [BlockConfig(64, 32, 64, 2, variant=v) for v in ("strided", "interleave", "split")]
    configs += [BlockConfig(8, 32, 64, 2, variant=v) for v in ("gemv", "split-gemv")]
    for cfg in configs:
        got = int_matmul(eye, q.data, q.scale, None, layout=layout, config=cfg, interpret=True)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=cfg.variant)
    deq = int_dequantize(
        q.data, q.scale, None, layout=layout, out_dtype=jnp.bfloat16, block_k=64, block_n=64, interpret=True
    )
    np.testing.assert_array_equal(np.asarray(deq, np.float32), want)
    x = rng.standard_normal((3, k)).astype(np.float32)
    for cfg in (
        BlockConfig(16, 32, 64, 2, variant="split+postscale"),
        BlockConfig(4, 32, 64, 2, variant="gemv+postscale"),
    ):
        got = int_matmul(jnp.asarray(x, jnp.bfloat16), q.data, q.scale, None, layout=layout, config=cfg, interpret=True)
        ref = round_to(x.astype(np.float64), jnp.bfloat16) @ w64
        assert rel_err(got, ref) < BOUND[jnp.bfloat16], cfg.variant


def test_dequantize_refuses_misshapen_scales():
    """A ``(N, G)`` (transposed) or flattened scale has the right number of elements but would be misread by a
    reshape: refused, as by ``int_matmul``; ``(N,)`` and ``()`` per-channel / per-tensor values are broadcast."""
    from pallas_kernels.int4_matmul import dequantize_reference, int_dequantize

    k, n = 256, 64
    q = jq.quantize(jnp.ones((k, n), jnp.float32), jq.IntScheme(4, 64, symmetric=False))
    layout = IntLayout(bits=4, mode="zeropoint", k=k, n=n, group_size=64)
    for bad in (q.scale.T, q.scale.reshape(-1)):
        with pytest.raises(ValueError, match="scale must be"):
            int_dequantize(q.data, bad, q.zero, layout=layout, out_dtype=jnp.bfloat16, block_n=64, interpret=True)
    with pytest.raises(ValueError, match="needs zero"):
        int_dequantize(q.data, q.scale, None, layout=layout, out_dtype=jnp.bfloat16, block_n=64, interpret=True)
    one = IntLayout(bits=4, mode="sym", k=k, n=n)
    q1 = jq.quantize(jnp.ones((k, n), jnp.float32), jq.IntScheme(4, granularity="channel"))
    want = dequantize_reference(q1.data, q1.scale, None, one).astype(jnp.bfloat16)
    for s in (q1.scale.reshape(-1), q1.scale.reshape(1, -1)):
        got = int_dequantize(q1.data, s, None, layout=one, out_dtype=jnp.bfloat16, block_n=64, interpret=True)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_code_offset_is_checked():
    with pytest.raises(ValueError, match="offset"):
        IntLayout(bits=4, mode="zeropoint", k=64, n=64, offset=1)  # a zero point already says the offset
    with pytest.raises(ValueError, match="offset"):
        IntLayout(bits=2, mode="sym", k=64, n=64, offset=4)  # not a 2-bit code
    lay = IntLayout(bits=8, mode="sym", k=64, n=32, offset=100)
    codes = jnp.zeros((64, 32), jnp.int8)  # signed int8 storage has no offset: refused, not misread
    with pytest.raises(ValueError, match="uint8"):
        int_matmul(jnp.ones((1, 64), jnp.bfloat16), codes, jnp.ones((32,)), None, layout=lay, config=BlockConfig())


def _np_gemv_a8(x, c, z, s, dtype):
    """Float32 ``((sum_k q (c - z)) * s_x) * s`` from float64 exact integer sums, rounded to ``dtype``."""
    xf = np.asarray(jnp.asarray(x, dtype), np.float32)
    amax = np.abs(xf).max(axis=1, keepdims=True)
    sx = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    xq = np.clip(np.round(xf / sx), -127, 127).astype(np.float64)
    acc = (xq @ (c - z)).astype(np.float32)  # exact integers
    return np.asarray(jnp.asarray(acc * sx * np.asarray(s, np.float32)[None, :], dtype), np.float32)


@pytest.mark.parametrize(
    "bits,mode,m,k,n,dt",
    [
        (4, "sym", 1, 256, 96, jnp.bfloat16),
        (4, "zeropoint", 3, 300, 80, jnp.float16),  # ragged K (a partial K step) and N
        (8, "sym", 5, 120, 64, jnp.float32),  # signed int8 storage; ragged M in an 8-row block
        (2, "zeropoint", 2, 200, 48, jnp.bfloat16),
    ],
)
def test_int_gemv_a8_is_the_int8_product_in_one_launch(bits, mode, m, k, n, dt):
    """``int_gemv_a8``: int8 per-token activations quantized inside the kernel times per-column integer weights,
    bit for bit the exact integer product scaled ``(acc * s_x) * s`` (ties ``x / s_x = 2.5`` included, an
    all-zero row), and one Triton kernel with nothing before or after it when lowered for CUDA."""
    from pallas_kernels.int4_matmul import int_gemv_a8

    rng = np.random.default_rng(bits * 7 + m)
    scheme = jq.IntScheme(bits=bits, group_size=None, symmetric=mode == "sym")
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), scheme)
    layout = IntLayout(bits=bits, mode=mode, k=k, n=n)
    x = rng.standard_normal((m, k)).astype(np.float32) * 2
    x[0, :4] = [127.0, 2.5, -3.5, 0.5]  # s_x = 1: exact ties
    if m > 2:
        x[1] = 0.0
    if bits == 8:
        c, z = np.asarray(q.data).astype(np.float64), 0.0
    else:
        c = np_unpack_rows(np.asarray(q.data), bits, k).astype(np.float64)
        z = 2.0 ** (bits - 1) if mode == "sym" else np.asarray(q.zero, np.float64).reshape(1, n)
    zero = None if mode == "sym" else q.zero
    cfg = BlockConfig(block_m=8 if m > 4 else 4, block_n=16, block_k=64, split_k=1, variant="split-gemv")
    got = int_gemv_a8(jnp.asarray(x, dt), q.data, q.scale, zero, layout=layout, config=cfg, interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), _np_gemv_a8(x, c, z, q.scale, dt))
    fn = functools.partial(int_gemv_a8, layout=layout, config=cfg)
    text = tt.export_cuda(fn, shape_struct((m, k), dt), q.data, q.scale, zero)
    assert len(tt.triton_calls(text)) == 1 and "stablehlo.reduce" not in text  # no pre-pass, no partial-sum pass


def test_int_gemv_a8_refuses_what_it_cannot_do_exactly():
    from pallas_kernels.int4_matmul import int_gemv_a8

    x = jnp.ones((1, 256), jnp.bfloat16)
    codes = jnp.zeros((128, 64), jnp.uint8)
    cfg = BlockConfig(block_m=1, block_n=16, block_k=64, split_k=1, variant="split-gemv")
    lay = IntLayout(bits=4, mode="sym", k=256, n=64)
    with pytest.raises(ValueError, match="group_size"):
        int_gemv_a8(x, codes, jnp.ones((2, 64)), None, layout=IntLayout(4, "sym", 256, 64, 128), config=cfg)
    with pytest.raises(ValueError, match="split_k=1"):
        int_gemv_a8(x, codes, jnp.ones((64,)), None, layout=lay, config=cfg.replace(split_k=2))
    with pytest.raises(ValueError, match="split_k=1"):
        int_gemv_a8(x, codes, jnp.ones((64,)), None, layout=lay, config=cfg.replace(variant="gemv"))
    with pytest.raises(ValueError, match="scale"):
        int_gemv_a8(x, codes, jnp.ones((3,)), None, layout=lay, config=cfg)
    big = IntLayout(bits=8, mode="sym", k=2048, n=64)  # 127 * 128 * 2048 > 2**24: sums not exact in float32
    with pytest.raises(ValueError, match="exact"):
        int_gemv_a8(jnp.ones((1, 2048)), jnp.zeros((2048, 64), jnp.int8), jnp.ones((64,)), None, layout=big, config=cfg)


@requires_triton
@pytest.mark.parametrize("device,arch,limit_kib", [("h100", 90, 227), ("a100", 80, 163)])
def test_chunk_dot_configs_fit_and_do_not_spill(device, arch, limit_kib):
    """The heuristic's chunk-dot tiles for each M class, at the widest dense width (7 bits: the most weight words
    per stage), compiled for the device's architecture: no register spills, shared memory within the device's
    per-block limit (a launch would fail above it), no int-to-float conversions, and few barriers per K-loop trip
    where the weight tile feeds mma from registers (BM <= 32)."""
    from pallas_kernels import tuning

    k = n = 8192
    layout = IntLayout(bits=7, mode="zeropoint", k=k, n=n, group_size=128)
    for m in (16, 32, 64):
        with tuning.as_device(device):
            cfg = tuning.heuristic("int7w", m, k, n, sms=132)
        args = [shape_struct((m, k), jnp.bfloat16), shape_struct((layout.packed_rows, n), jnp.uint32)]
        stats = [shape_struct((64, n), jnp.float16), shape_struct((64, n), jnp.uint8)]
        call = cuda_lowering(functools.partial(int_matmul, layout=layout, config=cfg), *args, *stats)[0]
        text = tt.ir_text(call.ir)
        report = tt.compile_cubin(text, arch, call.num_warps, call.num_stages)
        assert report.ok and report.spill_bytes == 0, (m, cfg, report)
        assert report.shared_bytes <= limit_kib * 1024, (m, cfg, report.shared_bytes)
        loop = tt.loop_profile(tt.sass(text, arch, call.num_warps, call.num_stages))
        # codes become floats by integer ops (exact_field): one I2F per weight would be 512 * BN / 128 per trip; sm_80
        # converts the step's (16, BN) uint8 zero-point tile once (16 * BN / 128), shared by the 32 code positions
        assert loop.count("I2F") <= 16 * cfg.block_n // 128, (m, cfg)
        if cfg.block_m <= 32:
            assert loop.count("BAR") <= 4, (m, cfg)


# K-major (``IntScheme(layout="nk")``) storage: (m, k, n, bits, group, symmetric, range, variant, split_k, x dtype)
NK_CASES = [
    (1, 256, 128, 4, 128, True, "zeropoint", "split", 2, jnp.bfloat16),
    (5, 200, 80, 4, 64, False, "zeropoint", "split", 1, jnp.float16),  # ragged M, K, N; short last group
    (33, 256, 96, 4, 128, False, "minmax", "strided", 1, jnp.float32),
    (3, 300, 64, 8, 128, True, "zeropoint", "split", 3, jnp.bfloat16),  # int8 codes, one tile per step
    (2, 320, 48, 8, None, False, "zeropoint", "strided", 1, jnp.bfloat16),
    (17, 320, 48, 2, 64, False, "zeropoint", "split", 1, jnp.float32),  # 2-bit: four column sets
    (4, 256, 64, 4, 128, True, "zeropoint", "split+postscale", 2, jnp.bfloat16),
    (9, 264, 40, 2, 64, False, "zeropoint", "strided+postscale", 1, jnp.float16),
    # the GEMV (8 rows per block): each column's codes a row of the tile, the sums along K reduced after the loop
    (1, 256, 128, 4, 128, True, "zeropoint", "gemv", 2, jnp.bfloat16),
    (5, 200, 80, 4, 64, False, "minmax", "gemv", 1, jnp.float16),
    (3, 300, 64, 8, 128, False, "zeropoint", "gemv+postscale", 2, jnp.bfloat16),
    (2, 320, 48, 2, 64, True, "zeropoint", "gemv", 1, jnp.float32),
]


@pytest.mark.parametrize("case", NK_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}b{c[3]}g{c[4]}{c[7]}s{c[8]}")
def test_kmajor_storage_gives_the_kn_result_bit_for_bit(case):
    """The same weights stored K-major, ``(N, packed rows)``: the kernel computes the (K, N) storage's weights (the
    XLA references agree bit for bit) and products; its output differs from the (K, N) kernel's only by the dot's
    summation order (a transposed contraction), within the float64 bounds of the other tests."""
    m, k, n, bits, group, sym, rng_mode, variant, split, dt = case
    rng = np.random.default_rng(7 * m + k + bits)
    w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
    kw = {"bits": bits, "group_size": group, "symmetric": sym, "range": rng_mode}
    q_kn = jq.quantize(w, jq.IntScheme(**kw))
    q_nk = jq.quantize(w, jq.IntScheme(**kw, layout="nk"))
    mode = "sym" if sym else rng_mode
    layout = IntLayout(bits=bits, mode=mode, k=k, n=n, group_size=group)
    layout_nk = IntLayout(bits=bits, mode=mode, k=k, n=n, group_size=group, nk=True)
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    cfg = BlockConfig(block_m=8 if "gemv" in variant else 16, block_n=32, block_k=128, split_k=split, variant=variant)
    zero = None if sym else q_kn.zero
    y_kn = int_matmul(x, q_kn.data, q_kn.scale, zero, layout=layout, config=cfg, interpret=True)
    y_nk = int_matmul(x, q_nk.data, q_nk.scale, zero, layout=layout_nk, config=cfg, interpret=True)
    assert rel_err(y_nk, y_kn) <= BOUND[dt]
    wd64 = np_dequant(q_kn, bits, group, sym, rng_mode, k, n)
    assert rel_err(y_nk, np.asarray(x, np.float64) @ round_to(wd64, dt)) <= (3e-3 if "post" in variant else BOUND[dt])
    np.testing.assert_array_equal(
        np.asarray(int_matmul_reference(x, q_nk.data, q_nk.scale, zero, layout_nk)),
        np.asarray(int_matmul_reference(x, q_kn.data, q_kn.scale, zero, layout)),
    )


def test_kmajor_storage_refuses_what_it_cannot_run():
    lay = IntLayout(bits=4, mode="sym", k=256, n=64, group_size=128, nk=True)
    for variant in ("interleave", "interleave+postscale", "split-gemv", "split-gemv+postscale"):
        bm = 1 if "gemv" in variant else 16
        why = supported(lay, BlockConfig(bm, 64, 128, variant=variant), jnp.bfloat16)
        assert why and "K-major" in why, variant
    for variant in ("", "strided", "split", "split+postscale", "gemv", "gemv+postscale"):
        bm = 1 if "gemv" in variant else 16
        assert supported(lay, BlockConfig(bm, 64, 128, variant=variant), jnp.bfloat16) is None, variant
    x = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"must be \(64, 128\) \(K-major\)"):
        int_matmul(x, jnp.zeros((128, 64), jnp.uint8), jnp.ones((2, 64)), None, layout=lay,
                   config=BlockConfig(16, 64, 128, variant="split"), interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="2/4/8-bit"):
        IntLayout(bits=3, mode="sym", k=256, n=64, nk=True)


@requires_triton
def test_kmajor_weight_tiles_are_read_by_ldmatrix_sm90():
    """Why K-major storage exists: in the sm_90 K loop of the split dot (M=1, 8192^2, the 16x64x128 tile) the (K, N)
    byte tile is read from shared memory one byte per load (``LDS.U8``, 32 per thread per trip); stored (N, K) it is
    read by ``ldmatrix`` (``LDSM``), two per thread per trip, with no byte loads."""

    def loop(nk: bool) -> tt.LoopProfile:
        layout = IntLayout(bits=4, mode="sym", k=8192, n=8192, group_size=128, nk=nk)
        cfg = BlockConfig(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3, variant="split")
        w_shape = (8192, layout.packed_rows) if nk else (layout.packed_rows, 8192)
        args = [
            shape_struct((1, 8192), jnp.bfloat16),
            shape_struct(w_shape, jnp.uint8),
            shape_struct((layout.groups, 8192), jnp.float16),
            None,
        ]
        call = cuda_lowering(functools.partial(int_matmul, layout=layout, config=cfg), *args)[0]
        assert_compiles([call])
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    kn, nk = loop(False), loop(True)
    assert kn.counts.get("LDS.U8", 0) >= 32
    assert nk.counts.get("LDS.U8", 0) == 0 and nk.count("LDSM") >= 2
    assert nk.count("HMMA") == kn.count("HMMA") > 0 and nk.count("I2F") == 0


@requires_triton
def test_kmajor_gemv_streams_the_weight_into_registers_sm90():
    """The K-major GEMV's sm_90 K loop (M=1, 8192^2, 1x64x128 tiles): each column's bytes are contiguous, so the
    weight arrives by 16-byte global loads straight into registers: no shared memory, no barrier, no spill."""
    layout = IntLayout(bits=4, mode="sym", k=8192, n=8192, group_size=128, nk=True)
    cfg = BlockConfig(1, 64, 128, split_k=8, num_warps=4, num_stages=4, variant="gemv+postscale")
    args = [
        shape_struct((1, 8192), jnp.bfloat16),
        shape_struct((8192, layout.packed_rows), jnp.uint8),
        shape_struct((layout.groups, 8192), jnp.float16),
        None,
    ]
    call = cuda_lowering(functools.partial(int_matmul, layout=layout, config=cfg), *args)[0]
    (rep,) = assert_compiles([call])
    assert rep.spill_bytes == 0
    loop = tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))
    assert loop.counts.get("LDG.E.128", 0) >= 4
    assert loop.count("LDS") == 0 and loop.count("STS") == 0 and loop.barriers == 0 and loop.count("I2F") == 0


# one group over all of K (per-channel scales): (m, k, n, bits, symmetric, variant, split_k, nk, x dtype)
ONE_GROUP_CASES = [
    (3, 384, 64, 8, True, "strided", 2, False, jnp.bfloat16),
    (3, 384, 64, 8, True, "split+postscale", 3, False, jnp.bfloat16),
    (5, 300, 40, 8, False, "strided+postscale", 1, True, jnp.float16),  # ragged K, N; zero points
    (2, 256, 96, 4, False, "split", 2, True, jnp.bfloat16),
    (1, 384, 64, 8, True, "gemv+postscale", 3, False, jnp.float32),
    (4, 300, 48, 8, False, "split-gemv+postscale", 1, False, jnp.bfloat16),
    (2, 256, 64, 4, True, "gemv", 2, True, jnp.float16),
    (1, 256, 64, 8, True, "gemv+postscale", 2, True, jnp.bfloat16),
]


@pytest.mark.parametrize("case", ONE_GROUP_CASES, ids=lambda c: f"m{c[0]}k{c[1]}n{c[2]}b{c[3]}{c[5]}s{c[6]}nk{c[7]}")
def test_per_channel_scales_are_applied_once(case):
    """Per-channel scales (one group over K) are loaded once per program and ``+postscale`` applies them once to the
    finished sum: the result stays within the float64 bounds of the grouped forms (``+postscale``: within one
    output rounding of the unrounded weights; the others: the XLA path's rounded weights, summation order only)."""
    m, k, n, bits, sym, variant, split, nk, dt = case
    rng = np.random.default_rng(11 * m + k + bits)
    w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
    scheme = jq.IntScheme(bits=bits, group_size=None, symmetric=sym, layout="nk" if nk else "kn")
    q = jq.quantize(w, scheme)
    q_kn = jq.quantize(w, jq.IntScheme(bits=bits, group_size=None, symmetric=sym))
    layout = IntLayout(bits=bits, mode="sym" if sym else "zeropoint", k=k, n=n, group_size=None, nk=nk)
    bm = 8 if "gemv" in variant else 16
    cfg = BlockConfig(block_m=bm, block_n=32, block_k=64, split_k=split, variant=variant)
    assert supported(layout, cfg, dt) is None
    zero = None if sym else q.zero
    y = int_matmul(x := jnp.asarray(rng.standard_normal((m, k)), dt), q.data, q.scale, zero, layout=layout,
                   config=cfg, interpret=True)  # fmt: skip
    assert y.shape == (m, n) and y.dtype == x.dtype
    wd64 = np_dequant(q_kn, bits, None, sym, "zeropoint", k, n)
    x64 = np.asarray(x, np.float64)
    if "post" in variant:
        assert rel_err(y, x64 @ wd64) <= BOUND[dt]
    else:
        assert rel_err(y, x64 @ round_to(wd64, dt)) <= BOUND[dt]
        yr = int_matmul_reference(x, q.data, q.scale, zero, layout)
        assert rel_err(y, yr) <= BOUND[dt]


@requires_triton
@pytest.mark.parametrize("nk,variant", [(False, "split+postscale"), (True, "strided"), (True, "split+postscale")])
def test_per_channel_scale_rows_leave_the_k_loop_sm90(nk, variant):
    """int8 W8A16 per channel (sm_90, M=1, 8192^2, 16x64x128): the scale row is loaded before the K loop, so the
    loop has no global load it waits for (per step, a float16 scale load that no dot consumes, or one in K-major
    columns, is not pipelined by Triton: 2 exposed loads per trip before)."""
    layout = IntLayout(bits=8, mode="sym", k=8192, n=8192, group_size=None, nk=nk)
    cfg = BlockConfig(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=4, variant=variant)
    w_shape = (8192, layout.packed_rows) if nk else (layout.packed_rows, 8192)
    args = [
        shape_struct((1, 8192), jnp.bfloat16),
        shape_struct(w_shape, jnp.int8),
        shape_struct((1, 8192), jnp.float16),
        None,
    ]
    call = cuda_lowering(functools.partial(int_matmul, layout=layout, config=cfg), *args)[0]
    (rep,) = assert_compiles([call])
    assert rep.spill_bytes == 0
    loop = tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))
    assert loop.exposed_loads == 0 and loop.count("HMMA") > 0
