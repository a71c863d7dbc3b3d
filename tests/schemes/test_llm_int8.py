"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 with the mixed-precision outlier split."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


def _ref_llm_int8(x, w, threshold, outlier_rows=(), granularity="channel"):
    """Independent LLM.int8(): outlier feature columns of x in float, the rest absmax-int8 per row of x and per
    column of W (or one scale each), int32-exact product. Scales and the quotients that get rounded to codes are
    float32 (as the quantizer's arithmetic: a float64 quotient may round differently, e.g. 65.5 vs 65.499995);
    the products and sums are float64."""
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    per = granularity == "channel"

    def absmax_int8(a, axis):
        s = np.abs(a).max(axis=axis, keepdims=True) / np.float32(127)
        s = np.where(s > 0, s, np.float32(1))
        return np.clip(np.round(a / s), -127, 127).astype(np.float64), s.astype(np.float64)

    wq, sw = absmax_int8(w, 0 if per else None)
    w_float = wq * sw
    for r in outlier_rows:
        w_float[r] = w[r].astype(np.float16)
    x_o = np.zeros_like(x) if threshold is None else np.where(np.abs(x).max(axis=0) > threshold, x, 0)
    xq, sx = absmax_int8(x - x_o, 1 if per else None)
    return (xq @ wq) * sx * sw + x_o.astype(np.float64) @ w_float


def _data(seed=0, m=16, k=256, n=32, outlier_col=3, factor=30.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if outlier_col is not None:
        x[:, outlier_col] *= factor
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    return x, w


def _close(ours, ref, rtol=1e-5):
    ours = np.asarray(ours, np.float64)
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize(
    ("threshold", "rows", "gran"),
    [(6.0, (), "channel"), (6.0, (3, 10), "channel"), (None, (), "channel"), (None, (), "tensor"), (2.5, (), "tensor")],
)
def test_matches_float64_reference(threshold, rows, gran):
    x, w = _data(seed=1)
    q = jq.quantize(jnp.asarray(w), jq.LLMInt8Scheme(threshold=threshold, outlier_rows=rows, granularity=gran))
    assert q.data.dtype == jnp.int8 and q.data.shape == w.shape
    y = jq.qdot(jnp.asarray(x), q)
    assert y.shape == (16, 32) and y.dtype == jnp.float32
    _close(y, _ref_llm_int8(x, w, threshold, rows, gran))


def test_outlier_split_beats_vector_wise_beats_per_tensor():
    """The paper's Table/Fig. claim in miniature: one outlier feature dim (x30) ruins int8 activations; the
    mixed-precision decomposition recovers the accuracy."""
    for seed in range(3):
        x, w = _data(seed=seed, m=16, k=1024, n=64)
        ref = x.astype(np.float64) @ w
        errs = {}
        for name, s in {
            "llm.int8": jq.LLMInt8Scheme(threshold=6.0),
            "vector-wise": jq.LLMInt8Scheme(threshold=None),
            "per-tensor": jq.LLMInt8Scheme(threshold=None, granularity="tensor"),
        }.items():
            y = np.asarray(jq.qdot(jnp.asarray(x), jq.quantize(jnp.asarray(w), s)), np.float64)
            errs[name] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert errs["llm.int8"] < 0.015
        assert 3 * errs["llm.int8"] < errs["vector-wise"], errs
        assert 1.4 * errs["vector-wise"] < errs["per-tensor"], errs


def test_without_outliers_split_changes_nothing():
    x, w = _data(seed=2, outlier_col=None)
    assert np.abs(x).max() < 6.0
    q6 = jq.quantize(jnp.asarray(w), jq.LLMInt8Scheme(threshold=6.0))
    qn = jq.quantize(jnp.asarray(w), jq.LLMInt8Scheme(threshold=None))
    np.testing.assert_array_equal(np.asarray(jq.qdot(x, q6)), np.asarray(jq.qdot(x, qn)))


def test_fp16_outlier_rows_are_stored_and_used():
    x, w = _data(seed=3)
    w[3] *= 5.0  # the outlier feature's weights
    rows = (3, 7)
    q = jq.quantize(jnp.asarray(w), jq.LLMInt8Scheme(threshold=6.0, outlier_rows=(7, 3)))
    assert q.scheme.outlier_rows == rows  # sorted
    ow = q.aux["outlier_weight"]
    assert ow.dtype == jnp.float16 and ow.shape == (2, 32)
    np.testing.assert_array_equal(np.asarray(ow), w[list(rows)].astype(np.float16))
    # dequantize: fp16 rows where stored, int8 * scale elsewhere
    deq = np.asarray(jq.dequantize(q))
    np.testing.assert_array_equal(deq[list(rows)], w[list(rows)].astype(np.float16).astype(np.float32))
    other = [i for i in range(w.shape[0]) if i not in rows]
    np.testing.assert_array_equal(deq[other], np.asarray(q.data, np.float32)[other] * np.asarray(q.scale))
    # the float part of qdot multiplies the outlier column by the stored fp16 row
    y = np.asarray(jq.qdot(jnp.asarray(x), q), np.float64)
    _close(y, _ref_llm_int8(x, w, 6.0, rows))
    zeroed = dataclasses.replace(q, aux={"outlier_weight": jnp.zeros_like(ow)})
    y0 = np.asarray(jq.qdot(jnp.asarray(x), zeroed), np.float64)
    expected = np.outer(x[:, 3], w[3].astype(np.float16))  # only column 3 is an outlier of x
    _close(y - y0, expected)
    # and keeping the outlier row in fp16 is more accurate than its int8 version
    plain = jq.quantize(jnp.asarray(w), jq.LLMInt8Scheme(threshold=6.0))
    ref = x.astype(np.float64) @ w
    err_rows = np.linalg.norm(y - ref)
    err_plain = np.linalg.norm(np.asarray(jq.qdot(jnp.asarray(x), plain), np.float64) - ref)
    assert err_rows < err_plain


def test_jit_and_batched_input():
    x, w = _data(seed=4)
    q = jq.quantize(jnp.asarray(w), jq.LLMInt8Scheme(threshold=6.0, outlier_rows=(3,)))
    eager = np.asarray(jq.qdot(jnp.asarray(x), q))
    jitted = np.asarray(jax.jit(jq.qdot)(jnp.asarray(x), q))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6 * np.abs(eager).max())
    y3 = np.asarray(jax.jit(jq.qdot)(jnp.asarray(x).reshape(2, 8, -1), q))
    assert y3.shape == (2, 8, 32)
    np.testing.assert_allclose(y3.reshape(16, 32), eager, rtol=1e-6, atol=1e-6 * np.abs(eager).max())
    qj = jax.jit(jq.quantize, static_argnums=1)(jnp.asarray(w), q.scheme)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(qj), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_split_equals_manual_int8_product_exactly():
    x, w = _data(seed=5)
    q = jq.quantize(jnp.asarray(w), jq.LLMInt8Scheme(threshold=None))
    y = np.asarray(jq.qdot(jnp.asarray(x), q))
    # the same steps in NumPy float32 (correctly rounded division), int32 accumulation
    f = np.float32
    sw = np.abs(w).max(axis=0) / f(127)
    wq = np.clip(np.round(w / sw), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(q.data), wq)
    np.testing.assert_array_equal(np.asarray(q.scale), sw)
    sx = np.abs(x).max(axis=1, keepdims=True) / f(127)
    xq = np.clip(np.round(x / sx), -127, 127).astype(np.int8)
    acc = xq.astype(np.int32) @ wq.astype(np.int32)
    manual = acc.astype(np.float32) * sx * sw
    assert manual.dtype == np.float32
    np.testing.assert_array_equal(y, manual)


@pytest.mark.parametrize("gran", ["channel", "tensor"])
@pytest.mark.parametrize("n_out", [3, 20])  # K=64: the gathered product holds up to 16 outlier dims
def test_outlier_product_gathered_equals_dense(gran, n_out):
    """The XLA path's float outlier product over the gathered outlier dims (at most max(16, K/32)) equals the dense
    masked product over all K dims, float16 stored rows included; with more outlier dims it is the dense one."""
    rng = np.random.default_rng(n_out)
    k, n, m = 64, 48, 5
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    scheme = jq.LLMInt8Scheme(threshold=6.0, outlier_rows=(2, 9, 40), granularity=gran)
    q = jq.quantize(w, scheme)
    x = rng.standard_normal((m, k)).astype(np.float32)
    cols = rng.choice(k, n_out, replace=False)
    x[:, cols] *= 20.0
    x2 = jnp.asarray(x)
    is_out = jnp.max(jnp.abs(x2), axis=0) > 6.0
    assert int(is_out.sum()) == n_out
    got = jax.jit(lambda a, b, c: scheme._outlier_product(a, b, c))(x2, is_out, q)
    dense = np.where(np.asarray(is_out)[None, :], x, 0.0).astype(np.float64) @ np.asarray(jq.dequantize(q), np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), dense, rtol=1e-5, atol=1e-4)
    rows = np.asarray([0, 2, 9, 40, 63])
    np.testing.assert_array_equal(
        np.asarray(scheme._dequantize_rows(q, jnp.asarray(rows))), np.asarray(jq.dequantize(q))[rows]
    )
