"""BitNet b1.58 training (Ma et al. 2024, "The Era of 1-bit LLMs" and its "Training Tips, Code and FAQ").

:class:`BitLinearTrain` keeps a float latent kernel (an ``nnx.Param`` the optimizer updates) and computes::

    x_n  = RMSNorm(x)                                        (parameter-free, before the activation quantizer)
    x_q  = x_n + stop_gradient(s_x Q8(x_n) - x_n)            Q8: per-token absmax int8, s_x = max|x_n| / 127
    W_q  = W   + stop_gradient(s_w T(W) - W)                 T: absmean ternary, s_w = mean|W|
    y    = x_q @ W_q (+ b)

i.e. straight-through estimators on both quantizers (the paper's ``(q(w) - w).detach()``, identity gradient
everywhere). The quantizers are the inference layer's own: :class:`~jaxquant.TernaryScheme` through
:func:`jaxquant.qat.fake_quant` (``ste="identity"``) and :func:`jaxquant.nn.layers.absmax_int8`, so
:meth:`BitLinearTrain.export` gives a :class:`jaxquant.nn.BitLinear` (2-bit packed codes, int8 x ternary ->
int32 matmul) computing the same function up to float32 summation order: the int8 codes are identical, only the
float accumulation of the QAT product differs from the exact int32 one.

Recipe knobs (:func:`bitnet_optimizer`): AdamW on the latent weights with the paper's two-stage schedule: a
higher peak learning rate than float training (BitNet small models: 1.5e-3 to 2.4e-3 vs ~4e-4), linear warm-up
and decay, and in the second half the learning rate drops (to ``stage2_lr_frac`` of its value there) while
weight decay (cosine-decayed from ``weight_decay`` in the first half) is switched off.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxquant.core.api import quantize
from jaxquant.nn.layers import BitLinear, absmax_int8, linear_parts, rms_normalize
from jaxquant.nn.swap import get_submodule, quantize_model, set_submodule
from jaxquant.qat.fake_quant import fake_quant
from jaxquant.schemes import TernaryScheme

__all__ = [
    "BLOCK_LINEARS",
    "BitLinearTrain",
    "bitnet_model",
    "bitnet_optimizer",
    "bitnet_schedules",
    "export_bitnet",
]

#: module paths of the linear layers inside the transformer blocks of :class:`jaxquant.models.Llama`
BLOCK_LINEARS = r"layers/\d+/(attn|mlp)/\w+_proj"


class BitLinearTrain(nnx.Module):
    """Training side of BitNet b1.58's BitLinear (see the module docstring); float latent ``kernel`` ``(in, out)``.

    Args:
      kernel: float ``(in_features, out_features)`` initial latent weight.
      bias: optional float bias.
      granularity: ternary scale per ``"tensor"`` (the paper) or per output ``"channel"``.
      norm_eps: epsilon of the parameter-free RMSNorm before the activation quantizer; ``None``: no norm.
      quantize_activations: ``False`` gives the weight-only ternary variant (W1.58A16).
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        granularity: str = "tensor",
        norm_eps: float | None = 1e-5,
        quantize_activations: bool = True,
    ):
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise ValueError(f"BitLinearTrain: kernel must be a float 2-D (in, out) array, got {kernel.shape}")
        if norm_eps is not None and not (math.isfinite(float(norm_eps)) and float(norm_eps) > 0):
            raise ValueError(f"BitLinearTrain: norm_eps must be None or a positive number, got {norm_eps!r}")
        self.scheme = TernaryScheme(granularity=granularity)
        self.in_features, self.out_features = kernel.shape
        self.kernel = nnx.Param(kernel)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.norm_eps = None if norm_eps is None else float(norm_eps)
        self.quantize_activations = bool(quantize_activations)

    @classmethod
    def from_linear(cls, module: Any, **kw: Any) -> BitLinearTrain:
        """From an ``nnx.Linear``-like module (its kernel becomes the latent weight)."""
        kernel, bias = linear_parts(module)
        return cls(kernel, bias, **kw)

    def quantized_input(self, x2: jax.Array) -> jax.Array:
        """The fake-quantized (normalized, int8-rounded) ``(M, K)`` input, with a straight-through gradient."""
        if self.norm_eps is not None:
            x2 = rms_normalize(x2, self.norm_eps)
        if not self.quantize_activations:
            return x2
        xq, sx = absmax_int8(x2)
        return x2 + jax.lax.stop_gradient(xq.astype(jnp.float32) * sx - x2)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BitLinearTrain: input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = self.quantized_input(x.reshape(-1, self.in_features).astype(jnp.float32))
        w = fake_quant(self.kernel[...].astype(jnp.float32), self.scheme, ste="identity")
        y = jnp.dot(x2, w, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.reshape(*lead, self.out_features).astype(x.dtype)

    def export(self, packing: str = "2bit") -> BitLinear:
        """The packed inference layer computing the same function: ternary codes 2 bits each
        (``packing="2bit"``) or 5 per byte (``"base3"``, 1.6 bits), plus float32 scale(s)."""
        if not self.quantize_activations:
            raise ValueError("BitLinearTrain.export: the weight-only variant has no BitLinear (W1.58A8) export")
        bias = None if self.bias is None else self.bias[...]
        scheme = TernaryScheme(granularity=self.scheme.granularity, packing=packing)
        q = quantize(self.kernel[...], scheme)
        return BitLinear(q, bias, norm_eps=self.norm_eps)


def bitnet_model(
    model: nnx.Module,
    targets: str = BLOCK_LINEARS,
    *,
    granularity: str = "tensor",
    norm_eps: float | None = 1e-5,
    quantize_activations: bool = True,
) -> nnx.Module:
    """A copy of ``model`` with the linear layers at module paths matching ``targets`` replaced by
    :class:`BitLinearTrain` (latent weights initialised from the current kernels). Embeddings, norms and the
    output head stay float, as in BitNet.

    Raises:
      ValueError: ``targets`` matches no linear layer.
    """
    copy = nnx.clone(model)

    def make(m: Any) -> BitLinearTrain:
        return BitLinearTrain.from_linear(
            m, granularity=granularity, norm_eps=norm_eps, quantize_activations=quantize_activations
        )

    quantize_model(copy, [(targets, make)], strict=True)
    return copy


def export_bitnet(model: nnx.Module, packing: str = "2bit") -> nnx.Module:
    """A copy of a :func:`bitnet_model` with every :class:`BitLinearTrain` frozen into a packed
    :class:`~jaxquant.nn.BitLinear` (ternary codes 2 bits each, or 1.6 with ``packing="base3"``; saveable with
    :mod:`jaxquant.io`)."""
    copy = nnx.clone(model)
    paths = [p for p, m in nnx.iter_graph(copy) if isinstance(m, BitLinearTrain)]
    if not paths:
        raise ValueError("export_bitnet: the model has no BitLinearTrain layer (build it with bitnet_model)")
    for path in paths:
        set_submodule(copy, path, get_submodule(copy, path).export(packing))
    return copy


def bitnet_schedules(
    lr: float, steps: int, *, warmup_steps: int = 0, weight_decay: float = 0.1, stage2_lr_frac: float = 0.5
) -> tuple[optax.Schedule, optax.Schedule]:
    """``(learning_rate(step), weight_decay(step))`` of the two-stage BitNet b1.58 recipe.

    Stage 1 (steps ``< steps/2``): linear warm-up to ``lr`` then linear decay towards ``lr/10`` at the end of
    training; weight decay follows a cosine from ``weight_decay`` to 0 over stage 1. Stage 2: the learning rate
    is that same linear decay times ``stage2_lr_frac`` (the paper's mid-training drop), weight decay is 0.
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"bitnet_schedules: need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    half = max(steps // 2, 1)
    warm = min(warmup_steps, max(half - 1, 0))

    def lr_fn(step):
        step = jnp.asarray(step, jnp.float32)
        up = jnp.where(warm > 0, jnp.minimum(step / max(warm, 1), 1.0), 1.0)
        frac = jnp.clip((step - warm) / max(steps - warm, 1), 0.0, 1.0)
        base = lr * up * (1.0 - 0.9 * frac)
        return jnp.where(step < half, base, base * stage2_lr_frac)

    def wd_fn(step):
        step = jnp.asarray(step, jnp.float32)
        cos = 0.5 * weight_decay * (1.0 + jnp.cos(jnp.pi * jnp.clip(step / half, 0.0, 1.0)))
        return jnp.where(step < half, cos, 0.0)

    return lr_fn, wd_fn


def _add_scheduled_decay(wd_fn: optax.Schedule) -> optax.GradientTransformation:
    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        wd = wd_fn(state.count)
        updates = jax.tree.map(lambda u, p: u + wd * p, updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def bitnet_optimizer(
    lr: float = 1.5e-3,
    steps: int = 1000,
    *,
    warmup_steps: int = 0,
    weight_decay: float = 0.1,
    stage2_lr_frac: float = 0.5,
    b1: float = 0.9,
    b2: float = 0.95,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) with the two-stage schedules of :func:`bitnet_schedules`, gradients
    clipped to global norm ``clip_norm``. ``update = -lr(t) (adam(g) + wd(t) w)``, as ``optax.adamw``."""
    lr_fn, wd_fn = bitnet_schedules(
        lr, steps, warmup_steps=warmup_steps, weight_decay=weight_decay, stage2_lr_frac=stage2_lr_frac
    )
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts += [optax.scale_by_adam(b1=b1, b2=b2), _add_scheduled_decay(wd_fn), optax.scale_by_learning_rate(lr_fn)]
    return optax.chain(*parts)
