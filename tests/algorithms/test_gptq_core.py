"""GPTQ core: exact against a float64 NumPy transcription of the paper's algorithm, RTN as a special case,
vmap over shared and separate Hessians, dead inputs, g_idx, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gptq_reference import gptq_reference

import jaxquant as jq
from jaxquant.algorithms.gptq import split_columns
from jaxquant.algorithms.gptq_core import gptq, gptq_with_stats


def _problem(k=576, n=24, t=1200, seed=0, dead=(7,), outlier=5):
    """Correlated calibration inputs (one outlier channel, some dead ones) and a small random kernel."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((t, k)) @ a
    x[:, outlier] *= 20
    for d in dead:
        x[:, d] = 0
    w = rng.standard_normal((k, n)) * 0.05
    return w, x.T @ x


CASES = [
    # bits, group, symmetric, act_order, static_groups
    (4, 128, False, False, False),
    (4, 128, False, True, False),
    (4, 128, False, True, True),
    (3, 128, True, False, True),
    (3, None, False, True, False),
]


@pytest.mark.parametrize("bits,group,sym,act_order,static", CASES)
def test_matches_float64_reference(bits, group, sym, act_order, static):
    # K = 576 with g = 128: four full groups and a short last one of 64
    w, h = _problem()
    ref = gptq_reference(w, h, bits, group, sym, act_order=act_order, static_groups=static)
    scheme = jq.IntScheme(bits=bits, group_size=group, symmetric=sym)
    with jax.enable_x64(True):
        q, stats = gptq_with_stats(
            jnp.asarray(w, jnp.float64), jnp.asarray(h, jnp.float64), scheme, act_order=act_order, static_groups=static
        )
        w_hat = np.asarray(jq.dequantize(q))
    assert q.dtype == "float64"
    np.testing.assert_array_equal(w_hat, ref["w_hat"])  # same codes, scales and zeros
    scale = np.asarray(q.scale, np.float64).reshape(ref["scale"].shape)
    np.testing.assert_array_equal(scale, ref["scale"])
    if not sym:
        np.testing.assert_array_equal(np.asarray(q.zero, np.float64).reshape(ref["zero"].shape), ref["zero"])
    if act_order and group is not None and not static:
        np.testing.assert_array_equal(np.asarray(q.aux["g_idx"]), ref["g_idx"])
    else:
        assert "g_idx" not in q.aux
    e = w - ref["w_hat"]
    np.testing.assert_allclose(float(stats.loss), np.sum(e * (h @ e)), rtol=1e-9)
    assert float(stats.loss) < 0.6 * float(stats.rtn_loss)


def test_reference_is_block_size_independent():
    """The transcription itself: lazy batches reorder the arithmetic only (groups see updated weights)."""
    w, h = _problem(k=200, n=8)
    a = gptq_reference(w, h, 3, 48, False, block=1, act_order=True)
    b = gptq_reference(w, h, 3, 48, False, block=128, act_order=True)
    np.testing.assert_array_equal(a["codes"], b["codes"])


def test_float32_agrees_with_reference():
    w, h = _problem(seed=1)
    ref = gptq_reference(w, h, 4, 128, False, act_order=True, static_groups=True)
    q, stats = gptq_with_stats(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), jq.IntScheme(4, 128, False),
                               act_order=True, static_groups=True)  # fmt: skip
    w_hat = np.asarray(jq.dequantize(q), np.float64)
    mismatch = np.mean(np.abs(w_hat - ref["w_hat"]) > 1e-6)
    assert mismatch <= 1e-3
    e = w - ref["w_hat"]
    np.testing.assert_allclose(float(stats.loss), np.sum(e * (h @ e)), rtol=1e-3)


@pytest.mark.parametrize("sym,act_order,static", [(False, True, True), (True, False, False)])
def test_identity_hessian_is_rtn(sym, act_order, static):
    """With H = I there is nothing to compensate: GPTQ must return exactly jq.quantize's QArray."""
    w, _ = _problem(seed=2)
    w = jnp.asarray(w, jnp.float32)
    scheme = jq.IntScheme(4, 128, symmetric=sym)
    q, _ = gptq_with_stats(w, jnp.eye(576), scheme, act_order=act_order, static_groups=static)
    r = jq.quantize(w, scheme)
    np.testing.assert_array_equal(np.asarray(q.data), np.asarray(r.data))
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(r.scale))
    if not sym:
        np.testing.assert_array_equal(np.asarray(q.zero), np.asarray(r.zero))
    assert q.scale.dtype == r.scale.dtype and q.data.dtype == r.data.dtype and q.nbytes == r.nbytes


def test_vmap_shared_hessian_and_column_concat():
    """q/k/v share a Hessian: vmap over the weights, one call on the concatenation, and separate calls agree."""
    w, h = _problem(k=96, n=30, seed=3, dead=())
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    scheme = jq.IntScheme(4, 32, symmetric=False)
    parts = [w[:, :10], w[:, 10:20], w[:, 20:]]
    kw = dict(act_order=True, static_groups=False)
    single = [jq.dequantize(gptq(p, h, scheme, **kw)) for p in parts]
    stacked = jax.vmap(lambda p: gptq(p, h, scheme, **kw))(jnp.stack(parts))
    assert stacked.data.shape[0] == 3 and stacked.aux["g_idx"].shape == (3, 96)
    batched = jax.vmap(jq.dequantize)(stacked)
    cat = split_columns(gptq(w, h, scheme, **kw), [10, 10, 10])
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(single[i]))
        np.testing.assert_array_equal(np.asarray(jq.dequantize(cat[i])), np.asarray(single[i]))


def test_vmap_over_layers():
    """Independent layers of equal shape (each with its own Hessian) in one vmapped call."""
    probs = [_problem(k=64, n=12, t=200, seed=s, dead=(), outlier=s) for s in range(2)]
    ws = jnp.stack([jnp.asarray(p[0], jnp.float32) for p in probs])
    hs = jnp.stack([jnp.asarray(p[1], jnp.float32) for p in probs])
    scheme = jq.IntScheme(4, 16, symmetric=False)
    batched = jax.vmap(lambda w, h: jq.dequantize(gptq(w, h, scheme, act_order=True)))(ws, hs)
    for i in range(2):
        np.testing.assert_array_equal(
            np.asarray(batched[i]), np.asarray(jq.dequantize(gptq(ws[i], hs[i], scheme, act_order=True)))
        )


def test_jit_and_qdot():
    w, h = _problem(k=64, n=12, t=200, seed=4, dead=())
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    scheme = jq.IntScheme(4, 16, symmetric=False)
    q = jax.jit(lambda w, h: gptq(w, h, scheme, act_order=True))(w, h)
    x = jnp.ones((3, 64))
    np.testing.assert_allclose(np.asarray(jq.qdot(x, q)), np.asarray(x @ jq.dequantize(q)), rtol=1e-5, atol=1e-5)


def test_g_idx_dequantize_gathers_rows():
    """A QArray with aux["g_idx"] uses scale/zero row g_idx[k] for input row k."""
    w, h = _problem(k=64, n=12, t=200, seed=5, dead=())
    q = gptq(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), jq.IntScheme(4, 16, False), act_order=True)
    g_idx = np.asarray(q.aux["g_idx"])
    assert sorted(np.bincount(g_idx).tolist()) == [16, 16, 16, 16]
    assert not np.array_equal(g_idx, np.arange(64) // 16)  # act-order scattered the groups
    codes = np.asarray(jq.core.packing.unpack(q.data, 4, 64), np.float64)
    s = np.asarray(q.scale, np.float64)[g_idx]
    z = np.asarray(q.zero, np.float64)[g_idx]
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q), np.float64), ((codes - z) * s).astype(np.float32))


def test_dead_inputs_are_zeroed():
    w, h = _problem(k=64, n=12, t=200, seed=6, dead=(3, 40))
    q = gptq(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), jq.IntScheme(4, 16, False), act_order=True)
    w_hat = np.asarray(jq.dequantize(q))
    assert np.all(np.isfinite(w_hat))
    np.testing.assert_array_equal(w_hat[[3, 40]], 0.0)


def test_singular_hessian_retries_damping():
    x = np.random.default_rng(7).standard_normal((8, 64))  # rank 8 < 64
    h = jnp.asarray(x.T @ x, jnp.float32)
    w = jnp.asarray(np.random.default_rng(8).standard_normal((64, 12)), jnp.float32)
    q, stats = gptq_with_stats(w, h, jq.IntScheme(4, 16, False), damp=0.0, act_order=True)
    assert np.all(np.isfinite(np.asarray(jq.dequantize(q))))
    assert float(stats.damp) > 0


def test_errors():
    w = jnp.ones((32, 4))
    h = jnp.eye(32)
    s = jq.IntScheme(4, 16, False)
    with pytest.raises(TypeError, match="IntScheme"):
        gptq(w, h, jq.NF4Scheme())
    with pytest.raises(ValueError, match="tensor"):
        gptq(w, h, jq.IntScheme(4, granularity="tensor"))
    with pytest.raises(ValueError, match="minmax"):
        gptq(w, h, jq.IntScheme(4, 16, False, range="minmax"))
    with pytest.raises(ValueError, match=r"shape \(32, 32\)"):
        gptq(w, jnp.eye(31), s)
    with pytest.raises(ValueError, match="NaN"):
        gptq(w, h.at[0, 0].set(jnp.nan), s)
    with pytest.raises(ValueError, match="NaN"):
        gptq(w.at[0, 0].set(jnp.inf), h, s)
    with pytest.raises(TypeError, match="floating"):
        gptq(w, jnp.eye(32, dtype=jnp.int32), s)
    with pytest.raises(TypeError, match="floating"):
        gptq(jnp.ones((32, 4), jnp.int32), h, s)
    with pytest.raises(ValueError, match="damp"):
        gptq(w, h, s, damp=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        gptq(w, h, s, block_size=0)
    with pytest.raises(TypeError, match="act_order"):
        gptq(w, h, s, act_order=1)
    with pytest.raises(ValueError, match="2-D"):
        gptq(jnp.ones((32,)), h, s)


@pytest.mark.parametrize("act_order", [False, True])
def test_kmajor_scheme_gives_the_transposed_codes(act_order):
    """GPTQ with ``IntScheme(layout="nk")``: the same codes, stored K-major; the same weights; column splits too."""
    w, h = _problem(k=256, n=24)
    w, h = jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32)
    q_kn = gptq(w, h, jq.IntScheme(4, 64, False), act_order=act_order)
    q_nk = gptq(w, h, jq.IntScheme(4, 64, False, layout="nk"), act_order=act_order)
    np.testing.assert_array_equal(np.asarray(q_nk.data), np.asarray(q_kn.data).T)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q_nk)), np.asarray(jq.dequantize(q_kn)))
    for a, b in zip(split_columns(q_nk, [16, 8]), split_columns(q_kn, [16, 8])):
        assert a.data.shape == b.data.shape[::-1]
        np.testing.assert_array_equal(np.asarray(jq.dequantize(a)), np.asarray(jq.dequantize(b)))
