"""fp8 (e4m3fn / e5m2) scaled quantization against ml_dtypes rounding."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant.schemes.fp8 import fp8_quantize_values

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}


def _reference(w: np.ndarray, fmt: str, granularity: str):
    """NumPy float32 scale amax / FMAX (1 for all-zero), then ml_dtypes' round-to-nearest-even cast."""
    w32 = w.astype(np.float32)
    amax = np.abs(w32).max() if granularity == "tensor" else np.abs(w32).max(axis=0)
    s = np.where(amax > 0, amax / np.float32(FMAX[fmt]), np.float32(1)).astype(np.float32)
    x = w32 / s
    assert np.abs(x).max() < FMAX[fmt] * (1 + 2**-10)  # in range: ml_dtypes rounds it, no overflow
    return x.astype(ML[fmt]), s


def _bits(a) -> np.ndarray:
    return np.atleast_1d(np.asarray(a)).view(np.uint8)


@given(
    fmt=st.sampled_from(["e4m3", "e5m2"]),
    gran=st.sampled_from(["tensor", "channel"]),
    shape=st.sampled_from([(64, 8), (17, 3)]),
    log_scale=st.integers(-12, 4),
    zero_col=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_bit_exact_vs_ml_dtypes(fmt, gran, shape, log_scale, zero_col, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.1, 10, size=shape[1]) * 2.0**log_scale).astype(np.float32)
    if zero_col:
        w[:, 0] = 0.0
    q = jq.quantize(jnp.asarray(w), jq.FP8Scheme(fmt=fmt, granularity=gran))
    ref_data, ref_s = _reference(w, fmt, gran)
    assert q.data.dtype == jnp.dtype(ML[fmt]) and q.scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.scale), ref_s)
    np.testing.assert_array_equal(_bits(q.data), _bits(ref_data))
    w_hat = np.asarray(jq.dequantize(q))
    np.testing.assert_array_equal(w_hat, ref_data.astype(np.float32) * ref_s)
    # the largest magnitude in each tensor/channel lands on (about) +-FMAX
    top = np.abs(np.asarray(q.data, np.float32)).max(axis=None if gran == "tensor" else 0)
    assert np.all((top == FMAX[fmt]) | (np.asarray(q.scale) == 1.0))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_overflow_saturates_instead_of_nan(fmt):
    rng = np.random.default_rng(0)
    small = (rng.standard_normal((32, 4)) * 0.01).astype(np.float32)
    big = small * np.float32(50.0)
    big[0, 0], big[1, 1] = 1e30, -1e30
    s = jq.quantize(jnp.asarray(small), jq.FP8Scheme(fmt=fmt)).scale  # scale of another tensor
    x = big / np.asarray(s)
    assert np.abs(x).max() > FMAX[fmt]  # really out of range

    # a plain cast overflows: NaN for e4m3fn (no infinity), inf for e5m2
    plain = x.astype(ML[fmt]).astype(np.float32)
    over = np.abs(x) > FMAX[fmt] * 1.1
    if fmt == "e4m3":
        assert np.isnan(plain[over]).all()
    else:
        assert np.isinf(plain[over]).all()

    ours = np.asarray(fp8_quantize_values(jnp.asarray(big), fmt, s)).astype(np.float32)
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours[over], np.sign(x[over]) * FMAX[fmt])
    assert ours[0, 0] == FMAX[fmt] and ours[1, 1] == -FMAX[fmt]
    inside = np.abs(x) <= FMAX[fmt]
    np.testing.assert_array_equal(ours[inside], x[inside].astype(ML[fmt]).astype(np.float32))


def test_e4m3_max_is_448():
    q = jq.quantize(jnp.asarray([[-3.0], [1.5], [0.0]]), jq.FP8Scheme("e4m3"))
    np.testing.assert_array_equal(np.asarray(q.data, np.float32)[:, 0], [-448.0, 224.0, 0.0])
    assert float(q.scale) == np.float32(3.0) / np.float32(448.0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_requantize_idempotent(fmt, gran):
    s = jq.FP8Scheme(fmt, gran)
    w = jax.random.normal(jax.random.key(2), (64, 16)) * 0.03
    q = jq.quantize(w, s)
    q2 = jq.quantize(jq.dequantize(q), s)
    np.testing.assert_array_equal(_bits(q2.data), _bits(q.data))
    # fl(fl(FMAX * s) / FMAX) == s fails for ~10% of float32 s: the rescale is within 1 ulp
    np.testing.assert_array_max_ulp(np.asarray(q2.scale), np.asarray(q.scale), maxulp=1)


@pytest.mark.parametrize("scheme", [jq.FP8Scheme("e4m3", "tensor"), jq.FP8Scheme("e5m2", "channel")])
def test_jit_equals_eager_and_vmap_equals_loop(scheme):
    ws = jax.random.normal(jax.random.key(0), (3, 96, 24)) * 0.1
    eager = [jq.quantize(w, scheme) for w in ws]
    jitted = jax.jit(jq.quantize, static_argnums=1)(ws[0], scheme)
    for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    vm = jax.vmap(lambda w: jq.quantize(w, scheme))(ws)
    deq = jax.vmap(jq.dequantize)(vm)
    for i in range(3):
        for a, b in zip(jax.tree.leaves(eager[i]), jax.tree.leaves(vm), strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(np.asarray(b)[i]))
        np.testing.assert_array_equal(np.asarray(deq[i]), np.asarray(jq.dequantize(eager[i])))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_low_precision_inputs(dtype, fmt):
    w = (jax.random.normal(jax.random.key(1), (64, 8)) * 0.05).astype(dtype)
    q = jq.quantize(w, jq.FP8Scheme(fmt, "channel"))
    ref_data, ref_s = _reference(np.asarray(w, np.float32), fmt, "channel")
    np.testing.assert_array_equal(np.asarray(q.scale), ref_s)
    np.testing.assert_array_equal(_bits(q.data), _bits(ref_data))
    out = jq.dequantize(q)
    assert out.dtype == dtype and out.shape == w.shape
    np.testing.assert_array_equal(np.asarray(out), (ref_data.astype(np.float32) * ref_s).astype(dtype))


def test_tensor_granularity_any_rank_and_bits():
    q = jq.quantize(jnp.ones((2, 3, 4)), jq.FP8Scheme("e4m3", "tensor"))
    assert q.shape == (2, 3, 4) and jq.dequantize(q).shape == (2, 3, 4)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), 1.0)
    big = jax.eval_shape(lambda w: jq.quantize(w, jq.FP8Scheme("e4m3", "channel")), jnp.zeros((4096, 4096)))
    assert big.bits_per_weight == pytest.approx(8 + 32 / 4096)
