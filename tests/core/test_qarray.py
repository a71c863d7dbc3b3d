"""QArray as a pytree: jit, vmap, tree utilities, orbax checkpoints, sizes and repr."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

SCHEMES = {
    "int4_g32_asym": jq.IntScheme(4, 32, symmetric=False),
    "int3_g64_bf16": jq.IntScheme(3, 64, scale_dtype="bfloat16"),
    "int8_channel": jq.IntScheme(8),
    "minmax5": jq.IntScheme(5, 32, symmetric=False, range="minmax"),
    "nf4": jq.NF4Scheme(),
    "nf4_dq": jq.NF4Scheme(double_quant=True),
    "fp8_e4m3": jq.FP8Scheme("e4m3", "channel"),
    "ternary_base3": jq.TernaryScheme(packing="base3"),
    "llm_int8_rows": jq.LLMInt8Scheme(outlier_rows=(1, 5)),
}


@pytest.fixture(scope="module")
def w():
    return jax.random.normal(jax.random.key(0), (128, 16)) * 0.05


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(
            np.atleast_1d(np.asarray(x)).view(np.uint8), np.atleast_1d(np.asarray(y)).view(np.uint8)
        )


def _deq_bits(q):
    return np.asarray(jq.dequantize(q), np.float32)


@pytest.mark.parametrize("name", ["int4_g32_asym", "nf4_dq", "llm_int8_rows"])
def test_jit_argument_and_return(w, name):
    q = jq.quantize(w, SCHEMES[name])

    @jax.jit
    def roundtrip(q):
        return q, jq.dequantize(q)

    q2, deq = roundtrip(q)
    assert isinstance(q2, jq.QArray) and q2.scheme == q.scheme and q2.shape == q.shape and q2.dtype == q.dtype
    _leaves_equal(q, q2)
    if name == "nf4_dq":
        # XLA:CPU contracts code * absmax2 + offset into an FMA under jit: the absmax may differ by an ulp
        np.testing.assert_allclose(np.asarray(deq), _deq_bits(q), rtol=3e-7, atol=0)
    else:
        np.testing.assert_array_equal(np.asarray(deq), _deq_bits(q))
    # a QArray made inside jit and returned
    q3 = jax.jit(lambda w: jq.quantize(w, SCHEMES[name]))(w)
    _leaves_equal(q, q3)


def test_vmap_over_stacked_qarrays(w):
    s = SCHEMES["int4_g32_asym"]
    ws = jnp.stack([w, 2 * w, -w])
    qs = jax.vmap(lambda x: jq.quantize(x, s))(ws)
    assert isinstance(qs, jq.QArray) and qs.shape == (128, 16)  # static metadata is per element
    assert qs.scale.shape == (3, 4, 16)
    out = jax.vmap(jq.dequantize)(qs)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(out[i]), _deq_bits(jq.quantize(ws[i], s)))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_tree_map_identity_and_structure(w, name):
    q = jq.quantize(w, SCHEMES[name])
    q2 = jax.tree.map(lambda x: x, q)
    assert isinstance(q2, jq.QArray) and q2.scheme == q.scheme and q2.shape == q.shape
    _leaves_equal(q, q2)
    np.testing.assert_array_equal(_deq_bits(q2), _deq_bits(q))
    assert jax.tree.structure(q2) == jax.tree.structure(q)
    # multi-tree map: two QArrays of the same scheme and shape share a structure
    first = jax.tree.map(lambda a, b: a, q, q2)
    assert isinstance(first, jq.QArray)
    _leaves_equal(first, q)


def test_flatten_with_path_keys(w):
    def top_keys(q):
        paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
        assert all(isinstance(p[0], jax.tree_util.GetAttrKey) for p in paths)
        return [jax.tree_util.keystr(p) for p in paths]

    assert top_keys(jq.quantize(w, SCHEMES["int4_g32_asym"])) == [".data", ".scale", ".zero"]
    assert top_keys(jq.quantize(w, SCHEMES["nf4"])) == [".data", ".scale"]
    assert top_keys(jq.quantize(w, SCHEMES["nf4_dq"])) == [
        ".data",
        ".scale",
        ".aux['absmax_offset']",
        ".aux['absmax_scale']",
    ]
    assert top_keys(jq.quantize(w, SCHEMES["llm_int8_rows"])) == [".data", ".scale", ".aux['outlier_weight']"]
    # every child slot is named, leaves or not
    children, _ = jq.quantize(w, SCHEMES["nf4"]).tree_flatten_with_keys()
    assert [k.name for k, _ in children] == ["data", "scale", "zero", "aux"]


def test_orbax_round_trip(tmp_path, w):
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = {name: jq.quantize(w, s) for name, s in SCHEMES.items()}
    tree["bf16"] = jq.quantize(w.astype(jnp.bfloat16), jq.IntScheme(4, 32))
    tree["float_bias"] = jnp.arange(16, dtype=jnp.float32)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", tree)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", tree)
    np.testing.assert_array_equal(np.asarray(restored["float_bias"]), np.arange(16))
    for name in SCHEMES:
        r, q = restored[name], tree[name]
        assert isinstance(r, jq.QArray) and r.scheme == q.scheme and r.shape == q.shape and r.dtype == q.dtype
        _leaves_equal(q, r)
        np.testing.assert_array_equal(_deq_bits(r), _deq_bits(q))
    r = restored["bf16"]
    assert jq.dequantize(r).dtype == jnp.bfloat16
    np.testing.assert_array_equal(_deq_bits(r), _deq_bits(tree["bf16"]))
    assert restored["nf4_dq"].aux["absmax_scale"].dtype == jnp.float32
    assert restored["llm_int8_rows"].aux["outlier_weight"].dtype == jnp.float16


@pytest.mark.parametrize("name", list(SCHEMES))
def test_nbytes_and_bits_per_weight(w, name):
    q = jq.quantize(w, SCHEMES[name])
    leaves = jax.tree.leaves(q)
    assert q.nbytes == sum(x.size * x.dtype.itemsize for x in leaves)
    assert q.size == math.prod(w.shape) == 2048 and q.ndim == 2
    assert q.bits_per_weight == 8 * q.nbytes / 2048
    if isinstance(q.scheme, jq.IntScheme):
        assert q.nbytes == q.scheme.storage_bytes((128, 16))


def test_bits_per_weight_values(w):
    assert jq.quantize(w, jq.IntScheme(8, scale_dtype="float32")).bits_per_weight == 8 + 32 / 128
    assert jq.quantize(w, jq.IntScheme(4, 32)).bits_per_weight == 4 + 16 / 32
    assert jq.quantize(w, jq.NF4Scheme()).bits_per_weight == 4.5
    assert jq.quantize(w, jq.FP8Scheme()).bits_per_weight == 8 + 32 / 2048
    rows = jq.quantize(w, SCHEMES["llm_int8_rows"])
    assert rows.nbytes == 2048 + 16 * 4 + 2 * 16 * 2  # int8 + f32 scales + two fp16 rows


def test_repr(w):
    q = jq.quantize(w, jq.IntScheme(4, 32))
    r = repr(q)
    assert r.startswith("QArray(shape=(128, 16), dtype=float32")
    assert "IntScheme(bits=4, group_size=32" in r and "bits_per_weight=4.500" in r
    assert "nf4" in jq.NF4Scheme(double_quant=True).describe()
    # repr of an abstract QArray (eval_shape) works too
    abstract = jax.eval_shape(lambda w: jq.quantize(w, jq.NF4Scheme()), w)
    assert "bits_per_weight=4.500" in repr(abstract)


def test_schemes_are_hashable_static_args(w):
    assert hash(jq.IntScheme(4, 32)) == hash(jq.IntScheme(4, 32))
    assert jq.LLMInt8Scheme(outlier_rows=(5, 1)) == jq.LLMInt8Scheme(outlier_rows=(1, 5))
    f = jax.jit(jq.quantize, static_argnums=1)
    _leaves_equal(f(w, jq.IntScheme(4, 32)), jq.quantize(w, jq.IntScheme(4, 32)))
