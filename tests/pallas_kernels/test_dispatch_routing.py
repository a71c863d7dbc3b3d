"""qdot's routing between the Pallas kernels and the XLA path on measured devices (no GPU needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxquant as jq
from jaxquant import ops
from pallas_kernels import _common, tuning


@pytest.fixture
def fake_h200(monkeypatch):
    """Pretend the default device is an H200 with a GPU backend (only the dispatch decision is exercised)."""
    monkeypatch.setattr(_common, "gpu_available", lambda: True)
    monkeypatch.setattr(tuning, "device_key", lambda kind=None: "h200")


def _x(m, k):
    return jax.ShapeDtypeStruct((m, k), jnp.bfloat16)


def test_use_kernel_follows_limits():
    assert tuning.use_kernel("int4", 1, "h200") and tuning.use_kernel("int4", 128, "h200")
    assert not tuning.use_kernel("int4", 129, "h200") and not tuning.use_kernel("int4", 4096, "h200")
    # the H100 measured int4 faster than the XLA path at M=256 (the H200 did not)
    assert tuning.use_kernel("int4", 256, "h100") and not tuning.use_kernel("int4", 257, "h100")
    # every kernel: the fused kernel wherever it was measured faster (M <= 16); LLM.int8 (1.1x there) no further
    for dev in ("h200", "h100"):
        for name in set(tuning.LIMITS[dev]) - set(tuning.STORAGE_KEYS):
            assert tuning.use_kernel(name, 16, dev) and tuning.limit_measured(name, dev), (dev, name)
        assert not tuning.use_kernel("int8_outlier", 17, dev)
    # no measurement on that GPU: the estimated limits (the H200's; 256 for the dense chunk dot)
    assert tuning.use_kernel("int4", 128, "some_unmeasured_gpu") and not tuning.use_kernel("int4", 4096, "a100")
    assert not tuning.limit_measured("int4", "a100") and tuning.max_m("int3w", "h100") == 256
    assert tuning.max_m("int8w", "a100") == tuning.max_m("int8w", "h200")
    for dev in ("h200", "h100"):
        for name in ("int4", "int8w", "nf4", "int8_outlier", "fp8_w8a16", "fp8_w8a8", "ternary", "ternary_a8"):
            assert not tuning.use_kernel(name, 4096, dev), (dev, name)
    assert tuning.device_key("NVIDIA H200") == "h200" and tuning.device_key("NVIDIA H100 80GB HBM3") == "h100"


def test_measured_int4_config_in_table():
    cfg = tuning.get_config("int4", 1, 8192, 8192, device="h200")
    assert (cfg.split_k, cfg.variant, cfg.num_stages) == (4, "interleave", 5)
    assert tuning.get_config("int4", 16, 4096, 4096, device="h100") == cfg
    assert tuning.get_config("int4", 1, 8192, 8192, device="unmeasured") == tuning.heuristic("int4", 1, 8192, 8192)


def test_qdot_routes_large_m_to_xla_on_h200(fake_h200):
    q = jq.quantize(jnp.ones((256, 128), jnp.float32), jq.IntScheme(bits=4, group_size=128))
    with ops.kernel_mode("auto"):
        assert ops.explain_qdot(_x(1, 256), q).startswith("kernel: int4")
        assert ops.explain_qdot(_x(16, 256), q).startswith("kernel: int4")
        big = ops.explain_qdot(_x(4096, 256), q)
        assert big.startswith("xla") and "M=4096 above the tuned limit 128" in big
        # leading dims count towards M
        assert ops.explain_qdot(jax.ShapeDtypeStruct((2, 2048, 256), jnp.bfloat16), q).startswith("xla")
    with ops.kernel_mode("on"):  # forced kernels (benchmarks) ignore the limits
        assert ops.explain_qdot(_x(4096, 256), q).startswith("kernel: int4")
    with ops.kernel_mode("interpret"):
        assert ops.explain_qdot(_x(4096, 256), q).startswith("kernel: int4")


def test_qdot_routes_nf4_and_fp8(fake_h200):
    qn = jq.quantize(jnp.ones((256, 128), jnp.float32), jq.NF4Scheme(block_size=64))
    qf = jq.quantize(jnp.ones((256, 128), jnp.float32), jq.FP8Scheme(fmt="e4m3", granularity="channel"))
    with ops.kernel_mode("auto"):
        small = ops.explain_qdot(_x(4, 256), qn)
        assert small.startswith("kernel: nf4") and "select" in small
        assert ops.explain_qdot(_x(512, 256), qn).startswith("xla:")
        assert ops.explain_qdot(_x(8, 256), qf).startswith("kernel: fp8_w8a16")
        assert ops.explain_qdot(_x(4096, 256), qf).startswith("xla:")


def test_routed_call_computes_the_xla_result(fake_h200):
    """A call routed to XLA on the 'GPU' runs (on CPU) exactly the XLA path."""
    q = jq.quantize(jax.random.normal(jax.random.PRNGKey(0), (256, 64)), jq.IntScheme(bits=4, group_size=128))
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 256), jnp.float32)
    with ops.kernel_mode("auto"):
        y = ops.qdot(x, q)
    with ops.kernel_mode("off"):
        y0 = ops.qdot(x, q)
    assert jnp.array_equal(y, y0)


def test_large_m_dequant_kernel_only_where_measured(fake_h200, monkeypatch):
    """Above the fused kernel's limit qdot takes the XLA path; it swaps in the Pallas dequantization (the same
    weights) only for a device and kernel that :data:`tuning.DEQUANT_DOT` records, from that M on."""
    q = jq.quantize(jnp.ones((256, 128), jnp.float32), jq.IntScheme(bits=4, group_size=128))
    monkeypatch.setitem(tuning.DEQUANT_DOT, "h200", {})
    with ops.kernel_mode("auto"):
        assert ops.explain_qdot(_x(4096, 256), q).startswith("xla: M=4096")
        assert not tuning.use_dequant_dot("int4", 4096)
        monkeypatch.setitem(tuning.DEQUANT_DOT, "h200", {"int4": 256})
        assert tuning.use_dequant_dot("int4", 4096) and tuning.use_dequant_dot("int4", 256)
        assert not tuning.use_dequant_dot("int4", 128)  # below the recorded M
        assert not tuning.use_dequant_dot("int4", 16)  # the fused kernel runs there
        assert not tuning.use_dequant_dot("int8w", 4096)
        assert ops.explain_qdot(_x(4096, 256), q).startswith("xla with the Pallas dequantization")
        assert "int4_dequantize" in str(jax.make_jaxpr(ops.qdot)(_x(4096, 256), q))
    with ops.kernel_mode("off"):
        assert ops.explain_qdot(_x(4096, 256), q).startswith("xla: ")


def test_large_m_nf4_dequant_kernel_only_where_measured(fake_h200, monkeypatch):
    """The same routing for NF4 (QLoRA training and prefill run large M over NF4 weights)."""
    q = jq.quantize(jnp.ones((256, 128), jnp.float32), jq.NF4Scheme(double_quant=True))
    monkeypatch.setitem(tuning.DEQUANT_DOT, "h200", {})
    with ops.kernel_mode("auto"):
        assert ops.explain_qdot(_x(4096, 256), q).startswith("xla: M=4096")
        monkeypatch.setitem(tuning.DEQUANT_DOT, "h200", {"nf4": 1024})
        assert ops.explain_qdot(_x(512, 256), q).startswith("xla: M=512")
        assert ops.explain_qdot(_x(4096, 256), q).startswith("xla with the Pallas dequantization")
        assert "nf4_dequantize" in str(jax.make_jaxpr(ops.qdot)(_x(4096, 256), q))


def test_h200_measured_routes(fake_h200):
    """What the H200 run of 2026-11-28 put in the tables: int4 fused to M=128, Pallas dequantization + dot from 256;
    NF4's from 4096; W1.58A8's dp4a GEMV and LLM.int8's one-launch split at M=1 only."""
    q = jq.quantize(jnp.ones((256, 128), jnp.float32), jq.IntScheme(bits=4, group_size=128))
    with ops.kernel_mode("auto"):
        assert ops.explain_qdot(_x(128, 256), q).startswith("kernel: int4")
        assert ops.explain_qdot(_x(256, 256), q).startswith("xla with the Pallas dequantization")
    assert not tuning.use_dequant_dot("nf4", 1024) and tuning.use_dequant_dot("nf4", 4096)
    assert tuning.get_config("ternary_a8", 1, 8192, 8192).variant == "dp4a-gemv"
    assert tuning.get_config("ternary_a8", 2, 8192, 8192).variant == ""
    assert tuning.get_config("int8_outlier", 1, 8192, 8192).variant == "prepass"
    assert tuning.get_config("int8_outlier", 2, 8192, 8192).variant != "prepass"
    assert tuning.get_config("ternary_a8", 1, 8192, 8192, "h100").variant != "dp4a-gemv"  # not measured there


def test_rows_for_another_storage_are_skipped(fake_h200):
    """The H200's M=1 W1.58A8 row is the dp4a GEMV, which reads codes packed along K (per-channel scales); per-tensor
    ternary weights (packed along N) take the next row that runs them (the 16-row dot), not the XLA path."""
    x = _x(1, 256)
    per_channel = jq.quantize(jnp.ones((256, 128), jnp.float32), jq.TernaryScheme(granularity="channel"))
    per_tensor = jq.quantize(jnp.ones((256, 128), jnp.float32), jq.TernaryScheme())
    with ops.kernel_mode("interpret"):
        assert "dp4a-gemv" in ops._ternary_adapter(x, per_channel, 1, True, mode="a8")[1]
        plan, why = ops._ternary_adapter(x, per_tensor, 1, True, mode="a8")
        assert plan is not None and "variant=''" in why and "block_m=16" in why
        assert "pallas_call" in str(jax.make_jaxpr(ops.qdot_ternary_a8)(x, per_tensor))


def test_fp8_w8a8_storage_key(fake_h200):
    """fp8 W8A8 from (N, K) codes has its own H200 key: its "prequant" row at M=1, the XLA path (XLA's fp8 GEMM on the
    codes as stored, measured faster) from M=2; (K, N) codes keep the kernel to 64. Devices without an entry for the
    storage key (the H100 measured (K, N) codes only) take the kernel's rows and limit."""
    assert tuning.base_kernel("fp8_w8a8_nk") == "fp8_w8a8" and tuning.base_kernel("int4") == "int4"
    assert tuning.get_config("fp8_w8a8_nk", 1, 8192, 8192).variant == "prequant"
    # above its own rows: the kernel's rows (the 16-row dot), not the heuristic's
    assert tuning.get_config("fp8_w8a8_nk", 16, 8192, 8192) == tuning.get_config("fp8_w8a8", 16, 8192, 8192)
    assert tuning.get_config("fp8_w8a8", 1, 8192, 8192).variant == "gemv"
    assert tuning.max_m("fp8_w8a8_nk") == 1 and tuning.max_m("fp8_w8a8") == 64
    for dev in ("h100", "a100"):
        assert tuning.get_config("fp8_w8a8_nk", 1, 8192, 8192, dev) == tuning.get_config("fp8_w8a8", 1, 8192, 8192, dev)
        assert tuning.max_m("fp8_w8a8_nk", dev) == tuning.max_m("fp8_w8a8", dev) == 64
        assert tuning.limit_measured("fp8_w8a8_nk", dev) == tuning.limit_measured("fp8_w8a8", dev)
    assert tuning.heuristic("fp8_w8a8_nk", 4096, 8192, 8192) == tuning.heuristic("fp8_w8a8", 4096, 8192, 8192)

    w = jax.random.normal(jax.random.PRNGKey(0), (256, 128)) * 0.02
    nk = jq.quantize(w, jq.FP8Scheme(fmt="e4m3", granularity="channel", layout="nk"))
    kn = jq.quantize(w, jq.FP8Scheme(fmt="e4m3", granularity="channel"))

    def kernel_call(m, q):
        jaxpr = str(jax.make_jaxpr(ops.qdot_fp8_w8a8)(jnp.ones((m, 256), jnp.bfloat16), q))
        return "pallas_call" in jaxpr

    with ops.kernel_mode("auto"):
        assert kernel_call(1, nk) and not kernel_call(2, nk) and not kernel_call(16, nk)
        assert kernel_call(1, kn) and kernel_call(16, kn) and kernel_call(64, kn) and not kernel_call(65, kn)


def test_kmajor_int_codes_route_to_the_split_dot(fake_h200):
    """K-major integer codes (``IntScheme(layout="nk")``) have their own key: the H200's int4 rows (``interleave``,
    which they cannot run) are skipped for the split dot; the limit and the Pallas dequantization above it are
    int4's."""
    w = jax.random.normal(jax.random.PRNGKey(0), (256, 128)) * 0.05
    q = jq.quantize(w, jq.IntScheme(bits=4, group_size=128, layout="nk"))
    with ops.kernel_mode("auto"):
        small = ops.explain_qdot(_x(1, 256), q)
        assert small.startswith("kernel: int4_nk") and "variant='split'" in small
        assert ops.explain_qdot(_x(128, 256), q).startswith("kernel: int4_nk")
        assert ops.explain_qdot(_x(256, 256), q).startswith("xla with the Pallas dequantization")
        assert "int4_dequantize" in str(jax.make_jaxpr(ops.qdot)(_x(256, 256), q))
    assert tuning.heuristic("int4_nk", 4096, 8192, 8192).variant == "split"
    assert tuning.heuristic("int4", 4096, 8192, 8192).variant == "interleave"
    with ops.kernel_mode("on"):
        assert "variant='split'" in ops.explain_qdot(_x(4096, 256), q)


def test_act_order_weights_never_reach_the_integer_kernels():
    """GPTQ act-order weights carry their own group per input row (``aux["g_idx"]``), which the kernels do not
    read: ``qdot`` takes the XLA path for them (it once ran the kernel with groups ``k // group_size``: wrong)."""
    import dataclasses

    w = jax.random.normal(jax.random.PRNGKey(0), (256, 64)) * 0.05
    q = jq.quantize(w, jq.IntScheme(bits=4, group_size=64))
    g_idx = (jax.random.permutation(jax.random.PRNGKey(3), 256) // 64).astype(jnp.int32)
    q = dataclasses.replace(q, aux={"g_idx": g_idx})
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 256), jnp.float32).astype(jnp.bfloat16)
    with ops.kernel_mode("off"):
        want = ops.qdot(x, q)
    with ops.kernel_mode("interpret"):
        assert "act-order" in ops.explain_qdot(x, q)
        assert jnp.array_equal(ops.qdot(x, q), want)
        assert jnp.array_equal(ops.qdot_dequant_dot(x, q), want)
