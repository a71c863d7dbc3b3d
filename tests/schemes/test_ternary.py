"""BitNet b1.58 ternary (absmean) quantization against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq


def _unpack_2bit(data: np.ndarray, n: int) -> np.ndarray:
    """Four codes per byte along axis 0, code 4i+j in bits 2j..2j+1."""
    parts = [(data >> (2 * j)) & 3 for j in range(4)]
    return np.stack(parts, axis=1).reshape(data.shape[0] * 4, *data.shape[1:])[:n]


def _unpack_base3(data: np.ndarray, n: int) -> np.ndarray:
    """Five trits per byte along axis 0: byte = sum_j t_j 3**j."""
    parts = [(data // 3**j) % 3 for j in range(5)]
    return np.stack(parts, axis=1).reshape(data.shape[0] * 5, *data.shape[1:])[:n]


def _codes(q) -> np.ndarray:
    """Signed codes in {-1, 0, 1} with the logical shape of q."""
    data = np.asarray(q.data)
    n = q.size if q.scheme.granularity == "tensor" else q.shape[0]
    t = _unpack_2bit(data, n) if q.scheme.packing == "2bit" else _unpack_base3(data, n)
    assert t.max() <= 2
    return t.astype(np.int64).reshape(q.shape) - 1


@given(
    gran=st.sampled_from(["tensor", "channel"]),
    packing=st.sampled_from(["2bit", "base3"]),
    shape=st.sampled_from([(64, 8), (37, 5)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_numpy_absmean(gran, packing, shape, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 1, size=shape[1])).astype(np.float32)
    q = jq.quantize(jnp.asarray(w), jq.TernaryScheme(granularity=gran, packing=packing))
    s = np.asarray(q.scale)
    assert s.dtype == np.float32 and s.shape == (() if gran == "tensor" else (shape[1],))
    axis = None if gran == "tensor" else 0
    np.testing.assert_allclose(s, np.abs(w.astype(np.float64)).mean(axis=axis), rtol=2e-6)
    codes = _codes(q)
    np.testing.assert_array_equal(codes, np.clip(np.round(w / s), -1, 1))  # float32 divide, half-even
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), codes.astype(np.float32) * s)


def test_paper_example():
    w = jnp.asarray([[0.5, -0.04], [-2.0, 0.06], [0.1, 0.0]], jnp.float32)  # mean |w| = 0.45
    q = jq.quantize(w, jq.TernaryScheme())
    assert float(q.scale) == pytest.approx(0.45)
    np.testing.assert_array_equal(_codes(q), [[1, 0], [-1, 0], [0, 0]])
    np.testing.assert_allclose(np.asarray(jq.dequantize(q)), [[0.45, 0], [-0.45, 0], [0, 0]], rtol=1e-6)


def test_channel_granularity_has_one_scale_per_output():
    w = np.ones((16, 3), np.float32) * np.array([0.1, 1.0, 10.0], np.float32)
    w[0] *= -1
    q = jq.quantize(jnp.asarray(w), jq.TernaryScheme(granularity="channel"))
    np.testing.assert_allclose(np.asarray(q.scale), [0.1, 1.0, 10.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jq.dequantize(q)), w, rtol=1e-6)
    qt = jq.quantize(jnp.asarray(w), jq.TernaryScheme(granularity="tensor"))
    assert np.asarray(qt.scale).shape == ()
    np.testing.assert_array_equal(_codes(qt)[:, 0], 0)  # 0.1 < mean/2 = 1.85: rounded to zero per tensor


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_2bit_and_base3_dequantize_identically(gran):
    w = jax.random.normal(jax.random.key(0), (101, 7))
    q2 = jq.quantize(w, jq.TernaryScheme(gran, "2bit"))
    q3 = jq.quantize(w, jq.TernaryScheme(gran, "base3"))
    np.testing.assert_array_equal(np.asarray(q2.scale), np.asarray(q3.scale))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q2)), np.asarray(jq.dequantize(q3)))
    assert q3.nbytes < q2.nbytes


@pytest.mark.parametrize("gran,shape", [("tensor", (101, 7)), ("channel", (101, 7)), ("channel", (64, 12))])
def test_repack_is_exact_both_ways(gran, shape):
    """``repack`` gives exactly the QArray that quantizing with the other packing gives (same codes, scale), both
    ways, inside any pytree; other leaves and already-packed QArrays pass through."""
    from jaxquant.schemes.ternary import repack

    w = jax.random.normal(jax.random.key(1), shape)
    q2 = jq.quantize(w, jq.TernaryScheme(gran, "2bit"))
    q3 = jq.quantize(w, jq.TernaryScheme(gran, "base3"))
    int4 = jq.quantize(w, jq.IntScheme(4, 32))
    tree = {"a": q3, "b": [q2, int4], "c": jnp.ones(3)}
    out = repack(tree, "2bit")
    for got, want in ((out["a"], q2), (out["b"][0], q2), (repack(q2, "base3"), q3)):
        assert got.scheme == want.scheme and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
    assert out["b"][1] is int4 and out["c"] is tree["c"]
    np.testing.assert_array_equal(np.asarray(jq.dequantize(out["a"])), np.asarray(jq.dequantize(q3)))
    np.testing.assert_array_equal(_codes(jax.jit(lambda q: repack(q, "2bit"))(q3)), _codes(q3))
    with pytest.raises(ValueError, match="2bit"):
        repack(q3, "base4")
    if gran == "channel":  # the kernels read 2-bit codes: base 3 takes the XLA path, the repacked weight a kernel
        x = jnp.ones((2, shape[0]), jnp.bfloat16)
        with jq.ops.kernel_mode("interpret"):
            assert jq.ops.explain_qdot(x, q3).startswith("xla")
            assert jq.ops.explain_qdot(x, out["a"]).startswith("kernel: ternary")


def test_all_zero_uses_eps():
    q = jq.quantize(jnp.zeros((8, 2)), jq.TernaryScheme())
    assert float(q.scale) == pytest.approx(1e-5)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), 0.0)


def test_bits_per_weight_large():
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    n = 4096 * 4096

    def bpw(**kw):
        return jax.eval_shape(lambda w: jq.quantize(w, jq.TernaryScheme(**kw)), w).bits_per_weight

    assert bpw(packing="2bit") == pytest.approx(2 + 32 / n, abs=1e-12)
    assert bpw(packing="base3") == pytest.approx(8 * (-(-n // 5)) / n + 32 / n, abs=1e-12)
    assert bpw(packing="base3") == pytest.approx(1.6, abs=1e-5)
    assert bpw(packing="2bit", granularity="channel") == pytest.approx(2 + 32 / 4096, abs=1e-12)
    assert bpw(packing="base3", granularity="channel") == pytest.approx(8 * 820 / 4096 + 32 / 4096)


def test_bf16_input_keeps_dtype():
    w = (jax.random.normal(jax.random.key(5), (40, 6))).astype(jnp.bfloat16)
    q = jq.quantize(w, jq.TernaryScheme("channel"))
    out = jq.dequantize(q)
    assert out.dtype == jnp.bfloat16
    ref = jq.quantize(w.astype(jnp.float32), jq.TernaryScheme("channel"))
    np.testing.assert_array_equal(np.asarray(q.data), np.asarray(ref.data))


@pytest.mark.parametrize("scheme", [jq.TernaryScheme("tensor", "base3"), jq.TernaryScheme("channel", "2bit")])
def test_jit_equals_eager_and_vmap_equals_loop(scheme):
    ws = jax.random.normal(jax.random.key(0), (3, 96, 24))
    eager = [jq.quantize(w, scheme) for w in ws]
    jitted = jax.jit(jq.quantize, static_argnums=1)(ws[0], scheme)
    for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vm = jax.vmap(lambda w: jq.quantize(w, scheme))(ws)
    deq = jax.vmap(jq.dequantize)(vm)
    for i in range(3):
        for a, b in zip(jax.tree.leaves(eager[i]), jax.tree.leaves(vm), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])
        np.testing.assert_array_equal(np.asarray(deq[i]), np.asarray(jq.dequantize(eager[i])))
