"""K-major storage of the 8-bit schemes (``layout="nk"``) and ``jq.relayout``: exact, and the same results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.core.layout import dot_codes

SCHEMES = [
    jq.LLMInt8Scheme(),
    jq.LLMInt8Scheme(threshold=None, granularity="tensor"),
    jq.LLMInt8Scheme(outlier_rows=(1, 40)),
    jq.FP8Scheme("e4m3", "channel"),
    jq.FP8Scheme("e5m2", "tensor"),
]


def _w(k=96, n=40, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (k, n), jnp.float32)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_nk_storage_is_the_transpose_and_gives_the_same_results(scheme):
    import dataclasses

    w = _w()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 96)).at[..., 3].multiply(40.0)
    q = jq.quantize(w, scheme)
    q_nk = jq.quantize(w, dataclasses.replace(scheme, layout="nk"))
    assert q_nk.data.shape == (40, 96) and q_nk.scale.shape == q.scale.shape and q_nk.shape == (96, 40)
    np.testing.assert_array_equal(np.asarray(q_nk.data.T, np.float32), np.asarray(q.data, np.float32))
    assert q_nk.nbytes == q.nbytes and "K-major" in q_nk.scheme.describe()
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q_nk)), np.asarray(jq.dequantize(q)))
    ops = [jq.qdot, jax.jit(jq.qdot)] + ([jq.ops.qdot_fp8_w8a8] if isinstance(scheme, jq.FP8Scheme) else [])
    with jq.ops.kernel_mode("off"):  # the XLA paths: the same products; float32 sums possibly in another order
        for op in ops:
            y, y_nk = np.asarray(op(x, q)), np.asarray(op(x, q_nk))
            np.testing.assert_allclose(y_nk, y, rtol=0, atol=1e-6 * np.abs(y).max())


def test_relayout_is_exact_both_ways_over_a_tree():
    q8 = jq.quantize(_w(), jq.LLMInt8Scheme())
    f8 = jq.quantize(_w(seed=2), jq.FP8Scheme("e4m3", "channel"))
    i4 = jq.quantize(_w(seed=3), jq.IntScheme(4, 32))
    i3 = jq.quantize(_w(seed=4), jq.IntScheme(3, 32))
    n4 = jq.quantize(_w(seed=5), jq.NF4Scheme())
    tree = {"a": q8, "b": [f8, i4], "c": jnp.ones(3), "d": [i3, n4]}
    nk = jq.relayout(tree, "nk")
    assert nk["a"].scheme == jq.LLMInt8Scheme(layout="nk") and nk["b"][0].scheme.layout == "nk"
    assert nk["b"][1].scheme == jq.IntScheme(4, 32, layout="nk")
    # schemes without a layout, 3-bit codes (a dense stream, no K-major form) and plain arrays: untouched
    assert nk["d"][0] is i3 and nk["d"][1] is n4 and nk["c"] is tree["c"]
    assert jq.relayout(nk["a"], "nk") is nk["a"]  # already there: no copy
    back = jq.relayout(nk, "kn")
    for a, b in ((back["a"], q8), (back["b"][0], f8), (back["b"][1], i4)):
        assert a.scheme == b.scheme
        np.testing.assert_array_equal(np.asarray(a.data, np.float32), np.asarray(b.data, np.float32))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    jitted = jax.jit(lambda t: jq.relayout(t, "nk"))(tree)  # a pure function: works under jit
    np.testing.assert_array_equal(np.asarray(jitted["a"].data), np.asarray(nk["a"].data))


def test_layout_errors():
    with pytest.raises(ValueError, match="layout"):
        jq.LLMInt8Scheme(layout="km")
    with pytest.raises(ValueError, match="layout"):
        jq.FP8Scheme(layout="NK")
    with pytest.raises(ValueError, match="layout"):
        jq.relayout({}, "t")
    with pytest.raises(ValueError, match="2-D"):  # K-major storage is for 2-D kernels only
        jq.quantize(jnp.ones((4, 6, 8)), jq.FP8Scheme(layout="nk"))
    q3 = jq.quantize(jnp.ones((4, 6, 8)), jq.FP8Scheme())  # a per-tensor fp8 3-D array is fine stored as is
    with pytest.raises(ValueError, match="2-D"):
        jq.relayout(q3, "nk")


def test_dot_codes_contracts_k_in_place():
    x = jnp.arange(6.0).reshape(2, 3)
    w = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(dot_codes(x, w, "kn", jnp.float32), x @ w)
    np.testing.assert_array_equal(dot_codes(x, w.T, "nk", jnp.float32), x @ w)


def test_nk_sharding_splits_the_output_axis_of_the_codes():
    """Column-parallel: ``(N, K)`` codes split along axis 0 (output features), like the ``(N,)`` scales; row-parallel:
    along axis 1."""
    from types import SimpleNamespace

    from jax.sharding import PartitionSpec as P

    from jaxquant.sharding import qarray_specs

    mesh = SimpleNamespace(shape={"model": 4})  # qarray_specs reads the axis sizes only
    q = jq.quantize(_w(), jq.LLMInt8Scheme(layout="nk"))
    out, rows = qarray_specs(q, mesh, "model", "out"), qarray_specs(q, mesh, "model", "in")
    assert out.data == P("model", None) and out.scale == P("model")
    assert rows.data == P(None, "model") and rows.scale == P()
    kn = qarray_specs(jq.quantize(_w(), jq.LLMInt8Scheme()), mesh, "model", "out")
    assert kn.data == P(None, "model") and kn.scale == P("model")


def test_layers_take_k_major_kernels():
    from jaxquant.nn import Fp8Linear, Int8OutlierLinear
    from jaxquant.nn.layers import variable_value

    w = _w()
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 96))
    q = jq.quantize(w, jq.LLMInt8Scheme())
    layer = Int8OutlierLinear(jq.relayout(q, "nk"), threshold=6.0)
    assert variable_value(layer.kernel).scheme.layout == "nk"  # kept as given
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(Int8OutlierLinear(q, threshold=6.0)(x)))
    # with outlier dims (x * 4: about a third of them, the dense float product): agree to float32 rounding
    y = Int8OutlierLinear(q, threshold=6.0)(x * 4.0)
    np.testing.assert_allclose(np.asarray(layer(x * 4.0)), np.asarray(y), rtol=0, atol=1e-5 * float(np.abs(y).max()))
    q = jq.quantize(w, jq.FP8Scheme("e4m3", "channel"))
    y, y_nk = Fp8Linear(q, act_granularity="token")(x), Fp8Linear(jq.relayout(q, "nk"), act_granularity="token")(x)
    # the same fp8 products summed in float32; XLA may order the sums differently for the transposed operand
    np.testing.assert_allclose(np.asarray(y_nk), np.asarray(y), rtol=0, atol=1e-5 * float(np.abs(y).max()))


def test_model_swap_keeps_the_scheme_layout():
    """``quantize_model`` with an ``LLMInt8Scheme(layout="nk")`` target stores the layers' codes K-major (the
    layout is not dropped on the way to :class:`~jaxquant.nn.Int8OutlierLinear`), and a layer given a QArray of
    the other layout than asked is an error."""
    from flax import nnx

    from jaxquant.nn import Int8OutlierLinear, quantize_model
    from jaxquant.nn.layers import variable_value

    model = nnx.Sequential(nnx.Linear(32, 16, rngs=nnx.Rngs(0)))
    quantize_model(model, [(r".*", jq.LLMInt8Scheme(layout="nk"))], strict=True)
    layer = model.layers[0]
    assert isinstance(layer, Int8OutlierLinear) and variable_value(layer.kernel).data.shape == (16, 32)
    q = jq.quantize(_w(32, 16), jq.LLMInt8Scheme())
    with pytest.raises(ValueError, match="quantized with"):
        Int8OutlierLinear(q, layout="nk")


def test_checkpoints_written_before_layouts_load_as_kn():
    """A manifest from before the ``layout`` field (no such key) must read as ``(K, N)`` storage: that is how its
    codes were written. Guards against a future change of the default."""
    from jaxquant.io.checkpoint import _scheme_from_json

    for cls, fields in (
        ("LLMInt8Scheme", {"threshold": 6.0, "outlier_rows": [], "granularity": "channel"}),
        ("FP8Scheme", {"fmt": "e4m3", "granularity": "channel"}),
        ("IntScheme", {"bits": 4, "group_size": 128, "symmetric": True}),
    ):
        s = _scheme_from_json({"class": cls, "module": "jaxquant.schemes", "fields": fields})
        assert s.layout == "kn", cls


def test_k_major_specs():
    """SPECs for the CLI and the decode benchmark: the same schemes stored K-major."""
    from jaxquant.specs import list_specs, parse_spec

    for name, base in (("llm-int8-nk", "llm-int8"), ("fp8-e4m3-nk", "fp8-e4m3"), ("int4-g128-nk", "int4-g128")):
        assert name in list_specs()
        (_, s), (_, b) = parse_spec(name).rules[0], parse_spec(base).rules[0]
        assert s.layout == "nk" and s == jq.relayout(jq.quantize(_w(), b), "nk").scheme


def test_int_codes_stored_k_major_through_a_model():
    """``IntScheme(layout="nk")`` (packed codes ``(N, packed rows)``) through ``quantize_params`` and the model's
    forward pass (XLA path): the same logits as the (K, N) storage, bit for bit; ``int4-asym-nk`` parses too."""
    from jaxquant.models import Llama, LlamaConfig, forward, model_params, with_params
    from jaxquant.specs import parse_spec

    cfg = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=128)
    model = Llama(cfg)
    toks = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 64
    outs = []
    for spec in ("int4-g32", "int4-g32-nk"):
        params = jq.quantize_params(model_params(model), list(parse_spec(spec).rules))
        outs.append(np.asarray(forward(with_params(model, params), toks)))
    np.testing.assert_array_equal(outs[1], outs[0])
    assert parse_spec("int4-asym-nk").rules[0][1].layout == "nk"
