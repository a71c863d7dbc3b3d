"""qdot: float kernels, every scheme's QArray, bf16 activations, jit and batched inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

K, N = 96, 24

SCHEMES = [
    jq.IntScheme(4, 32),
    jq.IntScheme(3, 64, symmetric=False),
    jq.IntScheme(5, 32, symmetric=False, range="minmax"),
    jq.IntScheme(8),
    jq.IntScheme(8, granularity="tensor", scale_dtype="float32"),
    jq.NF4Scheme(),
    jq.NF4Scheme(double_quant=True),
    jq.FP8Scheme("e4m3"),
    jq.FP8Scheme("e5m2", "channel"),
    jq.TernaryScheme(),
    jq.TernaryScheme("channel", "base3"),
    jq.CastScheme("bfloat16"),
    jq.CastScheme("float16"),
]


@pytest.fixture(scope="module")
def data():
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 5, K))
    w = jax.random.normal(kw, (K, N)) * 0.05
    return x, w


def _assert_close_f32(y, ref):
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_float_kernel_is_matmul(data):
    x, w = data
    x2 = x[0]
    y = jq.qdot(x2, w)
    assert y.shape == (5, N) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x2 @ w))
    _assert_close_f32(y, np.asarray(x2, np.float64) @ np.asarray(w, np.float64))
    y3 = jq.qdot(x, w)
    assert y3.shape == (2, 5, N)
    np.testing.assert_array_equal(np.asarray(y3), np.asarray(x @ w))
    # bf16 activations: the kernel is cast to bf16, accumulation in float32, output bf16
    xb = x2.astype(jnp.bfloat16)
    yb = jq.qdot(xb, w)
    assert yb.dtype == jnp.bfloat16
    ref = np.asarray(xb, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(yb, np.float64), ref, rtol=2**-7, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_qarray_equals_dequantized_matmul(data, scheme):
    x, w = data
    q = jq.quantize(w, scheme)
    w_hat = np.asarray(jq.dequantize(q), np.float64)
    ref3 = np.asarray(x, np.float64) @ w_hat

    y = jq.qdot(x[0], q)
    assert y.shape == (5, N) and y.dtype == jnp.float32
    _assert_close_f32(y, ref3[0])

    # rank-3 activations and jit (the QArray is a traced argument)
    y3 = jax.jit(jq.qdot)(x, q)
    assert y3.shape == (2, 5, N)
    _assert_close_f32(y3, ref3)

    # bf16 activations: x @ bf16(dequantize(q)), float32 accumulation, bf16 output
    xb = x.astype(jnp.bfloat16)
    yb = jax.jit(jq.qdot)(xb, q)
    assert yb.dtype == jnp.bfloat16 and yb.shape == (2, 5, N)
    refb = np.asarray(xb, np.float64) @ np.asarray(jq.dequantize(q).astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(yb, np.float64), refb, rtol=2**-7, atol=1e-5 * np.abs(refb).max())


def test_quantized_error_is_small(data):
    """Sanity of the whole path: 8-bit and 4-bit kernels give outputs close to the float product."""
    x, w = data
    ref = np.asarray(x @ w, np.float64)
    for scheme, tol in [(jq.IntScheme(8), 0.01), (jq.IntScheme(4, 32), 0.12), (jq.NF4Scheme(), 0.12)]:
        y = np.asarray(jq.qdot(x, jq.quantize(w, scheme)), np.float64)
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < tol


def test_llm_int8_quantizes_activations_too(data):
    """LLM.int8 is the one scheme whose qdot is not x @ dequantize(q): x is int8-quantized per row (see
    tests/schemes/test_llm_int8.py for the exact reference); the difference is the activation rounding."""
    x, w = data
    q = jq.quantize(w, jq.LLMInt8Scheme())
    y = np.asarray(jax.jit(jq.qdot)(x, q), np.float64)
    ref = np.asarray(x, np.float64) @ np.asarray(jq.dequantize(q), np.float64)
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.02
    yb = jq.qdot(x.astype(jnp.bfloat16), q)
    assert yb.dtype == jnp.bfloat16 and yb.shape == (2, 5, N)


def test_qdot_inside_a_jitted_model(data):
    x, w = data
    params = jq.quantize_params({"l1": {"kernel": w}, "l2": {"kernel": w.T}}, [(r".*kernel", jq.IntScheme(4, 32))])

    @jax.jit
    def forward(params, x):
        return jq.qdot(jax.nn.relu(jq.qdot(x, params["l1"]["kernel"])), params["l2"]["kernel"])

    y = forward(params, x)
    assert y.shape == (2, 5, K)
    w1 = np.asarray(jq.dequantize(params["l1"]["kernel"]), np.float64)
    w2 = np.asarray(jq.dequantize(params["l2"]["kernel"]), np.float64)
    ref = np.maximum(np.asarray(x, np.float64) @ w1, 0) @ w2
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_explain_qdot_for_a_named_gpu_from_any_machine():
    """``explain_qdot(..., device="h100")`` gives the route ``qdot`` takes on that GPU (its table, its M limits, the
    kernels' own limits) without one: shapes only (``jax.eval_shape``), nothing compiled; the local answer after it
    is unchanged, and kernel mode "off" is honoured."""
    from pallas_kernels import tuning

    w = jax.ShapeDtypeStruct((8192, 8192), jnp.float32)

    def route(scheme, m, **kw):
        q = jax.eval_shape(lambda v: jq.quantize(v, scheme), w)
        return jq.ops.explain_qdot(jax.ShapeDtypeStruct((m, 8192), jnp.bfloat16), q, **kw)

    int4 = jq.IntScheme(4, 128)
    want = repr(tuning.TABLE["h100"]["int4"][0][1])
    assert route(int4, 1, device="h100") == f"kernel: int4 {want}"
    assert route(int4, 4096, device="h100").startswith("xla: M=4096 above the tuned limit 256 for int4 on h100")
    assert route(jq.IntScheme(6, 128, symmetric=False), 1, device="h100").startswith("kernel: int6w")
    int6 = jq.IntScheme(6, 128, symmetric=False)
    assert route(int6, 16, device="h100").startswith("kernel: int6w BlockConfig(block_m=16, block_n=64, block_k=512")
    assert "estimated limit 256" in route(int6, 1024, device="h100")
    assert "repack" in route(jq.TernaryScheme("channel", "base3"), 1, device="h100")
    assert route(int4, 64, device="b200").startswith("kernel: int4")  # no table: the heuristics
    assert "estimated limit 128 for int4 on b200" in route(int4, 4096, device="b200")  # no measurement: estimates
    if jax.default_backend() == "cpu":
        assert route(int4, 1) == "xla: kernel mode 'auto' on backend 'cpu'"
    with jq.ops.kernel_mode("off"):
        assert route(int4, 1, device="h100") == "xla: kernel mode 'off' on backend " + repr(jax.default_backend())
    assert tuning.device_key() != "h100" or jax.default_backend() == "gpu"
    with pytest.raises(ValueError, match="device key"):
        with tuning.as_device(""):
            pass
