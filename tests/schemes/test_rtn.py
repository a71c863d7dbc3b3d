import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant.core import packing
from jaxquant.core.formats import int_range
from jaxquant.schemes._grouping import expand_rows

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _stats_rows(q, k, n):
    """Per-weight scale (and zero) of a QArray of an IntScheme, as (K, N) float64 arrays."""
    s = q.scheme
    scale = np.asarray(q.scale, np.float64)
    zero = None if q.zero is None else np.asarray(q.zero, np.float64)

    def rows(x):
        if s.granularity == "tensor":
            return np.broadcast_to(x, (k, n))
        if s.granularity == "channel":
            return np.broadcast_to(x[None], (k, n))
        return np.asarray(expand_rows(jnp.asarray(x), s.group_size, k), np.float64)

    return rows(scale), None if zero is None else rows(zero)


schemes = st.builds(
    lambda bits, gran, g, sym, sdt: jq.IntScheme(
        bits=bits,
        group_size=g if gran == "group" else None,
        granularity=gran,
        symmetric=sym,
        scale_dtype=sdt,
    ),
    bits=st.integers(2, 8),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    g=st.sampled_from([3, 8, 32, 128]),
    sym=st.booleans(),
    sdt=st.sampled_from(["float16", "bfloat16", "float32"]),
)


@given(
    scheme=schemes,
    k=st.integers(1, 70),
    n=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
)
def test_error_within_half_step(scheme, k, n, dtype, seed):
    w = (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)
    w = jnp.asarray(w).astype(dtype)
    q = jq.quantize(w, scheme)
    w_hat = jq.dequantize(q)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    s, z = _stats_rows(q, k, n)
    wf = np.asarray(w, np.float64)
    qmin, qmax = int_range(scheme.bits, scheme.symmetric)
    if scheme.symmetric:
        inside = np.abs(wf) <= qmax * s * (1 + 1e-6)
    else:
        inside = (wf >= (qmin - z) * s * (1 + 1e-6)) & (wf <= (qmax - z) * s * (1 + 1e-6))
    # error of the float32 reconstruction, plus the rounding of the output dtype
    out_eps = float(jnp.finfo(dtype).eps) * np.abs(wf)
    err = np.abs(np.asarray(w_hat, np.float64) - wf)
    tol = out_eps + 1e-12
    assert np.all(err[inside] <= s[inside] / 2 * (1 + 1e-6) + tol[inside])
    if scheme.symmetric:
        # scales are rounded up when stored, so no weight is ever clipped
        assert inside.all()
    else:
        # rounding the zero point shifts the grid by at most s/2: a clipped weight is off by at most s
        assert np.all(err <= s * (1 + 1e-6) + tol)


@given(scheme=schemes, k=st.integers(1, 70), n=st.integers(1, 4), seed=st.integers(0, 1000))
def test_symmetric_requantize_is_exact(scheme, k, n, seed):
    # holds for symmetric schemes whenever rounding the stored scale up cannot move the absmax weight off the
    # top code: qmax * 2**-mantissa_bits < 1/2 (float16/float32 always, bfloat16 up to 7 bits)
    sdt = scheme.scale_dtype if (scheme.scale_dtype != "bfloat16" or scheme.bits <= 7) else "float16"
    scheme = jq.IntScheme(
        bits=scheme.bits,
        group_size=scheme.group_size,
        granularity=scheme.granularity,
        symmetric=True,
        scale_dtype=sdt,
    )
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32))
    q = jq.quantize(w, scheme)
    q2 = jq.quantize(jq.dequantize(q), scheme)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("scheme", [jq.IntScheme(4, 128), jq.IntScheme(3, 64, symmetric=False), jq.IntScheme(8)])
def test_jit_equals_eager_and_vmap_equals_loop(scheme):
    ws = jax.random.normal(jax.random.key(0), (3, 200, 24))
    eager = [jq.quantize(w, scheme) for w in ws]
    jitted = jax.jit(jq.quantize, static_argnums=1)(ws[0], scheme)
    for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vm = jax.vmap(lambda w: jq.quantize(w, scheme))(ws)
    for i in range(3):
        for a, b in zip(jax.tree.leaves(eager[i]), jax.tree.leaves(vm)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])
    deq = jax.vmap(jq.dequantize)(vm)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(deq[i]), np.asarray(jq.dequantize(eager[i])))


def test_nbytes_analytic_4096():
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    s = jq.IntScheme(bits=4, group_size=128, scale_dtype="bfloat16")
    q = jax.eval_shape(lambda w: jq.quantize(w, s), w)
    assert q.nbytes == 4096 * 4096 // 2 + 32 * 4096 * 2
    assert q.bits_per_weight == pytest.approx(4.125)


@pytest.mark.parametrize(
    "scheme",
    [
        jq.IntScheme(4, 128),
        jq.IntScheme(3, 128, symmetric=False),
        jq.IntScheme(5, 100, symmetric=False, range="minmax"),
        jq.IntScheme(8, granularity="tensor"),
        jq.IntScheme(2),
    ],
)
def test_nbytes_matches_storage_formula(scheme):
    q = jq.quantize(jnp.ones((576, 10)), scheme)
    assert q.nbytes == scheme.storage_bytes((576, 10))


def test_short_last_group_576_g128():
    w = jax.random.normal(jax.random.key(1), (576, 8))
    q = jq.quantize(w, jq.IntScheme(4, 128))
    assert q.scale.shape == (5, 8)  # 4 full groups + one of 64 rows
    # the last group's scale comes from rows 512..575 only
    expected = np.abs(np.asarray(w)[512:]).max(axis=0) / 7
    np.testing.assert_allclose(np.asarray(q.scale[-1], np.float32), expected, rtol=1e-3)


def test_minmax_g32_reproduces_llama_cpp_q4_1():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 48)) * 0.02).astype(np.float32)
    w[:, 0] = 0.0  # constant column: d == 0
    w[5, 3] = 0.5  # an outlier
    ref = gguf.quants.dequantize(
        gguf.quants.quantize(w.T, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1
    ).T
    ours = jq.dequantize(jq.quantize(jnp.asarray(w), jq.IntScheme(4, 32, symmetric=False, range="minmax")))
    np.testing.assert_array_equal(np.asarray(ours), ref)
    jitted = jq.dequantize(
        jax.jit(jq.quantize, static_argnums=1)(jnp.asarray(w), jq.IntScheme(4, 32, symmetric=False, range="minmax"))
    )
    np.testing.assert_array_equal(np.asarray(jitted), ref)


def test_minmax_dequantization_rounds_the_product_first():
    """``c * s + min`` with the product rounded on its own (what gguf-py's NumPy does), not a fused multiply-add
    (which XLA:CPU would contract it into): with float32 scales the two differ in the last bit of many weights."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((512, 64)).astype(np.float32)
    q = jq.quantize(jnp.asarray(w), jq.IntScheme(4, 128, symmetric=False, range="minmax", scale_dtype="float32"))
    codes = np.asarray(packing.unpack(q.data, 4, 512)).astype(np.float32)
    s = np.repeat(np.asarray(q.scale, np.float32), 128, axis=0)
    lo = np.repeat(np.asarray(q.zero, np.float32), 128, axis=0)
    rounded = codes * s + lo  # NumPy: float32 product rounded, then the add
    fused = (codes.astype(np.float64) * s + lo).astype(np.float32)  # one rounding (exact product in float64)
    assert (rounded != fused).any()  # the case distinguishes the two
    for fn in (jq.dequantize, jax.jit(jq.dequantize)):
        np.testing.assert_array_equal(np.asarray(fn(q)), rounded)


def test_zeropoint_includes_zero_and_codes_in_range():
    w = jnp.asarray(np.linspace(0.1, 1.0, 64, dtype=np.float32).reshape(64, 1))  # all positive
    q = jq.quantize(w, jq.IntScheme(4, 32, symmetric=False))
    np.testing.assert_array_equal(np.asarray(q.zero), 0)  # range widened to include 0
    codes = np.asarray(packing.unpack(q.data, 4, 64))
    assert codes.max() == 15
    assert float(jq.dequantize(jq.quantize(jnp.zeros((32, 2)), jq.IntScheme(4, 32, symmetric=False))).max()) == 0.0


def test_int8_symmetric_is_plain_int8():
    q = jq.quantize(jnp.array([[1.0], [-1.0], [0.5]]), jq.IntScheme(8, scale_dtype="float32"))
    assert q.data.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(q.data)[:, 0], [127, -127, 64])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    "kw", [{"symmetric": True}, {"symmetric": False}, {"symmetric": False, "range": "minmax"}], ids=["sym", "zp", "mm"]
)
@pytest.mark.parametrize("group", [64, None])
def test_kmajor_layout_is_the_transposed_packing(bits, kw, group):
    """``layout="nk"``: ``data`` is the (K-packed, N) array transposed; everything else and the weights are the same."""
    from jaxquant.core.layout import relayout

    w = jax.random.normal(jax.random.PRNGKey(bits), (200, 24)) * 0.1  # ragged: 200 = 3 groups of 64 + 8
    kn = jq.quantize(w, jq.IntScheme(bits=bits, group_size=group, **kw))
    nk = jq.quantize(w, jq.IntScheme(bits=bits, group_size=group, layout="nk", **kw))
    np.testing.assert_array_equal(np.asarray(nk.data), np.asarray(kn.data).T)
    np.testing.assert_array_equal(np.asarray(nk.scale), np.asarray(kn.scale))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(nk)), np.asarray(jq.dequantize(kn)))
    assert nk.nbytes == kn.nbytes == nk.scheme.storage_bytes((200, 24))
    assert nk.scheme.describe().endswith(" K-major")
    back = relayout(nk, "kn")
    assert back.scheme == kn.scheme and np.array_equal(np.asarray(back.data), np.asarray(kn.data))


def test_kmajor_layout_errors():
    with pytest.raises(ValueError, match="dense bit stream"):
        jq.IntScheme(bits=3, group_size=128, layout="nk")
    with pytest.raises(ValueError, match="layout must be one of"):
        jq.IntScheme(bits=4, layout="mn")
    with pytest.raises(ValueError, match="2-D"):  # per-tensor schemes take any shape, K-major ones only kernels
        jq.quantize(jnp.ones((4, 4, 4)), jq.IntScheme(bits=8, granularity="tensor", layout="nk"))
