"""jaxquant.nn layers against float / numpy references, within each scheme's error bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.nn import (
    BitLinear,
    Fp8Linear,
    Int8OutlierLinear,
    LoRA,
    QLinear,
    QWeight,
    layer_from_saved,
    layer_spec,
    ternary_codes,
)

K, N, M = 96, 40, 12


def _w(seed: int = 0, k: int = K, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, (k, n)).astype(np.float32)


def _x(seed: int = 1, m: int = M, k: int = K, outliers: tuple[int, ...] = ()) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1.0, (m, k)).astype(np.float32)
    for j in outliers:
        x[:, j] *= 20.0  # LLM.int8-style outlier feature dims (|x| >> 6)
    return x


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# ------------------------------------------------------------------------------------------------- QLinear
@pytest.mark.parametrize(
    "scheme",
    [jq.IntScheme(8), jq.IntScheme(4, 32), jq.NF4Scheme(), jq.NF4Scheme(double_quant=True), jq.FP8Scheme("e4m3")],
    ids=lambda s: s.describe(),
)
def test_qlinear_is_x_times_dequantized_weight(scheme) -> None:
    w, x = _w(), _x()
    b = np.linspace(-1, 1, N).astype(np.float32)
    layer = QLinear(jnp.asarray(w), scheme, jnp.asarray(b))
    y = np.asarray(layer(jnp.asarray(x)))
    w_hat = _f64(jq.dequantize(layer.kernel.get_value()))
    # the layer computes exactly x @ W_hat + b (float32 accumulation)
    ref = _f64(x) @ w_hat + b
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)
    # and |y - (x @ W + b)| <= sum_k |x_k| |W_kn - W_hat_kn| (+ float32 rounding)
    bound = np.abs(_f64(x)) @ np.abs(_f64(w) - w_hat)
    assert np.all(np.abs(y - (_f64(x) @ _f64(w) + b)) <= bound + 1e-5)
    assert isinstance(layer.kernel, QWeight) and not isinstance(layer.kernel, nnx.Param)


def test_qlinear_keeps_leading_dims_and_dtype() -> None:
    layer = QLinear(jnp.asarray(_w()), jq.IntScheme(8))
    x = jnp.asarray(_x().reshape(3, 4, K), jnp.bfloat16)
    y = layer(x)
    assert y.shape == (3, 4, N) and y.dtype == jnp.bfloat16


def test_qlinear_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        QLinear(jnp.ones((K,)), jq.NF4Scheme())
    with pytest.raises(ValueError, match="give a scheme"):
        QLinear(jnp.asarray(_w()))
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        QLinear(jnp.asarray(_w()), jq.IntScheme(8), jnp.ones(3))
    with pytest.raises(ValueError, match="do not contract"):
        QLinear(jnp.asarray(_w()), jq.IntScheme(8))(jnp.ones((2, K + 1)))


# ------------------------------------------------------------------------------------------------- LLM.int8
def _int8_reference(x: np.ndarray, w: np.ndarray, threshold: float | None, tensor: bool = False) -> np.ndarray:
    """LLM.int8() in numpy: outlier dims in float against the dequantized int8 weights, the rest int8 x int8."""
    ax = None if tensor else 0
    sw = np.max(np.abs(w), axis=ax, keepdims=True) / np.float32(127)
    wq = np.clip(np.round(w / sw), -127, 127)
    w_hat = wq * sw
    out = np.zeros(x.shape[1], bool) if threshold is None else np.max(np.abs(x), axis=0) > threshold
    xo, xr = np.where(out, x, 0), np.where(out, 0, x)
    sx = np.max(np.abs(xr), axis=None if tensor else 1, keepdims=True) / np.float32(127)
    sx = np.where(sx > 0, sx, 1)
    xq = np.clip(np.round(xr / sx), -127, 127)
    return (xq.astype(np.int64) @ wq.astype(np.int64)) * _f64(sx) * _f64(sw) + _f64(xo) @ _f64(w_hat)


@pytest.mark.parametrize("threshold", [None, 6.0])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_llm_int8_matches_numpy_reference(threshold, granularity) -> None:
    w, x = _w(), _x(outliers=(3, 50))
    layer = Int8OutlierLinear(jnp.asarray(w), threshold=threshold, granularity=granularity)
    y = np.asarray(layer(jnp.asarray(x)))
    ref = _int8_reference(x, w, threshold, tensor=granularity == "tensor")
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_llm_int8_outlier_split_beats_naive_w8a8() -> None:
    w, x = _w(), _x(outliers=(3, 50, 77))
    exact = _f64(x) @ _f64(w)
    err = {}
    for name, kw in {
        "llm.int8": {"threshold": 6.0},
        "vectorwise": {"threshold": None},
        "absmax": {"threshold": None, "granularity": "tensor"},
    }.items():
        err[name] = np.abs(np.asarray(Int8OutlierLinear(jnp.asarray(w), **kw)(jnp.asarray(x))) - exact).mean()
    assert err["llm.int8"] < err["vectorwise"] / 2 and err["vectorwise"] < err["absmax"]


def test_llm_int8_threshold_inf_is_vectorwise_bit_exact() -> None:
    w, x = jnp.asarray(_w()), jnp.asarray(_x(outliers=(3, 50)))
    y_inf = Int8OutlierLinear(w, threshold=float("inf"))(x)
    y_none = Int8OutlierLinear(w, threshold=None)(x)
    np.testing.assert_array_equal(np.asarray(y_inf), np.asarray(y_none))


def test_llm_int8_tiny_threshold_is_the_float_matmul_of_the_weight_rows_it_has() -> None:
    """Every dim is an outlier: y = x @ W_hat in float32. W_hat = dequantized int8 rows (bitsandbytes), or the
    float16 rows when stored: then y = x @ fp16(W), the float matmul up to fp16 weight rounding."""
    w, x = _w(), _x(outliers=(3,))
    tiny = 1e-30
    layer = Int8OutlierLinear(jnp.asarray(w), threshold=tiny)
    y = _f64(layer(jnp.asarray(x)))
    w_hat = _f64(jq.dequantize(layer.kernel.get_value()))
    mag = np.abs(_f64(x)) @ np.abs(_f64(w))
    np.testing.assert_allclose(y, _f64(x) @ w_hat, rtol=0, atol=float(4 * K * 2**-24 * mag.max()))
    # int8 weight rounding bound: sum_k |x_k| s_w[n] / 2
    sw = np.max(np.abs(w), axis=0) / 127
    assert np.all(np.abs(y - _f64(x) @ _f64(w)) <= (np.abs(_f64(x)).sum(1, keepdims=True) * sw / 2) * (1 + 1e-5))

    full = Int8OutlierLinear(jnp.asarray(w), threshold=tiny, outlier_rows=tuple(range(K)))
    y16 = _f64(full(jnp.asarray(x)))
    bound = 2.0**-11 * mag + K * 2.0**-24 * mag + 1e-7
    assert np.all(np.abs(y16 - _f64(x) @ _f64(w)) <= bound)
    np.testing.assert_allclose(y16, _f64(x) @ _f64(w.astype(np.float16)), rtol=0, atol=float(K * 2**-24 * mag.max()))


def test_llm_int8_tracks_outlier_fraction() -> None:
    w = jnp.asarray(_w())
    layer = Int8OutlierLinear(w, track_outliers=True)
    layer(jnp.asarray(_x(outliers=(1, 2, 3))))
    assert float(layer.outlier_fraction[...]) == pytest.approx(3 / K)
    step = nnx.jit(lambda m, x: m(x))
    step(layer, jnp.asarray(_x(outliers=(5,))))
    assert int(layer.outlier_calls[...]) == 2
    assert float(layer.outlier_fraction[...]) == pytest.approx(1 / K)
    assert layer.outlier_fraction_mean == pytest.approx(2 / K)
    assert float(layer.outlier_fraction_max[...]) == pytest.approx(3 / K)
    with pytest.raises(ValueError, match="track_outliers"):
        _ = Int8OutlierLinear(w).outlier_fraction_mean


def test_llm_int8_errors() -> None:
    with pytest.raises(ValueError, match="threshold"):
        Int8OutlierLinear(jnp.asarray(_w()), threshold=-1.0)
    q = jq.quantize(jnp.asarray(_w()), jq.LLMInt8Scheme(threshold=4.0))
    with pytest.raises(ValueError, match="quantized with"):
        Int8OutlierLinear(q, threshold=6.0)
    with pytest.raises(ValueError, match="LLMInt8Scheme"):
        Int8OutlierLinear(jq.quantize(jnp.asarray(_w()), jq.IntScheme(8)))


# ------------------------------------------------------------------------------------------------- fp8
def _fp8_reference(x: np.ndarray, w: np.ndarray, fmt: str, amax) -> np.ndarray:
    dt, fmax = (ml_dtypes.float8_e4m3fn, 448.0) if fmt == "e4m3" else (ml_dtypes.float8_e5m2, 57344.0)
    sw = (np.max(np.abs(w), axis=0) / np.float32(fmax)).astype(np.float32)
    wq = np.clip(w / sw, -fmax, fmax).astype(dt).astype(np.float32)
    sx = (np.asarray(amax, np.float32) / np.float32(fmax)).astype(np.float32)
    xq = np.clip(x / sx, -fmax, fmax).astype(dt).astype(np.float32)
    return (_f64(xq) @ _f64(wq)) * _f64(sx) * _f64(sw)


@pytest.mark.parametrize("fmt,mbits", [("e4m3", 3), ("e5m2", 2)])
def test_fp8_dynamic_matches_reference_and_bound(fmt, mbits) -> None:
    w, x = _w(), _x()
    y = _f64(Fp8Linear(jnp.asarray(w), fmt=fmt)(jnp.asarray(x)))
    np.testing.assert_allclose(y, _fp8_reference(x, w, fmt, np.abs(x).max()), rtol=1e-5, atol=1e-6)
    u = 2.0 ** -(mbits + 1)
    mag = np.abs(_f64(x)) @ np.abs(_f64(w))
    # fp8 rounding of both operands (relative u each above the subnormal range) + a small subnormal allowance
    assert np.all(np.abs(y - _f64(x) @ _f64(w)) <= (2 * u + u * u) * mag + 1e-3 * mag.max())


def test_fp8_per_token_dynamic_scales() -> None:
    w, x = _w(), _x()
    x[0] *= 100.0  # one loud token must not crush the others' resolution
    y = _f64(Fp8Linear(jnp.asarray(w), act_granularity="token")(jnp.asarray(x)))
    ref = np.concatenate([_fp8_reference(x[i : i + 1], w, "e4m3", np.abs(x[i]).max()) for i in range(M)])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_fp8_static_uses_calibrated_amax_and_saturates() -> None:
    w, x = _w(), _x()
    amax = 0.5 * float(np.abs(x).max())  # inputs above the calibrated range saturate at +-448
    layer = Fp8Linear(jnp.asarray(w), act_mode="static", act_amax=amax)
    y = _f64(layer(jnp.asarray(x)))
    np.testing.assert_allclose(y, _fp8_reference(x, w, "e4m3", amax), rtol=1e-5, atol=1e-6)
    assert float(layer.act_amax[...]) == np.float32(amax)  # static: never updated


def test_fp8_delayed_history_semantics() -> None:
    w = jnp.asarray(_w())
    x1, x2, x3 = _x(1), 3.0 * _x(2), 0.5 * _x(3)
    a1, a2, a3 = (float(np.abs(v).max()) for v in (x1, x2, x3))
    layer = Fp8Linear(w, act_mode="delayed", history=2)
    # first call: empty history -> its own amax (= dynamic); then the amax is pushed
    np.testing.assert_allclose(_f64(layer(jnp.asarray(x1))), _fp8_reference(x1, _w(), "e4m3", a1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(layer.amax_history[...]), np.float32([a1, 0]))
    # second call scales with the history (a1), not with its own larger amax (saturates instead)
    step = nnx.jit(lambda m, x: m(x))
    y2 = _f64(step(layer, jnp.asarray(x2)))
    np.testing.assert_allclose(y2, _fp8_reference(x2, _w(), "e4m3", a1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(layer.amax_history[...]), np.float32([a2, a1]))
    # third: max over the window (a2); a window of 2 then drops a1
    y3 = _f64(step(layer, jnp.asarray(x3)))
    np.testing.assert_allclose(y3, _fp8_reference(x3, _w(), "e4m3", max(a1, a2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(layer.amax_history[...]), np.float32([a3, a2]))


def test_fp8_delayed_pure_apply_does_not_carry_state() -> None:
    layer = Fp8Linear(jnp.asarray(_w()), act_mode="delayed")
    graphdef, state = nnx.split(layer)
    jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(_x()))
    assert float(jnp.max(layer.amax_history[...])) == 0.0


def test_fp8_errors() -> None:
    w = jnp.asarray(_w())
    with pytest.raises(ValueError, match="act_mode"):
        Fp8Linear(w, act_mode="sometimes")
    with pytest.raises(ValueError, match="positive finite act_amax"):
        Fp8Linear(w, act_mode="static")
    with pytest.raises(ValueError, match="only used with act_mode='static'"):
        Fp8Linear(w, act_amax=3.0)
    with pytest.raises(ValueError, match="per-token"):
        Fp8Linear(w, act_mode="delayed", act_granularity="token")
    with pytest.raises(ValueError, match="history"):
        Fp8Linear(w, act_mode="delayed", history=0)
    with pytest.raises(ValueError, match="fmt must be one of"):
        Fp8Linear(w, fmt="e3m4")
    with pytest.raises(ValueError, match="expects 96"):
        Fp8Linear(w)(jnp.ones((2, 5)))


@pytest.mark.parametrize("fmt,layout,dt", [("e4m3", "kn", jnp.bfloat16), ("e5m2", "nk", jnp.float32)])
def test_fp8linear_per_token_dynamic_goes_through_the_w8a8_entry_point(fmt, layout, dt) -> None:
    """``act_mode="dynamic"``, ``act_granularity="token"`` are ``jq.ops.qdot_fp8_w8a8``'s own scales, so the layer
    computes through it (the fused fp8 Pallas kernel on GPU): off the GPU bit for bit the per-token product the
    other modes spell out (``true_divide`` scales, the codes' dot in float32); in interpret mode a kernel runs."""
    from jaxquant.core.formats import fp8_dtype, fp8_max
    from jaxquant.core.layout import dot_codes
    from jaxquant.core.numerics import true_divide

    q = jq.quantize(jnp.asarray(_w()), jq.FP8Scheme(fmt=fmt, granularity="channel", layout=layout))
    layer = Fp8Linear(q, fmt=fmt, act_granularity="token")
    x = jnp.asarray(_x(3) * 3, dt).reshape(2, -1, K)
    x2 = x.reshape(-1, K).astype(jnp.float32)
    amax, fmax = jnp.max(jnp.abs(x2), axis=1, keepdims=True), fp8_max(fmt)
    sx = jnp.where(amax > 0, true_divide(amax, jnp.float32(fmax)), 1.0)
    xq = jnp.clip(true_divide(x2, sx), -fmax, fmax).astype(fp8_dtype(fmt))
    acc = dot_codes(xq.astype(jnp.float32), q.data.astype(jnp.float32), layout, jnp.float32)
    want = (acc * sx * q.scale).reshape(*x.shape[:-1], -1).astype(dt)
    np.testing.assert_array_equal(np.asarray(layer(x), np.float32), np.asarray(want, np.float32))
    with jq.ops.kernel_mode("interpret"):
        assert "pallas_call" in str(jax.make_jaxpr(lambda v: layer(v))(x))
        got = layer(x)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode,layout", [("dynamic", "kn"), ("static", "nk"), ("delayed", "kn")])
def test_fp8linear_per_tensor_modes_reach_the_kernel(mode, layout) -> None:
    """Per-tensor scales (dynamic, calibrated static, delayed) go to ``qdot_fp8_w8a8`` as ``x_scale``: in interpret
    mode a Pallas kernel computes the layer, with the same scale (a static amax below the data's saturates alike)
    and the same delayed history update as the XLA path."""
    q = jq.quantize(jnp.asarray(_w()), jq.FP8Scheme(granularity="channel", layout=layout))
    kw = {"act_amax": 1.0} if mode == "static" else {}
    layers = [Fp8Linear(q, act_mode=mode, **kw) for _ in range(2)]
    xs = [jnp.asarray(_x(s) * (1 + s), jnp.bfloat16) for s in range(3)]
    with jq.ops.kernel_mode("interpret"):
        graphdef, state = nnx.split(layers[0])  # a pure apply: the delayed history is not updated by tracing
        assert "pallas_call" in str(jax.make_jaxpr(lambda s, v: nnx.merge(graphdef, s)(v))(state, xs[0]))
        got = [layers[0](x) for x in xs]
    with jq.ops.kernel_mode("off"):
        want = [layers[1](x) for x in xs]
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w_, np.float32), rtol=2e-2, atol=2e-2)
    if mode == "delayed":
        np.testing.assert_array_equal(np.asarray(layers[0].amax_history[...]), np.asarray(layers[1].amax_history[...]))
    if mode == "static":  # the reference with the calibrated amax, saturating
        ref = _fp8_reference(np.asarray(xs[2], np.float32), _w(), "e4m3", 1.0)
        np.testing.assert_allclose(_f64(got[2]), ref, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------- BitLinear
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_bitlinear_matches_reference_exactly(granularity) -> None:
    w, x = _w(), _x()
    layer = BitLinear(jnp.asarray(w), granularity=granularity)
    q = layer.kernel.get_value()
    s = np.mean(np.abs(w)) if granularity == "tensor" else np.mean(np.abs(w), axis=0)
    t = np.clip(np.round(w / s), -1, 1)
    np.testing.assert_array_equal(np.asarray(ternary_codes(q)), t.astype(np.int8))
    sx = np.max(np.abs(x), axis=1, keepdims=True) / np.float32(127)
    xq = np.clip(np.round(x / sx), -127, 127)
    ref = (xq.astype(np.int64) @ t.astype(np.int64)) * _f64(sx) * _f64(np.asarray(q.scale))
    y = _f64(layer(jnp.asarray(x)))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    # only int8 activation rounding separates it from x @ W_hat: |dx| <= s_x / 2
    w_hat = _f64(jq.dequantize(q))
    assert np.all(np.abs(y - _f64(x) @ w_hat) <= (sx / 2) @ np.abs(w_hat).sum(0, keepdims=True) + 1e-6)


@pytest.mark.parametrize(
    "granularity,packing,norm_eps", [("tensor", "2bit", None), ("channel", "2bit", 1e-5), ("channel", "base3", None)]
)
def test_bitlinear_is_the_absmax_int8_product_through_the_w158a8_entry_point(granularity, packing, norm_eps) -> None:
    """``BitLinear`` computes through ``jq.ops.qdot_ternary_a8`` (so the W1.58A8 kernels run on GPU): off the GPU
    it equals, bit for bit, the product spelled out with this module's ``absmax_int8`` and ``ternary_codes``; in
    interpret mode it dispatches to a Pallas kernel and agrees up to float32 rounding (split-K scales partial sums)."""
    w, x = _w(), jnp.asarray(_x(), jnp.bfloat16)
    q = jq.quantize(jnp.asarray(w), jq.TernaryScheme(granularity=granularity, packing=packing))
    layer = BitLinear(q, norm_eps=norm_eps)
    from jaxquant.nn.layers import absmax_int8, rms_normalize

    x2 = x.astype(jnp.float32) if norm_eps is None else rms_normalize(x, norm_eps)
    xq, sx = absmax_int8(x2)
    acc = jnp.dot(xq, ternary_codes(q), preferred_element_type=jnp.int32)
    want = (acc.astype(jnp.float32) * sx * q.scale).astype(x.dtype)
    np.testing.assert_array_equal(np.asarray(layer(x), np.float32), np.asarray(want, np.float32))
    if packing == "2bit":
        with jq.ops.kernel_mode("interpret"):
            assert "pallas_call" in str(jax.make_jaxpr(lambda v: layer(v))(x))
            got = layer(x)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------- LoRA
def _lora(bias: bool = False) -> LoRA:
    b = jnp.asarray(np.linspace(-1, 1, N), jnp.float32) if bias else None
    base = QLinear(jnp.asarray(_w()), jq.NF4Scheme(double_quant=True), b)
    return LoRA(base, rank=4, alpha=8.0, rngs=nnx.Rngs(0))


def test_lora_starts_equal_to_base() -> None:
    layer = _lora()
    x = jnp.asarray(_x())
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(layer.base(x)))
    assert (layer.in_features, layer.out_features, layer.scaling) == (K, N, 2.0)


def test_lora_grad_only_adapters_and_base_stays_frozen_and_quantized() -> None:
    layer = _lora(bias=True)
    x, target = jnp.asarray(_x()), jnp.asarray(np.random.default_rng(5).normal(size=(M, N)), jnp.float32)
    q_before = layer.base.kernel.get_value()
    bias_before = np.asarray(layer.base.bias[...])

    def loss(m: LoRA) -> jax.Array:
        return jnp.mean((m(x) - target) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(layer)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == {"lora_a", "lora_b"}
    assert float(jnp.abs(flat["lora_b"][...]).max()) > 0  # B gets a gradient at init (A's is 0 while B = 0)

    # the default nnx.grad (wrt nnx.Param) sees the adapters and the float bias, never the QWeight kernel
    all_grads = nnx.grad(loss)(layer)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(all_grads)}
    assert names == {"lora_a", "lora_b", "base/bias"}

    opt = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(m: LoRA, o: nnx.Optimizer) -> jax.Array:
        value, g = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        o.update(m, g)
        return value

    losses = [float(step(layer, opt)) for _ in range(20)]
    assert losses[-1] < losses[0]
    q_after = layer.base.kernel.get_value()
    assert isinstance(q_after, jq.QArray) and q_after.scheme == q_before.scheme
    for a, b in zip(jax.tree.leaves(q_before), jax.tree.leaves(q_after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(layer.base.bias[...]), bias_before)
    assert float(jnp.abs(layer.lora_a[...]).max()) > 0 and float(jnp.abs(layer.lora_b[...]).max()) > 0


def test_lora_errors_and_bf16() -> None:
    base = QLinear(jnp.asarray(_w()), jq.IntScheme(8))
    with pytest.raises(ValueError, match="rank"):
        LoRA(base, rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot infer"):
        LoRA(lambda x: x, rngs=nnx.Rngs(0))
    layer = LoRA(base, rank=2, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert layer.lora_a[...].dtype == jnp.bfloat16
    assert layer(jnp.ones((2, K))).dtype == jnp.float32


# ------------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize(
    "make",
    [
        lambda w: QLinear(w, jq.IntScheme(4, 32), jnp.ones(N)),
        lambda w: Int8OutlierLinear(w, threshold=5.0, outlier_rows=(1, 7), track_outliers=True),
        lambda w: Fp8Linear(w, fmt="e5m2", act_mode="static", act_amax=2.5),
        lambda w: Fp8Linear(w, act_mode="delayed", history=4),
        lambda w: BitLinear(w, granularity="channel"),
        lambda w: LoRA(Fp8Linear(w, act_granularity="token"), rank=3, rngs=nnx.Rngs(1)),
    ],
    ids=["qlinear", "int8", "fp8-static", "fp8-delayed", "bitlinear", "lora"],
)
def test_layer_spec_round_trip(make) -> None:
    layer = make(jnp.asarray(_w()))
    layer(jnp.asarray(_x()))  # some state
    spec = layer_spec(layer)
    values = nnx.to_pure_dict(nnx.state(layer))
    rebuilt = layer_from_saved(spec, values)
    graphdef, state = nnx.split(rebuilt)
    nnx.replace_by_pure_dict(state, values)
    rebuilt = nnx.merge(graphdef, state)
    assert type(rebuilt) is type(layer) and layer_spec(rebuilt) == spec
    x = jnp.asarray(_x(9))
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(layer(x)))


def test_layer_spec_errors() -> None:
    with pytest.raises(TypeError, match=r"not a jaxquant\.nn layer"):
        layer_spec(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="unknown layer class"):
        layer_from_saved({"class": "Conv"}, {})
    with pytest.raises(ValueError, match="lack"):
        layer_from_saved({"class": "QLinear", "config": {}}, {})
