"""BitNet b1.58 training side: QAT forward vs a float64 reference of the paper's formulas, STE gradients,
export to the packed inference BitLinear (same logits up to float32 summation order), schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models import Llama, LlamaConfig
from jaxquant.nn import BitLinear, layer_from_saved, layer_spec, variable_value, weight_params
from jaxquant.qat.bitnet import BitLinearTrain, bitnet_model, bitnet_optimizer, bitnet_schedules, export_bitnet


def _ref(x, w, eps=1e-5, granularity="tensor"):
    """float64 numpy BitNet b1.58 forward: SubLN (no scale), per-token absmax int8, absmean ternary."""
    x = np.asarray(x, np.float64).reshape(-1, w.shape[0])
    w = np.asarray(w, np.float64)
    xn = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    sx = np.max(np.abs(xn), axis=-1, keepdims=True) / 127
    xq = np.clip(np.round(xn / sx), -127, 127) * sx
    sw = np.mean(np.abs(w)) if granularity == "tensor" else np.mean(np.abs(w), axis=0)
    t = np.clip(np.round(w / sw), -1, 1)
    return xq @ (t * sw), xq, t


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_forward_matches_float64_reference_and_export(granularity):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 5, 96)) * 2.0
    w = jax.random.normal(kw, (96, 40)) * 0.05
    layer = BitLinearTrain(w, granularity=granularity)
    y = np.asarray(layer(x)).reshape(-1, 40)
    want, _, _ = _ref(x, w, granularity=granularity)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for packing in ("2bit", "base3"):
        exported = layer.export(packing)
        assert isinstance(exported, BitLinear)
        y2 = np.asarray(exported(x)).reshape(-1, 40)
        # identical int8 codes and ternary codes: only float32 summation order differs from the int32 product
        np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-6 * np.abs(y).max())
        np.testing.assert_allclose(y2, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_export_is_packed_at_most_2_bits_per_weight():
    w = jax.random.normal(jax.random.key(1), (512, 256)) * 0.02
    for packing, codes_bits in (("2bit", 2.0), ("base3", 1.6)):
        q = variable_value(BitLinearTrain(w).export(packing).kernel)
        assert isinstance(q, jq.QArray)
        assert 8 * q.data.nbytes / q.size == pytest.approx(codes_bits, abs=1e-3)
        assert q.bits_per_weight == 8 * (q.data.nbytes + 4) / q.size  # codes + one float32 scale
        assert q.bits_per_weight <= 2.0 + 1e-3


def test_ste_gradients_are_straight_through():
    kx, kw, kc = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (8, 32))
    w = jax.random.normal(kw, (32, 16)) * 0.1
    c = jax.random.normal(kc, (8, 16))
    layer = BitLinearTrain(w, norm_eps=None)

    def loss(kernel, x):
        return jnp.sum(BitLinearTrain(kernel, norm_eps=None)(x) * c)

    gw, gx = jax.grad(loss, argnums=(0, 1))(w, x)
    _, xq, t = _ref(x, w, eps=0)  # no norm: xq is the int8-rounded input
    xq = np.asarray(layer.quantized_input(x))
    sw = float(np.mean(np.abs(np.asarray(w, np.float64))))
    # dL/dW = x_q^T c (identity through the ternary quantizer); dL/dx = c W_q^T (identity through int8)
    np.testing.assert_allclose(np.asarray(gw), xq.T @ np.asarray(c), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(c) @ (t * sw).T, rtol=1e-4, atol=1e-5)


def test_bitnet_llama_export_gives_the_qat_logits():
    cfg = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
    model = bitnet_model(Llama(cfg, rngs=nnx.Rngs(0)))
    n_bit = sum(isinstance(m, BitLinearTrain) for _, m in nnx.iter_graph(model))
    assert n_bit == 2 * 7
    toks = jax.random.randint(jax.random.key(3), (2, 24), 0, 64)
    y_qat = np.asarray(model(toks))
    exported = export_bitnet(model)
    y_exp = np.asarray(exported(toks))
    assert not any(isinstance(m, BitLinearTrain) for _, m in nnx.iter_graph(exported))
    np.testing.assert_allclose(y_exp, y_qat, rtol=1e-4, atol=1e-4 * np.abs(y_qat).max())
    assert (y_exp.argmax(-1) == y_qat.argmax(-1)).mean() > 0.99
    rep = jq.report({k: v for k, v in weight_params(exported)["layers"].items()})
    assert rep.bits_per_weight <= 2.01
    # the exported layer saves and reloads through its layer spec (norm_eps included)
    layer = exported.layers[0].mlp.down_proj
    again = layer_from_saved(layer_spec(layer), nnx.to_pure_dict(nnx.state(layer)))
    assert again.norm_eps == layer.norm_eps == 1e-5
    x = jax.random.normal(jax.random.key(4), (3, 96))
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(layer(x)))


def test_schedules_follow_the_two_stage_recipe():
    lr, wd = bitnet_schedules(1e-3, 100, warmup_steps=10, weight_decay=0.1, stage2_lr_frac=0.5)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(49)) > float(lr(50)) * 1.9  # the mid-training drop
    assert float(lr(99)) < float(lr(50))
    assert float(wd(0)) == pytest.approx(0.1) and float(wd(25)) == pytest.approx(0.05, abs=1e-6)
    assert float(wd(50)) == 0.0 and float(wd(99)) == 0.0
    # the optimizer: decoupled decay, zero gradient -> update = -lr * wd * w after the first (warm) step
    tx = bitnet_optimizer(1e-2, 10, weight_decay=0.1, clip_norm=None)
    p = {"w": jnp.ones(3)}
    s = tx.init(p)
    u, s = tx.update({"w": jnp.zeros(3)}, s, p)
    np.testing.assert_allclose(np.asarray(u["w"]), -1e-2 * 0.1 * np.ones(3), rtol=1e-6)
    with pytest.raises(ValueError):
        bitnet_schedules(0.0, 10)


def test_errors():
    with pytest.raises(ValueError, match="2-D"):
        BitLinearTrain(jnp.ones(4))
    with pytest.raises(ValueError, match="norm_eps"):
        BitLinearTrain(jnp.ones((4, 4)), norm_eps=-1.0)
    with pytest.raises(ValueError, match="features"):
        BitLinearTrain(jnp.ones((4, 4)))(jnp.ones((2, 5)))
    with pytest.raises(ValueError):
        bitnet_model(Llama(LlamaConfig(64, 32, 1, 2, 2, 64), rngs=nnx.Rngs(0)), targets=r"nothing")
