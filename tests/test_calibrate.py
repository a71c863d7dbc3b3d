"""Calibration capture on a tiny random Llama: the pure block functions reproduce the model, streamed statistics
equal the ones computed from the kept activations, sequential modes feed the right inputs, errors are clear."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.calibrate import (
    GROUPS,
    LINEARS,
    InputStats,
    accumulate,
    block_forward,
    collect_stats,
    run_blockwise,
)
from jaxquant.models import Llama, LlamaConfig, flat_params, model_params, unflatten_params, with_params

CFG = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, tie_embeddings=True)


def _model(cfg=CFG, seed=0) -> Llama:
    """A random model with weights large enough that every layer matters."""
    m = Llama(cfg)
    p = flat_params(model_params(m))
    rng = np.random.default_rng(seed)
    for k, v in p.items():
        shape = np.shape(v)
        if k.endswith("kernel"):
            p[k] = jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)
        elif k.endswith("scale"):
            p[k] = jnp.asarray(1 + 0.3 * rng.standard_normal(shape), jnp.float32)
        else:
            p[k] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return with_params(m, unflatten_params(p))


def _windows(n=4, t=16, seed=1):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, t)).astype(np.int32)


def _blocks(model):
    return [flat_params(model_params(model)["layers"][i]) for i in range(model.config.n_layers)]


def _taps(model, windows):
    """Every layer's four linear inputs, computed with kept activations (the slow, obvious way)."""
    p = model_params(model)
    h = jnp.take(p["embed"]["embedding"], jnp.asarray(windows), axis=0)
    out = []
    for blk in _blocks(model):
        h, taps = block_forward(blk, h, model.config)
        out.append(taps)
    return h, out


def test_block_forward_reproduces_the_model():
    model = _model()
    win = _windows()
    h, _ = _taps(model, win)
    p = model_params(model)
    xf = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + CFG.norm_eps) * p["norm"]["scale"]
    logits = xf @ p["embed"]["embedding"].T
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(jnp.asarray(win))), rtol=2e-5, atol=2e-5)


def test_collect_stats_equals_kept_activations():
    model = _model()
    win = _windows()
    pw = np.linspace(3.0, 1.0, 16)
    stats = collect_stats(model, win, batch_size=3, position_weights=pw, progress=False)  # batches of 2
    _, taps = _taps(model, win)
    c = np.broadcast_to(pw, (4, 16)).reshape(-1)
    for li in range(2):
        for g in GROUPS:
            x = np.asarray(taps[li][g], np.float64).reshape(-1, taps[li][g].shape[-1])
            st = stats[li][g]
            np.testing.assert_allclose(np.asarray(st.xtx), (x * c[:, None]).T @ x, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.asarray(st.mean_abs), c @ np.abs(x) / c.sum(), rtol=1e-5)
            np.testing.assert_allclose(np.asarray(st.absmax), np.abs(x).max(0), rtol=1e-6)
            assert float(st.count) == 64 and float(st.weight_sum) == pytest.approx(c.sum())
            np.testing.assert_allclose(np.asarray(st.hessian), (x * c[:, None]).T @ x / c.sum(), rtol=1e-4, atol=1e-5)


def test_input_stats_merge_and_scaled():
    x = np.random.default_rng(2).standard_normal((10, 5)).astype(np.float32)
    a = accumulate(InputStats.zeros(5), jnp.asarray(x[:4]))
    b = accumulate(InputStats.zeros(5), jnp.asarray(x[4:]))
    full = accumulate(InputStats.zeros(5), jnp.asarray(x))
    m = a.merge(b)
    np.testing.assert_allclose(np.asarray(m.xtx), np.asarray(full.xtx), rtol=1e-5, atol=1e-6)
    s = np.array([1.0, 2.0, 0.5, 4.0, 1.5], np.float32)
    sc = full.scaled(jnp.asarray(s))
    direct = accumulate(InputStats.zeros(5), jnp.asarray(x / s))
    np.testing.assert_allclose(np.asarray(sc.xtx), np.asarray(direct.xtx), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sc.absmax), np.asarray(direct.absmax), rtol=1e-6)


def test_identity_callback_returns_the_same_params():
    model = _model()
    out = run_blockwise(model, _windows(), group_fn=lambda li, g, st, blk: blk, progress=False)
    want = flat_params(model_params(model))
    got = flat_params(out)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def _rtn_group(scheme, seen):
    def fn(li, g, st, blk):
        seen[(li, g)] = st
        blk = dict(blk)
        for nm in LINEARS[g]:
            blk[nm] = jq.quantize(blk[nm], scheme)
        return blk

    return fn


def test_true_sequential_sees_quantized_inputs():
    """Layer 0's o_in statistics must come from the quantized q/k/v; layer 1's inputs from quantized layer 0."""
    model = _model()
    win = _windows()
    scheme = jq.IntScheme(3, 16, symmetric=False)
    seen = {}
    out = run_blockwise(model, win, group_fn=_rtn_group(scheme, seen), progress=False)
    blk0 = _blocks(model)[0]
    part = dict(blk0)
    for nm in LINEARS["attn_in"]:
        part[nm] = jq.dequantize(jq.quantize(blk0[nm], scheme))
    h0 = jnp.take(model_params(model)["embed"]["embedding"], jnp.asarray(win), axis=0)
    _, taps = block_forward(part, h0, CFG)
    x = np.asarray(taps["o_in"]).reshape(-1, 32)
    np.testing.assert_allclose(np.asarray(seen[(0, "o_in")].xtx), x.T @ x, rtol=1e-4, atol=1e-4)
    # and the float model's o_in is different (so the test can fail)
    _, ftaps = block_forward(blk0, h0, CFG)
    xf = np.asarray(ftaps["o_in"]).reshape(-1, 32)
    assert not np.allclose(xf.T @ xf, x.T @ x, rtol=1e-3)
    # layer 1 attn_in comes from the fully quantized layer 0
    q0 = {k: jq.dequantize(v) if isinstance(v, jq.QArray) else v for k, v in flat_params(out["layers"][0]).items()}
    h1, _ = block_forward(q0, h0, CFG)
    _, t1 = block_forward(_blocks(model)[1], h1, CFG)
    x1 = np.asarray(t1["attn_in"]).reshape(-1, 32)
    np.testing.assert_allclose(np.asarray(seen[(1, "attn_in")].xtx), x1.T @ x1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sequential", [False, True])
def test_blockwise_modes(sequential):
    """sequential=False: every layer's statistics are the float model's; True (block level): layer 1 sees the
    quantized layer 0, while layer 0's o_in statistics still come from the float layer 0."""
    model = _model()
    win = _windows()
    seen = {}
    run_blockwise(model, win, group_fn=_rtn_group(jq.IntScheme(3, 16, False), seen), sequential=sequential,
                  true_sequential=False, progress=False)  # fmt: skip
    ref = collect_stats(model, win, progress=False)
    np.testing.assert_allclose(np.asarray(seen[(0, "o_in")].xtx), np.asarray(ref[0]["o_in"].xtx), rtol=1e-5)
    same = np.allclose(np.asarray(seen[(1, "attn_in")].xtx), np.asarray(ref[1]["attn_in"].xtx), rtol=1e-4)
    assert same == (not sequential)


def test_errors():
    model = _model()
    ok = _windows()
    keep = lambda li, g, st, blk: blk
    with pytest.raises(ValueError, match="exactly one"):
        run_blockwise(model, ok, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        run_blockwise(model, ok, group_fn=keep, block_fn=lambda li, s, b: b, progress=False)
    with pytest.raises(TypeError, match="Llama"):
        run_blockwise(model_params(model), ok, group_fn=keep, progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        run_blockwise(model, ok[0], group_fn=keep, progress=False)
    with pytest.raises(TypeError, match="integer"):
        run_blockwise(model, ok.astype(np.float32), group_fn=keep, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        run_blockwise(model, ok + 100, group_fn=keep, progress=False)
    with pytest.raises(ValueError, match="position_weights"):
        run_blockwise(model, ok, group_fn=keep, position_weights=np.ones(5), progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        run_blockwise(model, ok, group_fn=keep, position_weights=-np.ones(16), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        run_blockwise(model, ok, group_fn=keep, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="must return the block dict"):
        run_blockwise(model, ok, group_fn=lambda li, g, st, blk: {}, progress=False)
    with pytest.raises(ValueError, match="width"):
        accumulate(InputStats.zeros(4), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="positive int"):
        InputStats.zeros(0)
