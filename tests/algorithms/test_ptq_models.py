"""Model-level GPTQ, AWQ and SmoothQuant on a tiny random Llama: they run, produce ordinary QArrays (and
rescaled norms) that the model uses unchanged, and beat round-to-nearest on the calibration data."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.algorithms.awq import (
    AWQConfig,
    awq_layer,
    awq_model,
    fake_quant,
    fold_scales,
    search_clip,
    search_scale,
    tie_kv,
)
from jaxquant.algorithms.gptq import GPTQConfig, gptq_model, gptq_with_stats, position_weights, split_columns
from jaxquant.algorithms.smoothquant import SmoothQuantConfig, smooth_scales, smoothquant_model
from jaxquant.calibrate import InputStats, accumulate, collect_stats
from jaxquant.models import Llama, LlamaConfig, flat_params, model_params, unflatten_params, with_params

# hidden_dim = dim: q|k|v and gate|up are both (64, 128), o and down both (64, 64): two GPTQ compilations only
CFG = LlamaConfig(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, tie_embeddings=True)
S3 = jq.IntScheme(3, 16, symmetric=False)


def _model(seed=0, outlier=None) -> Llama:
    m = Llama(CFG)
    p = flat_params(model_params(m))
    rng = np.random.default_rng(seed)
    for k, v in p.items():
        shape = np.shape(v)
        if k.endswith("kernel"):
            p[k] = jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)
        elif k.endswith("scale"):
            s = 1 + 0.3 * rng.standard_normal(shape)
            if outlier is not None and "layers" in k:
                s[outlier] *= 30  # a few channels with huge activations (what SmoothQuant/AWQ are for)
            p[k] = jnp.asarray(s, jnp.float32)
        else:
            p[k] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return with_params(m, unflatten_params(p))


def _windows(n=8, t=32, seed=1):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, t)).astype(np.int32)


def _logit_err(model, params, win):
    ref = np.asarray(model(jnp.asarray(win)))
    got = np.asarray(with_params(model, params)(jnp.asarray(win)))
    return float(np.mean((got - ref) ** 2))


def _rtn(model, scheme):
    return jq.quantize_params(model_params(model), [(r"layers/\d+/(attn|mlp)/\w+_proj/kernel", scheme)])


def _all_quantized(params):
    flat = flat_params(params)
    kernels = [k for k in flat if k.endswith("_proj/kernel")]
    assert len(kernels) == 7 * CFG.n_layers
    return all(isinstance(flat[k], jq.QArray) for k in kernels)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_model_beats_rtn(true_sequential):
    model = _model()
    win = _windows()
    cfg = GPTQConfig(scheme=S3, n_samples=8, seq_len=32, true_sequential=true_sequential, first_token_weight=5.0)
    params, rec = gptq_model(model, win, cfg, progress=False)
    assert _all_quantized(params)
    assert len(rec) == 4 * CFG.n_layers
    assert all(r.loss < r.rtn_loss for r in rec)
    flat = flat_params(params)
    q = flat["layers/0/attn/k_proj/kernel"]
    assert q.scheme == S3 and q.shape == (64, 32) and "g_idx" not in q.aux  # act-order with static groups
    assert _logit_err(model, params, win) < 0.7 * _logit_err(model, _rtn(model, S3), win)


def test_gptq_model_nonsequential_matches_manual_gptq():
    """sequential=False: each layer is exactly GPTQ on the float model's Hessian (shared by q/k/v)."""
    model = _model()
    win = _windows()
    cfg = GPTQConfig(scheme=S3, n_samples=8, seq_len=32, sequential=False)
    params, _ = gptq_model(model, win, cfg, progress=False)
    stats = collect_stats(model, win, progress=False)
    blk = flat_params(model_params(model)["layers"][1])
    w = jnp.concatenate([blk[f"attn/{n}_proj/kernel"] for n in "qkv"], axis=1)
    q, _ = gptq_with_stats(w, stats[1]["attn_in"].hessian, S3, act_order=True, static_groups=True)
    want = split_columns(q, [64, 32, 32])[2]
    got = flat_params(params)["layers/1/attn/v_proj/kernel"]
    np.testing.assert_array_equal(np.asarray(jq.dequantize(got)), np.asarray(jq.dequantize(want)))


def test_position_weights():
    assert position_weights(8, 1.0) is None
    pw = position_weights(8, 20.0)
    assert pw.shape == (8,) and pw[0] == 20 and np.all(pw[1:] == 1)


def test_gptq_config_errors():
    with pytest.raises(TypeError, match="IntScheme"):
        GPTQConfig(scheme=jq.NF4Scheme())
    with pytest.raises(ValueError, match="n_samples"):
        GPTQConfig(scheme=S3, n_samples=0)
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(scheme=S3, damp=-1.0)
    with pytest.raises(TypeError, match="config"):
        gptq_model(_model(), _windows(), {"scheme": S3})


# ---------------------------------------------------------------------------------------------------------
# AWQ
# ---------------------------------------------------------------------------------------------------------


def test_fold_scales_preserves_the_function():
    model = _model()
    win = _windows(n=2)
    rng = np.random.default_rng(3)
    p = model_params(model)
    blk = flat_params(p["layers"][0])
    scales = {
        "attn_in": jnp.asarray(rng.uniform(0.3, 3, 64), jnp.float32),
        "o_in": tie_kv(jnp.asarray(rng.uniform(0.3, 3, 64), jnp.float32), CFG),
        "mlp_in": jnp.asarray(rng.uniform(0.3, 3, 64), jnp.float32),
        "down_in": jnp.asarray(rng.uniform(0.3, 3, 64), jnp.float32),
    }
    new = fold_scales(blk, scales, CFG)
    assert not np.allclose(np.asarray(new["attn_norm/scale"]), np.asarray(blk["attn_norm/scale"]))
    p2 = dict(p)
    p2["layers"] = dict(p["layers"])
    p2["layers"][0] = unflatten_params(new)
    a = np.asarray(model(jnp.asarray(win)))
    b = np.asarray(with_params(model, p2)(jnp.asarray(win)))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="equal across"):
        fold_scales(blk, {"o_in": jnp.asarray(rng.uniform(0.3, 3, 64), jnp.float32)}, CFG)
    with pytest.raises(ValueError, match="unknown input group"):
        fold_scales(blk, {"nope": jnp.ones(64)}, CFG)
    with pytest.raises(ValueError, match="shape"):
        fold_scales(blk, {"attn_in": jnp.ones(3)}, CFG)
    qblk = dict(blk)
    qblk["attn/q_proj/kernel"] = jq.quantize(blk["attn/q_proj/kernel"], S3)
    with pytest.raises(ValueError, match="already quantized"):
        fold_scales(qblk, {"attn_in": jnp.ones(64)}, CFG)


def _outlier_layer(seed=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    x[:, [3, 17]] *= 25.0
    w = (rng.standard_normal((64, 48)) * 0.1).astype(np.float32)
    st = accumulate(InputStats.zeros(64), jnp.asarray(x))
    return jnp.asarray(w), st


def test_search_scale_and_clip():
    w, st = _outlier_layer()
    h = st.hessian
    s, alpha, losses = search_scale(w, h, st.mean_abs, S3)
    assert losses.shape == (20,)
    e0 = np.asarray(w - fake_quant(w, S3))
    np.testing.assert_allclose(float(losses[0]), np.sum(e0 * (np.asarray(h) @ e0)), rtol=1e-4)  # alpha = 0: RTN
    assert alpha > 0 and float(jnp.min(losses)) < 0.8 * float(losses[0])
    assert float(s[3]) > float(jnp.median(s))  # the outlier channels are protected
    wc, ratios = search_clip(w, h, S3)
    assert ratios.shape == (4, 48) and float(ratios.min()) >= 0.5 and float(ratios.max()) <= 1.0
    assert float(ratios.min()) < 1.0 and np.all(np.abs(np.asarray(wc)) <= np.abs(np.asarray(w)))
    q, s2 = awq_layer(w, h, st.mean_abs, S3)
    w_hat = jq.dequantize(q) / s2[:, None]
    e = np.asarray(w - w_hat)
    assert np.sum(e * (np.asarray(h) @ e)) < float(jnp.min(losses)) * 1.0001  # clipping only helps
    np.testing.assert_array_equal(np.asarray(fake_quant(w, S3)), np.asarray(jq.dequantize(jq.quantize(w, S3))))
    with pytest.raises(ValueError, match="mean_abs"):
        search_scale(w, h, jnp.ones(3), S3)
    with pytest.raises(ValueError, match="max_shrink"):
        search_clip(w, h, S3, max_shrink=1.5)
    with pytest.raises(TypeError, match="IntScheme"):
        search_scale(w, h, st.mean_abs, jq.NF4Scheme())


def test_awq_model_beats_rtn():
    model = _model(outlier=[5, 40])
    win = _windows()
    params, rec = awq_model(model, win, AWQConfig(scheme=S3, n_samples=8, seq_len=32), progress=False)
    assert _all_quantized(params)
    assert len(rec) == 4 * CFG.n_layers
    assert all(r.final_loss <= r.rtn_loss * 1.0001 for r in rec)
    base = flat_params(model_params(model))
    flat = flat_params(params)
    assert not np.allclose(np.asarray(flat["layers/0/attn_norm/scale"]), np.asarray(base["layers/0/attn_norm/scale"]))
    assert _logit_err(model, params, win) < 0.8 * _logit_err(model, _rtn(model, S3), win)
    # AWQ scales followed by GPTQ instead of clip + RTN
    p2, _ = awq_model(model, win, AWQConfig(scheme=S3, n_samples=8, seq_len=32, gptq=True), progress=False)
    assert _logit_err(model, p2, win) < _logit_err(model, _rtn(model, S3), win)


# ---------------------------------------------------------------------------------------------------------
# SmoothQuant
# ---------------------------------------------------------------------------------------------------------


def test_smooth_scales_formula():
    rng = np.random.default_rng(5)
    amax = rng.uniform(0.1, 50, 16).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    s = smooth_scales(amax, w, 0.5)
    np.testing.assert_allclose(np.asarray(s), np.sqrt(amax) / np.sqrt(np.abs(w).max(1)), rtol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(amax, w, 1.5)
    with pytest.raises(ValueError, match="absmax"):
        smooth_scales(amax[:3], w)


def test_smoothquant_beats_plain_w8a8():
    model = _model(outlier=[5, 40])
    win = _windows()
    w8a8 = jq.LLMInt8Scheme(threshold=None)
    params = smoothquant_model(model, win, SmoothQuantConfig(n_samples=8, seq_len=32), progress=False)
    assert _all_quantized(params)
    assert isinstance(flat_params(params)["layers/0/mlp/down_proj/kernel"].scheme, jq.LLMInt8Scheme)
    assert _logit_err(model, params, win) < 0.5 * _logit_err(model, _rtn(model, w8a8), win)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=2.0)
    with pytest.raises(ValueError, match="groups"):
        SmoothQuantConfig(groups=("nope",))


def test_clip_search_option_is_gptq_only_and_boolean():
    from jaxquant.algorithms.specs import GPTQ_DEFAULTS, check_options

    assert GPTQ_DEFAULTS["clip_search"] is True  # on by default: better in all 4 measured rows (README)
    assert check_options("gptq-int4-g128-asym", {"clip_search": True})
    with pytest.raises(ValueError, match="clip_search must be true or false"):
        check_options("gptq-int4-g128-asym", {"clip_search": "yes"})
    with pytest.raises(ValueError, match="--clip-search"):
        check_options("awq-int4-g128-asym", {"clip_search": True})
