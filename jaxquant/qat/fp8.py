"""fp8 training: e4m3 forward, e5m2 gradients, delayed scaling (Micikevicius et al. 2022; Transformer Engine).

For a linear layer ``y = x @ W`` :func:`fp8_dot` computes, with ``Q_f(v, s) = f(clip(v / s, -FMAX_f, FMAX_f))``
the saturating cast of :func:`jaxquant.schemes.fp8.fp8_quantize_values`::

    forward    y  = (Q_e4m3(x, s_x) @ Q_e4m3(W, s_w)) s_x s_w
    backward   dx = (Q_e5m2(g, s_g) @ Q_e4m3(W, s_w)^T) s_g s_w      dW = (Q_e4m3(x, s_x)^T @ Q_e5m2(g, s_g)) s_x s_g

Delayed scaling: each of ``x``, ``W`` and ``g`` has an amax history of the last ``H`` steps;
``s = max(history) / FMAX`` (the current tensor's amax while the history is still all zero, i.e. the first step),
and after use the current amax is pushed into the history. Products of fp8 values are exact in float32, so on
a backend without fp8 dots (CPU) the upcast float32 matmul computes the same products (accumulated in float32).

State: the histories are :class:`Fp8Meta` variables. The backward pass returns their *updated values* as their
"gradients" (the forward cannot return state through ``custom_vjp``; the gradient amax only exists in the
backward pass), and the training step overwrites the histories with them instead of applying the optimizer
(Flax's ``OVERWRITE_WITH_GRADIENT`` convention): ``meta = grads_of_meta``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.core.formats import fp8_max
from jaxquant.core.numerics import true_divide
from jaxquant.nn.layers import linear_parts
from jaxquant.nn.swap import quantize_model
from jaxquant.schemes.fp8 import fp8_quantize_values

__all__ = ["Fp8Meta", "Fp8TrainLinear", "delayed_scale", "fp8_dot", "fp8_model"]

FWD_FMT, BWD_FMT = "e4m3", "e5m2"


class Fp8Meta(nnx.Variable):
    """An amax history of fp8 delayed scaling; updated by overwrite, never by the optimizer."""


def delayed_scale(history: jax.Array, current_amax: jax.Array, fmt: str) -> jax.Array:
    """``max(history) / FMAX`` (or ``current_amax / FMAX`` while the history is all zero; 1 if both are 0)."""
    past = jnp.max(history)
    amax = jnp.where(past > 0, past, current_amax)
    return jnp.where(amax > 0, true_divide(amax, jnp.float32(fp8_max(fmt))), jnp.float32(1.0))


def _push(history: jax.Array, amax: jax.Array) -> jax.Array:
    return jnp.roll(history, 1).at[0].set(amax.astype(history.dtype))


def _q(v: jax.Array, hist: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    amax = jnp.max(jnp.abs(v))
    s = delayed_scale(hist, amax, fmt)
    return fp8_quantize_values(v, fmt, s), s, amax


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    if jax.default_backend() == "gpu":
        return jnp.dot(a, b, preferred_element_type=jnp.float32)
    return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), preferred_element_type=jnp.float32)


@jax.custom_vjp
def fp8_dot(x2: jax.Array, w: jax.Array, x_hist: jax.Array, w_hist: jax.Array, g_hist: jax.Array) -> jax.Array:
    """``(M, K) @ (K, N)`` in fp8 with delayed scaling (see the module docstring); float32 operands, histories
    and result. Differentiating it gives ``(dx, dW, new_x_hist, new_w_hist, new_g_hist)``."""
    xq, sx, _ = _q(x2, x_hist, FWD_FMT)
    wq, sw, _ = _q(w, w_hist, FWD_FMT)
    return _mm(xq, wq) * (sx * sw)


def _fwd(x2, w, x_hist, w_hist, g_hist):
    xq, sx, ax = _q(x2, x_hist, FWD_FMT)
    wq, sw, aw = _q(w, w_hist, FWD_FMT)
    y = _mm(xq, wq) * (sx * sw)
    return y, (xq, wq, sx, sw, _push(x_hist, ax), _push(w_hist, aw), g_hist)


def _bwd(res, g):
    xq, wq, sx, sw, new_x, new_w, g_hist = res
    gq, sg, ag = _q(g.astype(jnp.float32), g_hist, BWD_FMT)
    dx = _mm(gq, wq.T) * (sg * sw)
    dw = _mm(xq.T, gq) * (sx * sg)
    return dx, dw, new_x, new_w, _push(g_hist, ag)


fp8_dot.defvjp(_fwd, _bwd)


class Fp8TrainLinear(nnx.Module):
    """A linear layer trained in fp8 (:func:`fp8_dot`): float latent ``kernel`` ``(in, out)`` (an ``nnx.Param``)
    and three :class:`Fp8Meta` amax histories of length ``history``."""

    def __init__(self, kernel: jax.Array, bias: jax.Array | None = None, *, history: int = 16):
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise ValueError(f"Fp8TrainLinear: kernel must be a float 2-D (in, out) array, got {kernel.shape}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"Fp8TrainLinear: history must be an int >= 1, got {history!r}")
        self.in_features, self.out_features = kernel.shape
        self.kernel = nnx.Param(kernel)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.x_amax_history = Fp8Meta(jnp.zeros((history,), jnp.float32))
        self.w_amax_history = Fp8Meta(jnp.zeros((history,), jnp.float32))
        self.g_amax_history = Fp8Meta(jnp.zeros((history,), jnp.float32))

    @classmethod
    def from_linear(cls, module: Any, **kw: Any) -> Fp8TrainLinear:
        kernel, bias = linear_parts(module)
        return cls(kernel, bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8TrainLinear: input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        y = fp8_dot(
            x.reshape(-1, self.in_features).astype(jnp.float32),
            self.kernel[...].astype(jnp.float32),
            self.x_amax_history[...],
            self.w_amax_history[...],
            self.g_amax_history[...],
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.reshape(*lead, self.out_features).astype(x.dtype)


def fp8_model(model: nnx.Module, targets: str = r"layers/\d+/(attn|mlp)/\w+_proj", *, history: int = 16) -> nnx.Module:
    """A copy of ``model`` whose linear layers at paths matching ``targets`` train in fp8 (:class:`Fp8TrainLinear`)."""
    copy = nnx.clone(model)
    quantize_model(copy, [(targets, lambda m: Fp8TrainLinear.from_linear(m, history=history))], strict=True)
    return copy
