"""The Llama model on tiny random configs: shapes, causality, RoPE conventions, QArray kernels, paths."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models import (
    Llama,
    LlamaConfig,
    apply,
    convert_rope_style,
    flat_params,
    forward,
    model_params,
    param_path,
    param_shapes,
    permute_adjacent_to_half,
    permute_half_to_adjacent,
    unflatten_params,
    with_params,
)

RULE = r".*layers/\d+/(attn|mlp)/\w+_proj/kernel.*"


def _cfg(**kw) -> LlamaConfig:
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, rope_theta=1e4)
    base.update(kw)
    return LlamaConfig(**base)


def _tokens(b: int = 2, t: int = 11, v: int = 61, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, v, (b, t)), jnp.int32)


def _random_params(config: LlamaConfig, seed: int = 0, scale: float = 0.2) -> dict:
    """Random params with non-trivial norms (a freshly initialised model has all-ones norms)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(config).items():
        if path.endswith("scale"):
            flat[path] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            flat[path] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return unflatten_params(flat)


@pytest.mark.parametrize("tie", [True, False])
def test_forward_shape_dtype_and_param_paths(tie: bool) -> None:
    c = _cfg(tie_embeddings=tie)
    m = Llama(c, rngs=nnx.Rngs(0))
    logits = forward(m, _tokens())
    assert logits.shape == (2, 11, c.vocab_size) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    paths = set(flat_params(model_params(m)))
    assert paths == set(param_shapes(c))
    assert ("lm_head/kernel" in paths) is (not tie)
    assert "layers/1/attn/q_proj/kernel" in paths and "layers/0/mlp/down_proj/kernel" in paths
    assert {"embed/embedding", "norm/scale", "layers/0/attn_norm/scale", "layers/0/mlp_norm/scale"} <= paths
    n = sum(int(np.prod(s)) for s in param_shapes(c).values())
    assert n == c.num_params()
    # nnx.State paths end in "/value"
    _, state = nnx.split(m)
    state_paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert "layers/0/attn/q_proj/kernel/value" in state_paths
    proj = [p for p in state_paths if re.fullmatch(RULE, p)]
    assert len(proj) == 7 * c.n_layers


def test_causal_and_positions() -> None:
    c = _cfg()
    m = with_params(Llama(c), _random_params(c))
    t = _tokens(1, 12)
    t2 = t.at[0, 8:].set((t[0, 8:] + 5) % c.vocab_size)
    a, b = np.asarray(m(t)), np.asarray(m(t2))
    np.testing.assert_array_equal(a[:, :8], b[:, :8])
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-3
    # explicit positions equal to arange give the same result; shifted ones do not (RoPE is relative, but
    # the first token attends only to itself, so compare a later position)
    np.testing.assert_allclose(np.asarray(m(t, jnp.arange(12))), a, atol=1e-6)
    shifted = np.asarray(m(t, jnp.arange(12) + 3))
    np.testing.assert_allclose(shifted, a, atol=2e-4)  # relative positions unchanged -> same logits
    with pytest.raises(ValueError, match="batch, seq"):
        m(t[0])
    with pytest.raises(TypeError, match="integers"):
        m(t.astype(jnp.float32))


def test_rope_conventions_are_the_same_model_after_permutation() -> None:
    c = _cfg(rope_style="half")
    p = _random_params(c, seed=3)
    ref = np.asarray(Llama.from_params(c, p)(_tokens()))
    ca, pa = convert_rope_style(p, c, "adjacent")
    assert ca.rope_style == "adjacent"
    out = np.asarray(Llama.from_params(ca, pa)(_tokens()))
    np.testing.assert_array_equal(out, ref)
    # the adjacent model run with half-split RoPE is a different model
    wrong = np.asarray(Llama.from_params(c, pa)(_tokens()))
    assert np.abs(wrong - ref).max() > 1e-3
    # permutations are inverse of each other and match llama.cpp's HF->GGUF reshape on (out, in) weights
    w = np.random.default_rng(0).standard_normal((32, 4 * 8)).astype(np.float32)
    np.testing.assert_array_equal(permute_adjacent_to_half(permute_half_to_adjacent(w, 4), 4), w)
    wt = w.T  # (out, in) as in torch
    llama_cpp = wt.reshape(4, 2, 4, 32).swapaxes(1, 2).reshape(wt.shape)
    np.testing.assert_array_equal(permute_half_to_adjacent(w, 4), llama_cpp.T)


def test_rope_matches_explicit_rotation() -> None:
    """One head, one layer: check q.k scores against a hand-written 2-D rotation per pair."""
    from jaxquant.models.llama import apply_rope, rope_tables

    rng = np.random.default_rng(0)
    d, t = 8, 5
    q = rng.standard_normal((1, t, 1, d)).astype(np.float32)
    cos, sin = rope_tables(jnp.arange(t)[None], d, 100.0)
    got = np.asarray(apply_rope(jnp.asarray(q), cos, sin, "half"))[0, :, 0]
    want = np.empty((t, d))
    for pos in range(t):
        for i in range(d // 2):
            ang = pos * 100.0 ** (-2 * i / d)
            a, b = q[0, pos, 0, i], q[0, pos, 0, i + d // 2]
            want[pos, i] = a * np.cos(ang) - b * np.sin(ang)
            want[pos, i + d // 2] = a * np.sin(ang) + b * np.cos(ang)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_quantized_kernels_via_split_merge_under_jit() -> None:
    c = _cfg()
    m = with_params(Llama(c), _random_params(c, seed=1, scale=0.1))
    t = _tokens()
    ref = np.asarray(forward(m, t))
    scheme = jq.IntScheme(bits=8)

    graphdef, state = nnx.split(m)
    qstate = jax.tree_util.tree_map_with_path(
        lambda p, x: jq.quantize(x, scheme) if re.fullmatch(RULE, param_path(p)) else x, state
    )
    qmodel = nnx.merge(graphdef, qstate)
    assert isinstance(qmodel.layers[0].attn.q_proj.kernel.get_value(), jq.QArray)
    out_nnx = np.asarray(forward(qmodel, t))
    out_fun = np.asarray(apply(graphdef, qstate, t))
    out_eager = np.asarray(qmodel(t))
    np.testing.assert_allclose(out_nnx, out_fun, atol=1e-5)
    np.testing.assert_allclose(out_nnx, out_eager, atol=1e-4)
    rel = np.linalg.norm(out_nnx - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.02, rel
    # the original model is untouched
    assert not isinstance(m.layers[0].attn.q_proj.kernel.get_value(), jq.QArray)

    # same through plain dicts
    params = model_params(m)
    flat = flat_params(params)
    qflat = {k: (jq.quantize(v, scheme) if re.fullmatch(RULE, k) else v) for k, v in flat.items()}
    qm2 = with_params(m, unflatten_params(qflat))
    np.testing.assert_allclose(np.asarray(forward(qm2, t)), out_nnx, atol=1e-5)


def test_quantize_params_on_state_and_on_param_dict() -> None:
    """``jq.quantize_params`` with path regexes works on both an nnx.State and the model_params dict."""
    c = _cfg()
    m = with_params(Llama(c), _random_params(c, seed=5, scale=0.1))
    rules = [(RULE, jq.IntScheme(bits=8))]
    t = _tokens()
    graphdef, state = nnx.split(m)
    qstate = jq.quantize_params(state, rules, strict=True)
    out_state = np.asarray(forward(nnx.merge(graphdef, qstate), t))
    qparams = jq.quantize_params(model_params(m), rules, strict=True)
    flat = flat_params(qparams)
    assert sorted(k for k, v in flat.items() if isinstance(v, jq.QArray)) == sorted(
        k for k in param_shapes(c) if re.fullmatch(RULE, k)
    )
    out_dict = np.asarray(forward(with_params(m, qparams), t))
    np.testing.assert_array_equal(out_state, out_dict)


def test_quantized_embedding_and_lm_head() -> None:
    c = _cfg(tie_embeddings=False)
    p = _random_params(c, seed=2, scale=0.1)
    ref = np.asarray(Llama.from_params(c, p)(_tokens()))
    flat = flat_params(p)
    for k in ("embed/embedding", "lm_head/kernel"):
        flat[k] = jq.quantize(jnp.asarray(flat[k]), jq.IntScheme(bits=8))
    out = np.asarray(forward(Llama.from_params(c, unflatten_params(flat)), _tokens()))
    assert 0 < np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.02


def test_bfloat16_compute() -> None:
    c = _cfg()
    p = _random_params(c, seed=4, scale=0.1)
    ref = np.asarray(Llama.from_params(c, p)(_tokens()))
    out = forward(Llama.from_params(c.replace(dtype="bfloat16"), p), _tokens())
    assert out.dtype == jnp.float32
    assert 0 < np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 0.05


def test_with_params_validates() -> None:
    c = _cfg()
    p = _random_params(c)
    flat = flat_params(p)
    bad = dict(flat)
    del bad["norm/scale"]
    with pytest.raises(ValueError, match="missing"):
        with_params(c, unflatten_params(bad))
    bad = dict(flat)
    bad["layers/0/attn/q_proj/kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        with_params(c, unflatten_params(bad))
    bad = dict(flat)
    bad["layers/0/attn/extra/kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="unexpected"):
        with_params(c, unflatten_params(bad))


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n_kv_heads=3), "divide"),
        (dict(dim=30), "divisible"),
        (dict(rope_style="interleaved"), "rope_style"),
        (dict(n_layers=0), "positive"),
        (dict(dtype="int8"), "floating"),
    ],
)
def test_config_validation(kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        _cfg(**kw)
