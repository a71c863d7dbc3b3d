"""Fake quantization: forward == dequantize(quantize(w)) exactly; STE gradient = identity inside, 0 outside."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.qat import (
    clip_mask,
    export_params,
    fake_quant,
    fake_quantize_params,
    init_steps,
    lsq_fake_quant,
    lsq_quantize,
)

SCHEMES = [
    jq.IntScheme(4, 128),
    jq.IntScheme(8),
    jq.IntScheme(3, None, symmetric=False),
    jq.IntScheme(4, 32, symmetric=False, range="minmax"),
    jq.IntScheme(2, 64),
    jq.IntScheme(8, granularity="tensor"),
    jq.NF4Scheme(),
    jq.NF4Scheme(double_quant=True),
    jq.FP8Scheme("e4m3"),
    jq.FP8Scheme("e5m2", "channel"),
    jq.TernaryScheme(),
    jq.TernaryScheme("channel", "base3"),
    jq.CastScheme("bfloat16"),
]


def _w(shape=(300, 48), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_forward_equals_dequantize_quantize_exactly(scheme):
    w = _w()
    want = np.asarray(jq.dequantize(jq.quantize(w, scheme)))
    np.testing.assert_array_equal(np.asarray(fake_quant(w, scheme)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: fake_quant(w, scheme))(w)), want)
    # also inside a grad trace (the custom_vjp forward)
    out = {}

    def f(w):
        y = fake_quant(w, scheme)
        out["y"] = y
        return y.sum()

    jax.grad(f)(w)
    assert out["y"].shape == w.shape


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_ste_gradient_is_identity_inside_zero_outside(scheme):
    w = _w()
    c = jax.random.normal(jax.random.key(1), w.shape)
    g = jax.grad(lambda w: jnp.sum(fake_quant(w, scheme) * c))(w)
    mask = np.asarray(clip_mask(w, jq.quantize(w, scheme)))
    np.testing.assert_array_equal(np.asarray(g), np.where(mask, np.asarray(c), 0.0))
    gi = jax.grad(lambda w: jnp.sum(fake_quant(w, scheme, ste="identity") * c))(w)
    np.testing.assert_array_equal(np.asarray(gi), np.asarray(c))


def test_clip_range_of_ternary_and_a_fixed_int_grid():
    # ternary: s = mean|w| = 1 here; |w| < 1.5 s passes, beyond is clipped to +-1 and gets no gradient
    w = jnp.array([[0.2, -0.6], [1.4, -1.6], [3.0, -0.2], [0.1, 0.5]], jnp.float32)
    s = float(jnp.mean(jnp.abs(w)))
    g = jax.grad(lambda w: fake_quant(w, jq.TernaryScheme()).sum())(w)
    np.testing.assert_array_equal(np.asarray(g), (np.abs(np.asarray(w)) / s < 1.5).astype(np.float32))
    assert float(g[2, 0]) == 0.0 and float(g[1, 1]) == 0.0 and float(g[0, 0]) == 1.0
    # asymmetric zero-point int2 (codes 0..3) on a column whose lowest value sits beyond the grid's last code
    w = jnp.array([[-1.0], [0.0], [1.0], [2.0]], jnp.float32)
    q = jq.quantize(w, jq.IntScheme(2, None, symmetric=False))
    m = np.asarray(clip_mask(w, q))
    w_hat = np.asarray(jq.dequantize(q))
    # inside exactly when the nearest grid point is within half a step
    step = float(np.asarray(q.scale, np.float32)[0])
    assert (m == (np.abs(np.asarray(w) - w_hat) <= step / 2 + 1e-7)).all()


def test_bfloat16_weights_keep_dtype_and_gradient_dtype():
    w = _w().astype(jnp.bfloat16)
    s = jq.IntScheme(4, 64)
    y = fake_quant(w, s)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jq.dequantize(jq.quantize(w, s)), np.float32))
    g = jax.grad(lambda w: fake_quant(w, s).astype(jnp.float32).sum())(w)
    assert g.dtype == jnp.bfloat16


def test_errors():
    with pytest.raises(TypeError, match="Scheme"):
        fake_quant(_w(), "int4")
    with pytest.raises(ValueError, match="ste"):
        fake_quant(_w(), jq.IntScheme(4), ste="sign")
    with pytest.raises(ValueError, match="2-D"):
        fake_quant(jnp.ones((4, 4, 4)), jq.IntScheme(4, 2))
    with pytest.raises(TypeError, match="floating"):
        fake_quant(jnp.ones((4, 4), jnp.int32), jq.IntScheme(4))


RULES = [(r".*norm.*", None), (r".*_proj/kernel", jq.IntScheme(4, 32))]


def _params():
    return {
        "layers": [
            {"attn": {"q_proj": {"kernel": _w((64, 32), 2)}}, "norm": {"scale": jnp.ones(64)}},
            {"attn": {"q_proj": {"kernel": _w((64, 32), 3)}}, "norm": {"scale": jnp.ones(64)}},
        ],
        "embed": _w((10, 64), 4),
        "step": jnp.array(3, jnp.int32),
    }


def test_rules_over_a_pytree_and_export_match_quantize_params():
    p = _params()
    fq = jax.jit(lambda p: fake_quantize_params(p, RULES))(p)
    qp = jq.quantize_params(p, RULES)
    ex = export_params(p, RULES)
    for i in range(2):
        k = fq["layers"][i]["attn"]["q_proj"]["kernel"]
        np.testing.assert_array_equal(
            np.asarray(k), np.asarray(jq.dequantize(qp["layers"][i]["attn"]["q_proj"]["kernel"]))
        )
        np.testing.assert_array_equal(
            np.asarray(k), np.asarray(jq.dequantize(ex["layers"][i]["attn"]["q_proj"]["kernel"]))
        )
        np.testing.assert_array_equal(
            np.asarray(fq["layers"][i]["norm"]["scale"]), np.asarray(p["layers"][i]["norm"]["scale"])
        )
    assert isinstance(ex["layers"][0]["attn"]["q_proj"]["kernel"], jq.QArray)
    np.testing.assert_array_equal(np.asarray(fq["embed"]), np.asarray(p["embed"]))
    assert int(fq["step"]) == 3
    with pytest.warns(UserWarning, match="matched no"):
        fake_quantize_params(p, [(r"nothing", jq.IntScheme(4))])


def test_qat_step_trains_latent_float_weights():
    # a linear regression through int4 fake-quantized weights: the loss goes down, grads reach the floats
    p = {"w": {"kernel": _w((32, 8), 5) * 0.1}}
    x = jax.random.normal(jax.random.key(6), (128, 32))
    target = x @ _w((32, 8), 7)
    rules = [(r"w/kernel", jq.IntScheme(4, 16))]

    def loss(p):
        q = fake_quantize_params(p, rules)
        return jnp.mean((x @ q["w"]["kernel"] - target) ** 2)

    g = jax.jit(jax.value_and_grad(loss))
    l0, _ = g(p)
    for _ in range(100):
        lv, gr = g(p)
        p = jax.tree.map(lambda a, b: a - 0.05 * b, p, gr)
    assert float(lv) < 0.2 * float(l0)


@pytest.mark.parametrize(
    "scheme",
    [
        jq.IntScheme(4, 32),
        jq.IntScheme(8),
        jq.IntScheme(3, granularity="tensor"),
        jq.IntScheme(4, 40),
        jq.IntScheme(4, 32, layout="nk"),  # K-major codes: the export stores them transposed
    ],
)
def test_lsq_starts_at_rtn_and_exports_exactly(scheme):
    w = _w((100, 24), 8)
    steps = init_steps({"k": w}, [("k", scheme)])
    y = lsq_fake_quant(w, steps["k"], scheme)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jq.dequantize(jq.quantize(w, scheme))))
    # a trained (different) step: export still equals the forward bit for bit
    s2 = steps["k"] * 0.7
    y2 = jax.jit(lsq_fake_quant, static_argnums=2)(w, s2, scheme)
    q2 = lsq_quantize(w, s2, scheme)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(jq.dequantize(q2)))
    ex = export_params({"k": w}, [("k", scheme)], steps={"k": s2})
    np.testing.assert_array_equal(np.asarray(ex["k"].data), np.asarray(q2.data))
    fq = fake_quantize_params({"k": w}, [("k", scheme)], steps={"k": s2})
    np.testing.assert_array_equal(np.asarray(fq["k"]), np.asarray(y2))


def test_lsq_gradients_match_the_paper():
    scheme = jq.IntScheme(4, granularity="tensor")  # qmax = 7
    w = jnp.array([[0.26], [-0.5], [1.0], [-2.0]], jnp.float32)
    step = jnp.array(0.125, jnp.float32)  # exact in float16; v = 2.08, -4, 8 (clipped), -16 (clipped)
    c = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    gw, gs = jax.grad(lambda w, s: jnp.sum(lsq_fake_quant(w, s, scheme) * c), argnums=(0, 1))(w, step)
    np.testing.assert_array_equal(np.asarray(gw)[:, 0], [1.0, 2.0, 0.0, 0.0])
    v = np.array([0.26 / 0.125, -4.0])
    want = (1 * (np.round(v[0]) - v[0]) + 2 * 0.0 + 3 * 7 + 4 * -7) / np.sqrt(4 * 7)
    np.testing.assert_allclose(float(gs), want, rtol=1e-5)


def test_lsq_rejects_other_schemes_and_bad_step_shapes():
    w = _w((64, 8))
    with pytest.raises(ValueError, match="symmetric IntScheme"):
        lsq_fake_quant(w, jnp.ones(()), jq.NF4Scheme())
    with pytest.raises(ValueError, match="must be"):
        lsq_fake_quant(w, jnp.ones((8,)), jq.IntScheme(4, 32))
    assert init_steps({"k": w}, [("k", jq.NF4Scheme())]) == {}
