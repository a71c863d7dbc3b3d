"""quantize_params (path rules over any pytree) and report()."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.transform import path_str

INT4 = jq.IntScheme(4, 32)
INT8 = jq.IntScheme(8)
NF4 = jq.NF4Scheme()


def _linen_params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "params": {
            "Dense_0": {"kernel": jax.random.normal(k[0], (64, 32)), "bias": jnp.zeros((32,))},
            "Dense_1": {"kernel": jax.random.normal(k[1], (32, 8)), "bias": jnp.ones((8,))},
            "Embed_0": {"embedding": jax.random.normal(k[2], (100, 64))},
            "step": jnp.array(3, jnp.int32),  # not floating: never touched
        }
    }


def _flat(tree):
    return {
        path_str(p): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jq.QArray))[0]
    }


def test_linen_dict():
    params = _linen_params()
    q = jq.quantize_params(params, [(r"params/Dense_\d+/kernel", INT4), (r".*embedding", NF4)])
    flat, orig = _flat(q), _flat(params)
    assert set(flat) == set(orig)
    for path in ["params/Dense_0/kernel", "params/Dense_1/kernel"]:
        assert isinstance(flat[path], jq.QArray) and flat[path].scheme == INT4
        np.testing.assert_array_equal(
            np.asarray(jq.dequantize(flat[path])), np.asarray(jq.dequantize(jq.quantize(orig[path], INT4)))
        )
    assert flat["params/Embed_0/embedding"].scheme == NF4
    for path in ["params/Dense_0/bias", "params/Dense_1/bias", "params/step"]:
        assert flat[path] is orig[path]  # kept as is
    assert jax.tree.structure(params) == jax.tree.structure(_dequantize_all(q))


def _is_q(x):
    return isinstance(x, jq.QArray)


def _dequantize_all(tree):
    return jax.tree.map(lambda x: jq.dequantize(x) if _is_q(x) else x, tree, is_leaf=_is_q)


def test_tree_with_lists_and_tuples():
    k = jax.random.split(jax.random.key(1), 3)
    params = {"layers": [{"w": jax.random.normal(k[0], (32, 16))}, {"w": jax.random.normal(k[1], (32, 16))}]}
    params["head"] = (jax.random.normal(k[2], (16, 4)), jnp.zeros(4))
    q = jq.quantize_params(params, [(r"layers/1/w", INT8), (r"head/0", INT4)])
    assert not _is_q(q["layers"][0]["w"]) and _is_q(q["layers"][1]["w"])
    assert isinstance(q["head"], tuple) and _is_q(q["head"][0]) and not _is_q(q["head"][1])
    assert set(_flat(q)) == {"layers/0/w", "layers/1/w", "head/0", "head/1"}


def test_first_full_match_wins_and_none_keeps_float():
    params = _linen_params()
    rules = [
        (r"params/Dense_1/kernel", None),  # keep the last layer in float: listed first, so it wins
        (r"params/Dense_\d/kernel", INT4),
        (r".*kernel", INT8),  # would match Dense_0 too, but comes later
        (r"Dense_0", NF4),  # partial match only: never used
    ]
    with pytest.warns(UserWarning, match="Dense_0"):
        q = jq.quantize_params(params, rules)
    flat = _flat(q)
    assert flat["params/Dense_0/kernel"].scheme == INT4
    assert flat["params/Dense_1/kernel"] is params["params"]["Dense_1"]["kernel"]
    assert not _is_q(flat["params/Embed_0/embedding"])


def test_full_match_not_search():
    params = _linen_params()
    with pytest.warns(UserWarning, match="kernel"):
        q = jq.quantize_params(params, [(r"kernel", INT8)])
    assert not any(_is_q(v) for v in _flat(q).values())


def test_unmatched_rule_warns_or_raises():
    params = _linen_params()
    with pytest.warns(UserWarning, match=r"matched no floating leaf: \['nope/.\*'\]"):
        jq.quantize_params(params, [(r".*kernel", INT8), (r"nope/.*", INT4)])
    with pytest.raises(ValueError, match="nope"):
        jq.quantize_params(params, [(r".*kernel", INT8), (r"nope/.*", INT4)], strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jq.quantize_params(params, [(r".*kernel", INT8)], strict=True)  # all rules used: silent
    # a rule only matching a non-floating leaf counts as unmatched
    with pytest.raises(ValueError, match="step"):
        jq.quantize_params(params, [(r"params/step", INT8)], strict=True)


def test_invalid_rules():
    with pytest.raises(ValueError, match=r"invalid regex '\(unclosed'"):
        jq.quantize_params(_linen_params(), [("(unclosed", INT8)])
    with pytest.raises(TypeError, match="Scheme"):
        jq.quantize_params(_linen_params(), [(".*", "int8")])
    with pytest.raises(TypeError, match="pair"):
        jq.quantize_params(_linen_params(), [(".*", INT8, 1)])
    with pytest.raises(TypeError, match="list"):
        jq.quantize_params(_linen_params(), ".*")


def test_error_names_the_path():
    params = {"blocks": [{"ln": {"scale": jnp.ones((16,))}}]}
    with pytest.raises(ValueError, match=r"^blocks/0/ln/scale: .*shape \(16,\)"):
        jq.quantize_params(params, [(r".*", INT4)])
    bad = {"a": {"w": jnp.ones((8, 8)).at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match=r"^a/w: .*NaN"):
        jq.quantize_params(bad, [(r".*", INT8)])
    q = jq.quantize_params(bad, [(r".*", INT8)], allow_nonfinite=True)
    assert _is_q(q["a"]["w"])


def test_existing_qarrays_left_alone():
    params = _linen_params()
    q1 = jq.quantize_params(params, [(r".*kernel", INT4)])
    with pytest.warns(UserWarning, match=r"\['\.\*kernel'\]"):  # QArray leaves are not floating leaves
        q2 = jq.quantize_params(q1, [(r".*kernel", INT8), (r".*embedding", INT8)])
    assert _flat(q2)["params/Dense_0/kernel"] is _flat(q1)["params/Dense_0/kernel"]
    assert _flat(q2)["params/Embed_0/embedding"].scheme == INT8


def test_report():
    params = _linen_params()
    q = jq.quantize_params(params, [(r"params/Dense_\d+/kernel", INT4), (r".*embedding", jq.IntScheme(8))])
    rep = jq.report(q)
    assert isinstance(rep, jq.Report)
    rows = {r.path: r for r in rep.rows}
    assert set(rows) == set(_flat(params))
    d0 = rows["params/Dense_0/kernel"]
    assert d0.quantized and d0.shape == (64, 32) and d0.scheme == INT4.describe()
    assert d0.nbytes == INT4.storage_bytes((64, 32)) == 64 * 32 // 2 + 2 * 32 * 2
    assert d0.bits_per_weight == pytest.approx(4.5)
    b = rows["params/Dense_0/bias"]
    assert not b.quantized and b.nbytes == 32 * 4 and b.bits_per_weight == 32 and b.scheme == "float32"
    assert rows["params/step"].nbytes == 4 and not rows["params/step"].quantized
    # totals
    qbytes = sum(_flat(q)[p].nbytes for p in rows if rows[p].quantized)
    fbytes = (32 + 8 + 1) * 4
    assert rep.quantized_bytes == qbytes
    assert rep.total_bytes == qbytes + fbytes
    assert rep.quantized_weights == 64 * 32 + 32 * 8 + 100 * 64
    assert rep.bits_per_weight == pytest.approx(8 * qbytes / (64 * 32 + 32 * 8 + 100 * 64))
    assert 4 < rep.bits_per_weight < 8.5  # quantized tensors only: the float biases do not count
    text = str(rep)
    assert "params/Dense_0/kernel" in text and "params/Embed_0/embedding" in text
    assert "6 tensors (3 quantized)" in text and f"total {rep.total_bytes:,} bytes" in text
    assert f"{rep.bits_per_weight:.3f} bits/weight" in text


def test_report_of_float_tree():
    rep = jq.report({"w": jnp.ones((4, 4), jnp.bfloat16)})
    assert rep.total_bytes == 32 and rep.quantized_bytes == 0
    assert math.isnan(rep.bits_per_weight)
    assert "nan bits/weight" in str(rep)


class TestNNX:
    nnx = pytest.importorskip("flax.nnx")

    def _model(self):
        nnx = self.nnx

        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.up = nnx.Linear(64, 32, rngs=rngs)
                self.down = nnx.Linear(32, 8, rngs=rngs)

            def __call__(self, x):
                return self.down(nnx.relu(self.up(x)))

        return MLP(self.nnx.Rngs(0))

    def test_quantize_nnx_state(self):
        nnx = self.nnx
        model = self._model()
        x = jax.random.normal(jax.random.key(9), (4, 64))
        y_float = model(x)
        graphdef, state = nnx.split(model)
        paths = set(_flat(state))
        assert {"up/kernel/value", "down/kernel/value", "up/bias/value"} <= paths  # NNX adds "value"
        qstate = jq.quantize_params(state, [(r".*kernel.*", INT8)])
        flat = _flat(qstate)
        assert _is_q(flat["up/kernel/value"]) and _is_q(flat["down/kernel/value"])
        assert not _is_q(flat["up/bias/value"])
        rep = jq.report(qstate)
        assert sum(r.quantized for r in rep.rows) == 2

        # merging a QArray into the NNX graph works: the Param simply holds the QArray ...
        qmodel = nnx.merge(graphdef, qstate)
        assert _is_q(qmodel.up.kernel.get_value())
        # ... but nnx.Linear indexes its kernel (kernel[...]), which a QArray does not support
        with pytest.raises(TypeError, match="QArray"):
            qmodel(x)

        # what works: dequantize the state (or use qdot in your own layer) and merge that
        deq_state = _dequantize_all(qstate)
        y_deq = nnx.merge(graphdef, deq_state)(x)
        np.testing.assert_allclose(np.asarray(y_deq), np.asarray(y_float), atol=0.05 * float(jnp.abs(y_float).max()))

        def forward(qm, x):
            h = jq.qdot(x, qm.up.kernel.get_value()) + qm.up.bias.get_value()
            return jq.qdot(nnx.relu(h), qm.down.kernel.get_value()) + qm.down.bias.get_value()

        y_q = nnx.jit(forward)(qmodel, x)
        np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_deq), rtol=1e-5, atol=1e-6)
