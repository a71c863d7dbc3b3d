"""fp8 training matmul: e4m3 forward, e5m2 backward, delayed scaling, against an ml_dtypes/float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxquant.qat.fp8 import Fp8TrainLinear, delayed_scale, fp8_dot

E4, E5 = 448.0, 57344.0


def _q(v, amax, fmax, dt):
    s = np.float32(amax) / np.float32(fmax)
    return np.clip(np.asarray(v, np.float32) / s, -fmax, fmax).astype(dt).astype(np.float64), float(s)


def _data(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (16, 24)) * 3
    w = jax.random.normal(k[1], (24, 8)) * 0.05
    c = jax.random.normal(k[2], (16, 8))
    return x, w, c


def test_forward_and_backward_match_the_reference_on_the_first_step():
    x, w, c = _data()
    h = jnp.zeros(4)
    y = fp8_dot(x, w, h, h, h)
    xq, sx = _q(x, np.abs(x).max(), E4, ml_dtypes.float8_e4m3fn)
    wq, sw = _q(w, np.abs(w).max(), E4, ml_dtypes.float8_e4m3fn)
    np.testing.assert_allclose(np.asarray(y), (xq @ wq) * sx * sw, rtol=1e-5, atol=1e-6)
    dx, dw, nx, nw, ng = jax.grad(lambda *a: jnp.sum(fp8_dot(*a) * c), argnums=(0, 1, 2, 3, 4))(x, w, h, h, h)
    gq, sg = _q(c, np.abs(c).max(), E5, ml_dtypes.float8_e5m2)
    np.testing.assert_allclose(np.asarray(dx), (gq @ wq.T) * sg * sw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), (xq.T @ gq) * sx * sg, rtol=1e-5, atol=1e-6)
    # the "gradients" of the histories are the updated histories: current amax pushed in front
    np.testing.assert_allclose(np.asarray(nx), [np.abs(x).max(), 0, 0, 0], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(nw), [np.abs(w).max(), 0, 0, 0], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(ng), [np.abs(c).max(), 0, 0, 0], rtol=1e-7)


def test_delayed_scaling_uses_the_history_and_saturates():
    x, w, c = _data(1)
    hx = jnp.array([0.0, 1.0, 0.5, 0.0])  # past amax 1 < current |x| max: larger values saturate at 448
    hw = jnp.array([0.2, 0.0, 0.0, 0.0])
    hg = jnp.array([0.0, 0.0, 0.0, 10.0])
    y = fp8_dot(x, w, hx, hw, hg)
    xq, sx = _q(x, 1.0, E4, ml_dtypes.float8_e4m3fn)
    wq, sw = _q(w, 0.2, E4, ml_dtypes.float8_e4m3fn)
    assert np.abs(xq).max() == E4  # saturated, not NaN
    np.testing.assert_allclose(np.asarray(y), (xq @ wq) * sx * sw, rtol=1e-5, atol=1e-6)
    dx, _, nx, _, ng = jax.grad(lambda *a: jnp.sum(fp8_dot(*a) * c), argnums=(0, 1, 2, 3, 4))(x, w, hx, hw, hg)
    gq, sg = _q(c, 10.0, E5, ml_dtypes.float8_e5m2)
    np.testing.assert_allclose(np.asarray(dx), (gq @ wq.T) * sg * sw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(nx), [np.abs(x).max(), 0.0, 1.0, 0.5], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(ng), [np.abs(c).max(), 0.0, 0.0, 0.0], rtol=1e-7)
    assert float(delayed_scale(jnp.zeros(3), jnp.float32(0.0), "e4m3")) == 1.0


def test_layer_error_bound_and_errors():
    x, w, _ = _data(2)
    layer = Fp8TrainLinear(w, history=2)
    y = np.asarray(layer(x.reshape(2, 8, 24))).reshape(16, 8)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    u = 2.0**-4  # e4m3 unit roundoff (3 mantissa bits)
    bound = (2 * u + u * u) * (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))) + 1e-6
    assert (np.abs(y - ref) <= bound).all()
    with pytest.raises(ValueError, match="history"):
        Fp8TrainLinear(w, history=0)
    with pytest.raises(ValueError, match="features"):
        layer(jnp.ones((2, 5)))
