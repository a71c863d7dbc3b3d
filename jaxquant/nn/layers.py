"""Flax NNX quantized linear layers, drop-in replacements for ``nnx.Linear``.

Every layer keeps its quantized weight in a :class:`QWeight` variable (not an ``nnx.Param``), so optimizers
and ``nnx.grad`` over ``nnx.Param`` never touch it: a quantized base is frozen by construction (QLoRA).
Kernels follow Flax's convention, ``(in_features, out_features)``; ``y = x @ W + b``.

* :class:`QLinear` — weight-only, any scheme; the matmul is :func:`jaxquant.qdot` (kernels on GPU).
* :class:`Int8OutlierLinear` — LLM.int8() (Dettmers et al. 2022) and its two naive W8A8 baselines.
* :class:`Fp8Linear` — W8A8 fp8 with dynamic, static or delayed (amax history) activation scaling.
* :class:`BitLinear` — BitNet b1.58 inference: ternary absmean weights, int8 per-token absmax activations.
* :class:`LoRA` — a trainable low-rank update over any (quantized, frozen) base layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.core.api import quantize
from jaxquant.core.formats import fp8_dtype, fp8_max
from jaxquant.core.numerics import true_divide
from jaxquant.core.qarray import QArray, Scheme
from jaxquant.ops import qdot
from jaxquant.schemes import FP8Scheme, LLMInt8Scheme, TernaryScheme

__all__ = [
    "BitLinear",
    "Fp8Linear",
    "Int8OutlierLinear",
    "LoRA",
    "QLinear",
    "QWeight",
    "Stat",
    "linear_parts",
    "variable_value",
]


def variable_value(var: nnx.Variable) -> Any:
    """The payload of a Variable (array or QArray) across flax versions."""
    get = getattr(var, "get_value", None)
    return get() if get is not None else var.value


class QWeight(nnx.Variable):
    """A quantized (frozen) weight: a QArray that optimizers over ``nnx.Param`` do not see."""


class Stat(nnx.Variable):
    """Runtime state of a quantized layer (activation amax history, outlier statistics)."""


def linear_parts(module: Any) -> tuple[jax.Array, jax.Array | None]:
    """``(kernel, bias)`` of a linear module (``nnx.Linear`` or any module with ``.kernel`` and optional ``.bias``).

    Raises:
      TypeError: the module has no 2-D ``kernel``.
    """
    k = getattr(module, "kernel", None)
    if k is None:
        raise TypeError(f"{type(module).__name__} has no .kernel; expected an nnx.Linear-like layer")
    kernel = variable_value(k) if isinstance(k, nnx.Variable) else k
    if isinstance(kernel, QArray) or getattr(kernel, "ndim", 0) != 2:
        raise TypeError(f"{type(module).__name__}.kernel must be a float 2-D array, got {type(kernel).__name__}")
    b = getattr(module, "bias", None)
    bias = None if b is None else (variable_value(b) if isinstance(b, nnx.Variable) else b)
    return kernel, bias


def _bias_param(bias: jax.Array | None) -> nnx.Param | None:
    return None if bias is None else nnx.Param(jnp.asarray(bias))


def _add_bias(y: jax.Array, bias: nnx.Param | None) -> jax.Array:
    return y if bias is None else y + bias[...].astype(y.dtype)


class QLinear(nnx.Module):
    """Weight-only quantized linear layer: ``y = qdot(x, Q(W)) + b``.

    Args:
      kernel: float ``(in, out)`` kernel, or an already quantized QArray (e.g. a GPTQ/AWQ result).
      scheme: the scheme to quantize ``kernel`` with (ignored when ``kernel`` is a QArray).
      bias: optional float bias ``(out,)``, kept in float as a trainable ``nnx.Param``.
    """

    def __init__(self, kernel: jax.Array | QArray, scheme: Scheme | None = None, bias: jax.Array | None = None):
        if not isinstance(kernel, QArray):
            if scheme is None:
                raise ValueError("QLinear: give a scheme to quantize a float kernel, or pass a QArray")
            kernel = quantize(kernel, scheme)
        if len(kernel.shape) != 2:
            raise ValueError(f"QLinear: kernel must be 2-D (in, out), got shape {kernel.shape}")
        self.kernel = QWeight(kernel)
        self.bias = _bias_param(bias)
        self.in_features, self.out_features = kernel.shape

    @classmethod
    def from_linear(cls, module: Any, scheme: Scheme) -> QLinear:
        """Quantize an ``nnx.Linear``-like module."""
        kernel, bias = linear_parts(module)
        return cls(kernel, scheme, bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _add_bias(qdot(x, variable_value(self.kernel)), self.bias)


class Int8OutlierLinear(QLinear):
    """LLM.int8(): int8 vector-wise weights; per call, input feature dims with ``|x| > threshold`` in any row
    run in float, the rest as int8 (row absmax) x int8 (column absmax) -> int32, summed.

    ``threshold=None`` is the paper's vector-wise W8A8 baseline without the split; ``granularity="tensor"`` with
    ``threshold=None`` is the naive absmax per-tensor W8A8 baseline. With ``track_outliers=True`` the layer
    records, per call, the fraction of input feature dims flagged as outliers (``self.outlier_fraction``).
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        threshold: float | None = 6.0,
        granularity: str = "channel",
        track_outliers: bool = False,
    ):
        super().__init__(kernel, LLMInt8Scheme(threshold=threshold, granularity=granularity), bias)
        self.threshold = threshold
        self.outlier_fraction = Stat(jnp.zeros((), jnp.float32)) if track_outliers else None

    @classmethod
    def from_linear(cls, module: Any, **kw: Any) -> Int8OutlierLinear:  # type: ignore[override]
        kernel, bias = linear_parts(module)
        return cls(kernel, bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.outlier_fraction is not None and self.threshold is not None:
            flagged = jnp.max(jnp.abs(x.reshape(-1, x.shape[-1])), axis=0) > self.threshold
            self.outlier_fraction[...] = jnp.mean(flagged.astype(jnp.float32))
        return super().__call__(x)


_ACT_MODES = ("dynamic", "static", "delayed")


class Fp8Linear(nnx.Module):
    """W8A8 fp8 linear layer (Micikevicius et al. 2022; Transformer Engine's delayed scaling).

    Weights: fp8 with a per-tensor or per-output-channel float32 scale (:class:`~jaxquant.FP8Scheme`).
    Activations, ``x_q = fp8(clip(x / s_x))`` with ``s_x = amax / FMAX`` where amax is:

    * ``"dynamic"``: measured on this call (per tensor, or per token with ``act_granularity="token"``);
    * ``"static"``: a fixed value (from calibration, ``act_amax=``);
    * ``"delayed"``: the max over a history of the last ``history`` calls' amax (the current call's amax
      is pushed after use), state carried in the layer; the first call (empty history) uses its own amax.

    The product ``(x_q @ W_q) * s_x * s_w`` runs with fp8 operands where the backend has fp8 dots (GPU) and
    otherwise as an exact emulation: fp8 values are exactly representable in float32, so upcasting and a
    float32 dot computes the same products, accumulated in float32.
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        fmt: str = "e4m3",
        weight_granularity: str = "channel",
        act_mode: str = "dynamic",
        act_granularity: str = "tensor",
        act_amax: float | None = None,
        history: int = 16,
    ):
        if act_mode not in _ACT_MODES:
            raise ValueError(f"Fp8Linear: act_mode must be one of {_ACT_MODES}, got {act_mode!r}")
        if act_granularity not in ("tensor", "token"):
            raise ValueError(f"Fp8Linear: act_granularity must be 'tensor' or 'token', got {act_granularity!r}")
        if act_mode == "static" and (act_amax is None or not act_amax > 0):
            raise ValueError("Fp8Linear: act_mode='static' needs a positive act_amax (from calibration)")
        if act_mode != "dynamic" and act_granularity == "token":
            raise ValueError("Fp8Linear: per-token activation scales only exist in act_mode='dynamic'")
        if history < 1:
            raise ValueError(f"Fp8Linear: history must be >= 1, got {history}")
        fp8_dtype(fmt)
        self.kernel = QWeight(quantize(kernel, FP8Scheme(fmt, weight_granularity)))
        self.bias = _bias_param(bias)
        self.fmt, self.act_mode, self.act_granularity = fmt, act_mode, act_granularity
        self.act_amax = Stat(jnp.asarray(act_amax if act_amax is not None else 0.0, jnp.float32))
        self.amax_history = Stat(jnp.zeros((history,), jnp.float32)) if act_mode == "delayed" else None

    @classmethod
    def from_linear(cls, module: Any, **kw: Any) -> Fp8Linear:
        kernel, bias = linear_parts(module)
        return cls(kernel, bias, **kw)

    def _act_amax(self, x2: jax.Array) -> jax.Array:
        if self.act_mode == "dynamic":
            if self.act_granularity == "token":
                return jnp.max(jnp.abs(x2), axis=1, keepdims=True)
            return jnp.max(jnp.abs(x2))
        if self.act_mode == "static":
            return self.act_amax[...]
        hist = self.amax_history[...]
        cur = jnp.max(jnp.abs(x2))
        amax = jnp.where(jnp.max(hist) > 0, jnp.max(hist), cur)
        self.amax_history[...] = jnp.roll(hist, 1).at[0].set(cur)
        return amax

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).astype(jnp.float32)
        amax = self._act_amax(x2)
        fmax = fp8_max(self.fmt)
        sx = jnp.where(amax > 0, true_divide(amax, jnp.float32(fmax)), 1.0)
        xq = jnp.clip(true_divide(x2, sx), -fmax, fmax).astype(fp8_dtype(self.fmt))
        w = variable_value(self.kernel)
        if jax.default_backend() == "gpu":
            acc = jnp.dot(xq, w.data, preferred_element_type=jnp.float32)
        else:
            acc = jnp.dot(xq.astype(jnp.float32), w.data.astype(jnp.float32), preferred_element_type=jnp.float32)
        y = acc * sx * w.scale
        return _add_bias(y.reshape(*lead, -1).astype(x.dtype), self.bias)


class BitLinear(nnx.Module):
    """BitNet b1.58 inference layer (Ma et al. 2024): ``y = (Q8(x) @ T) * s_x * s_w``.

    ``T = clip(round(W / mean|W|), -1, 1)`` (:class:`~jaxquant.TernaryScheme`), activations int8 per token
    ``Q8(x) = round(x * 127 / max|x|)``; the ternary x int8 product accumulates exactly in int32.
    """

    def __init__(self, kernel: jax.Array, bias: jax.Array | None = None, *, granularity: str = "tensor"):
        self.kernel = QWeight(quantize(kernel, TernaryScheme(granularity=granularity)))
        self.bias = _bias_param(bias)

    @classmethod
    def from_linear(cls, module: Any, **kw: Any) -> BitLinear:
        kernel, bias = linear_parts(module)
        return cls(kernel, bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).astype(jnp.float32)
        amax = jnp.max(jnp.abs(x2), axis=1, keepdims=True)
        sx = jnp.where(amax > 0, true_divide(amax, jnp.float32(127.0)), 1.0)
        xq = jnp.clip(jnp.round(true_divide(x2, sx)), -127, 127).astype(jnp.int8)
        q = variable_value(self.kernel)
        t = (q.dequantize() / q.scale).round().astype(jnp.int8)  # exact: codes in {-1, 0, 1}
        acc = jnp.dot(xq, t, preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * sx * q.scale
        return _add_bias(y.reshape(*lead, -1).astype(x.dtype), self.bias)


class LoRA(nnx.Module):
    """Low-rank adapter over a frozen base layer (Hu et al. 2021; QLoRA with a quantized base):

    ``y = base(x) + (alpha / rank) * (x @ A) @ B``, ``A ~ N(0, 1/in)`` and ``B = 0`` at init, so the adapted layer
    starts equal to the base. Only ``A`` and ``B`` are ``nnx.Param``; a quantized base holds :class:`QWeight`.
    """

    def __init__(
        self,
        base: nnx.Module,
        in_features: int,
        out_features: int,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        if rank < 1:
            raise ValueError(f"LoRA: rank must be >= 1, got {rank}")
        self.base = base
        self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (in_features, rank), dtype) / jnp.sqrt(in_features))
        self.lora_b = nnx.Param(jnp.zeros((rank, out_features), dtype))
        self.scaling = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        delta = (x.astype(self.lora_a.dtype) @ self.lora_a[...]) @ self.lora_b[...]
        return self.base(x) + (self.scaling * delta).astype(x.dtype)
