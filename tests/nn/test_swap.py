"""quantize_model: swapping linear layers of a user's NNX model and of our Llama, by module-path rules."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models import Llama, LlamaConfig, model_params, with_params
from jaxquant.nn import (
    Fp8Linear,
    Int8OutlierLinear,
    QLinear,
    linear_paths,
    path_aware,
    quantize_model,
)


class UserMLP(nnx.Module):
    """A user's own model: nnx.Linear layers with biases, a norm and a conv that must be left alone."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 2, kernel_size=(3,), rngs=rngs)
        self.up = nnx.Linear(16, 64, rngs=rngs)
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(64, 64, rngs=rngs) for _ in range(2)])
        self.down = nnx.Linear(64, 8, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm(jax.nn.gelu(self.up(x)))
        for b in self.blocks:
            h = h + jax.nn.gelu(b(h))
        return self.down(h)


def _x() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (4, 16))


def test_user_mlp_first_match_wins_and_rest_untouched() -> None:
    model = UserMLP(nnx.Rngs(0))
    assert linear_paths(model) == ["blocks/0", "blocks/1", "down", "up"]  # nnx graph order: sorted names
    y0 = model(_x())
    conv, norm = model.conv, model.norm
    q = quantize_model(
        nnx.clone(model),
        [
            (r"blocks/1", None),  # keep float
            (r"blocks/\d+", jq.IntScheme(8)),
            (r"up", lambda m: Fp8Linear.from_linear(m)),
            (r"conv", None),  # a catch-all scheme rule would otherwise hit the conv's 3-D kernel (an error)
            (r".*", jq.NF4Scheme()),
        ],
    )
    assert isinstance(q.blocks[0], QLinear) and q.blocks[0].kernel.get_value().scheme == jq.IntScheme(8)
    assert isinstance(q.blocks[1], nnx.Linear)
    assert isinstance(q.up, Fp8Linear) and isinstance(q.down, QLinear)
    assert q.down.bias is None and q.blocks[0].bias is not None
    assert isinstance(q.conv, nnx.Conv) and isinstance(q.norm, nnx.LayerNorm)
    # the original is untouched (quantize_model works in place on the clone)
    assert isinstance(model.up, nnx.Linear) and model.conv is conv and model.norm is norm
    y = nnx.jit(lambda m, x: m(x))(q, _x())
    assert y.shape == y0.shape
    assert float(jnp.abs(y - y0).max()) < 0.1 * float(jnp.abs(y0).max())


def test_llama_swap_equals_param_rules_bit_exact() -> None:
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
    scheme = jq.IntScheme(4, 16)
    swapped = quantize_model(nnx.clone(model), [(r"layers/\d+/(attn|mlp)/\w+_proj", scheme)], strict=True)
    n = sum(isinstance(m, QLinear) for _, m in nnx.iter_graph(swapped))
    assert n == 2 * 7 and not isinstance(swapped.lm_head, QLinear)
    ruled = with_params(model, jq.quantize_params(model_params(model), [(r"layers/\d+/\w+/\w+_proj/kernel", scheme)]))
    fwd = nnx.jit(lambda m, t: m(t))
    np.testing.assert_array_equal(np.asarray(fwd(swapped, tokens)), np.asarray(fwd(ruled, tokens)))


def test_llm_int8_scheme_rule_gives_outlier_layer() -> None:
    model = UserMLP(nnx.Rngs(0))
    q = quantize_model(model, [(r"up", jq.LLMInt8Scheme(threshold=5.0, outlier_rows=(0,)))])
    assert q is model and isinstance(q.up, Int8OutlierLinear)
    assert q.up.kernel.get_value().scheme == jq.LLMInt8Scheme(threshold=5.0, outlier_rows=(0,))


def test_path_aware_factory_gets_the_path() -> None:
    seen = []

    @path_aware
    def factory(m, path):
        seen.append(path)
        return QLinear.from_linear(m, jq.IntScheme(8))

    quantize_model(UserMLP(nnx.Rngs(0)), [(r"blocks/\d+", factory)])
    assert seen == ["blocks/0", "blocks/1"]


def test_bad_rules_give_clear_errors_and_warnings() -> None:
    model = UserMLP(nnx.Rngs(0))
    with pytest.warns(
        UserWarning,
        match=r"matched no linear layer: .*q_proj'; linear layer paths look like \['blocks/0', 'blocks/1'\]",
    ):
        quantize_model(nnx.clone(model), [(r"layers/\d+/q_proj", jq.IntScheme(8))])
    with pytest.warns(UserWarning, match=r"only non-linear modules: \['norm'\]"):
        quantize_model(nnx.clone(model), [(r"norm", jq.IntScheme(8))])
    with pytest.raises(ValueError, match="matched no linear layer"):
        quantize_model(nnx.clone(model), [(r"nothing", jq.IntScheme(8))], strict=True)
    # a scheme on a non-2-D kernel (a convolution's (3, 2, 2) kernel)
    with pytest.raises(ValueError, match=r"matches conv \(Conv\), whose kernel is not a 2-D.*shape \(3, 2, 2\)"):
        quantize_model(nnx.clone(model), [(r"conv|up", jq.IntScheme(8))])
    with pytest.raises(ValueError, match="invalid regex"):
        quantize_model(nnx.clone(model), [(r"up(", jq.IntScheme(8))])
    with pytest.raises(TypeError, match="target must be"):
        quantize_model(nnx.clone(model), [(r"up", "int8")])
    with pytest.raises(TypeError, match=r"rules\[0\] must be a \(module_path_regex, target\) pair"):
        quantize_model(nnx.clone(model), [r"up"])
    with pytest.raises(TypeError, match="list of"):
        quantize_model(nnx.clone(model), "up")
    with pytest.raises(TypeError, match="up: the layer factory returned int"):
        quantize_model(nnx.clone(model), [(r"up", lambda m: 3)])
    with pytest.raises(ValueError, match=r"blocks/0: .*out of range for 64 input rows"):
        quantize_model(nnx.clone(model), [(r"blocks/0", jq.LLMInt8Scheme(outlier_rows=(70,)))])


def test_already_quantized_layers_are_left_with_a_warning() -> None:
    q = quantize_model(UserMLP(nnx.Rngs(0)), [(r"up", jq.IntScheme(8))])
    data = np.asarray(q.up.kernel.get_value().data)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        quantize_model(q, [(r"up", jq.NF4Scheme()), (r"down", jq.IntScheme(8))])
    assert any("already quantized" in str(x.message) for x in w)
    assert not any("matched no linear layer" in str(x.message) for x in w)
    assert q.up.kernel.get_value().scheme == jq.IntScheme(8)
    np.testing.assert_array_equal(np.asarray(q.up.kernel.get_value().data), data)
