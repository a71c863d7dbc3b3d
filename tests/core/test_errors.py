"""Bad input gives a clear exception naming what is wrong."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda: jq.IntScheme(bits=9), "bits"),
        (lambda: jq.IntScheme(bits=1), "bits"),
        (lambda: jq.IntScheme(bits=True), "bits"),
        (lambda: jq.IntScheme(bits=4.0), "bits"),
        (lambda: jq.IntScheme(bits=4, group_size=0), "group_size"),
        (lambda: jq.IntScheme(bits=4, group_size=-4), "group_size"),
        (lambda: jq.IntScheme(bits=4, group_size=True), "group_size"),
        (lambda: jq.IntScheme(bits=4, group_size=64, granularity="channel"), "group_size"),
        (lambda: jq.IntScheme(bits=4, granularity="group"), "group_size"),
        (lambda: jq.IntScheme(bits=4, granularity="row"), "granularity"),
        (lambda: jq.IntScheme(bits=4, range="minmax", symmetric=True), "range"),
        (lambda: jq.IntScheme(bits=4, symmetric=False, range="absmax"), "range"),
        (lambda: jq.IntScheme(bits=4, scale_dtype="int8"), "scale_dtype"),
        (lambda: jq.FP8Scheme(fmt="e3m4"), "fmt"),
        (lambda: jq.FP8Scheme(granularity="group"), "granularity"),
        (lambda: jq.NF4Scheme(block_size=0), "block_size"),
        (lambda: jq.NF4Scheme(block_size=63), "block_size"),
        (lambda: jq.NF4Scheme(block_size=-64), "block_size"),
        (lambda: jq.NF4Scheme(double_quant=1), "double_quant"),
        (lambda: jq.TernaryScheme(packing="x"), "packing"),
        (lambda: jq.TernaryScheme(granularity="group"), "granularity"),
        (lambda: jq.TernaryScheme(eps=0.0), "eps"),
        (lambda: jq.LLMInt8Scheme(threshold=-1), "threshold"),
        (lambda: jq.LLMInt8Scheme(threshold=0), "threshold"),
        (lambda: jq.LLMInt8Scheme(outlier_rows=(1, 1)), "outlier_rows"),
        (lambda: jq.LLMInt8Scheme(outlier_rows=(-1,)), "outlier_rows"),
        (lambda: jq.LLMInt8Scheme(granularity="group"), "granularity"),
    ],
)
def test_bad_scheme_parameters(make, param):
    with pytest.raises(ValueError, match=rf"\b{param}\b"):
        make()


@pytest.mark.parametrize(
    "scheme",
    [
        jq.IntScheme(4, 32),
        jq.IntScheme(8),
        jq.FP8Scheme(granularity="channel"),
        jq.TernaryScheme(granularity="channel"),
        jq.LLMInt8Scheme(),
    ],
)
def test_wrong_rank(scheme):
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\)"):
        jq.quantize(jnp.ones((2, 3, 4)), scheme)
    with pytest.raises(ValueError, match="shape"):
        jq.quantize(jnp.ones((8,)), scheme)


def test_nf4_rank():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\)"):
        jq.quantize(jnp.ones((2, 3, 4)), jq.NF4Scheme())


def test_llm_int8_outlier_rows_out_of_range():
    with pytest.raises(ValueError, match="outlier_rows"):
        jq.quantize(jnp.ones((4, 3)), jq.LLMInt8Scheme(outlier_rows=(4,)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("scheme", [jq.IntScheme(4, 32), jq.NF4Scheme(), jq.FP8Scheme()])
def test_nonfinite_weights(bad, scheme):
    w = np.ones((64, 4), np.float32)
    w[3, 1] = bad
    with pytest.raises(ValueError, match="NaN") as e:
        jq.quantize(jnp.asarray(w), scheme)
    assert "allow_nonfinite=True" in str(e.value) and "1 NaN/Inf" in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize(
    ("scheme", "affected"),
    [
        (jq.IntScheme(4, 32), np.s_[:32, 1]),  # the group
        (jq.IntScheme(4, 32, symmetric=False), np.s_[:32, 1]),
        (jq.IntScheme(4, 32, symmetric=False, range="minmax"), np.s_[:32, 1]),
        (jq.IntScheme(8), np.s_[:, 1]),  # the channel
        (jq.FP8Scheme(granularity="channel"), np.s_[:, 1]),
        (jq.LLMInt8Scheme(), np.s_[:, 1]),
        (jq.NF4Scheme(), np.s_[:, 1]),  # block 1 = column 1 (64 rows)
        (jq.TernaryScheme(granularity="channel"), np.s_[:, 1]),
    ],
)
def test_allow_nonfinite_propagates_into_affected_scales(bad, scheme, affected):
    """The documented contract: NaN/Inf spread over the affected group/channel/block (never silently finite)."""
    w = np.full((64, 4), 0.05, np.float32)
    w[::3] = -0.02
    w[3, 1] = bad
    q = jq.quantize(jnp.asarray(w), scheme, allow_nonfinite=True)
    out = np.asarray(jq.dequantize(q))
    assert not np.isfinite(out[affected]).any()
    mask = np.ones(w.shape, bool)
    mask[affected] = False
    ref = np.asarray(jq.dequantize(jq.quantize(jnp.asarray(np.where(mask, w, 0.0)), scheme)))
    np.testing.assert_array_equal(out[mask], ref[mask])  # the rest is quantized as usual


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_])
def test_integer_input(dtype):
    with pytest.raises(TypeError, match="floating"):
        jq.quantize(np.ones((8, 8), dtype), jq.IntScheme(8))


def test_fp8_input_rejected():
    with pytest.raises(TypeError, match="8-bit float"):
        jq.quantize(jnp.ones((8, 8), jnp.float8_e4m3fn), jq.IntScheme(8))


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0,)])
def test_empty(shape):
    with pytest.raises(ValueError, match="empty"):
        jq.quantize(jnp.ones(shape), jq.IntScheme(8, granularity="tensor"))


@pytest.mark.parametrize("scheme", ["int4", None, jq.IntScheme, {"bits": 4}])
def test_scheme_not_a_scheme(scheme):
    with pytest.raises(TypeError, match="Scheme"):
        jq.quantize(jnp.ones((8, 8)), scheme)


@pytest.mark.parametrize("value", [jnp.ones((4, 4)), np.ones(3), None])
def test_dequantize_non_qarray(value):
    with pytest.raises(TypeError, match="QArray"):
        jq.dequantize(value)


def test_qdot_shape_mismatch():
    x = jnp.ones((2, 5))
    with pytest.raises(ValueError, match=re.escape("(2, 5)")):
        jq.qdot(x, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="contract"):
        jq.qdot(x, jnp.ones((5,)))
    q = jq.quantize(jnp.ones((4, 3)), jq.IntScheme(8))
    with pytest.raises(ValueError, match=re.escape("(4, 3)")):
        jq.qdot(x, q)
    q1 = jq.quantize(jnp.ones((10,)), jq.NF4Scheme())
    with pytest.raises(ValueError, match="contract"):
        jq.qdot(jnp.ones((2, 10)), q1)


def test_python_list_input_works():
    q = jq.quantize([[1.0, -2.0], [0.5, 0.25]], jq.IntScheme(8, scale_dtype="float32"))
    np.testing.assert_allclose(np.asarray(jq.dequantize(q)), [[1.0, -2.0], [0.5, 0.25]], atol=2 / 127)
