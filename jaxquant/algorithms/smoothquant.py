"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights before W8A8.

Per-token int8 activations fail when a few input channels carry values 10-100x the others (the quantization
step of every token is set by its outlier channel). For an input ``X`` read by kernels ``W`` (stacked along
the output axis), SmoothQuant rescales each input channel ``j``::

    s_j = max_t |X_tj|^alpha / max_n |W_jn|^(1 - alpha)          (alpha = 0.5 by default)
    X W = (X diag(s)^-1) (diag(s) W)

so activations get flatter and weights (quantized per output channel, easy) absorb the range. ``1/s`` is
folded into the producer of ``X`` exactly like AWQ's scales (:func:`jaxquant.algorithms.awq.fold_scales`):
the RMSNorm weight for ``attn_in``/``mlp_in``, v_proj columns for ``o_in`` (tied across the query heads of a
kv head: the maximum over them), up_proj columns for ``down_in``. The model then runs unchanged; the smoothed
weights are quantized with a W8A8 scheme (default :class:`jaxquant.LLMInt8Scheme` with ``threshold=None``:
int8 per-output-channel weights, int8 per-token activations quantized at run time by ``qdot``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.algorithms.awq import fold_scales
from jaxquant.algorithms.gptq import calibration_windows_for
from jaxquant.calibrate import LINEARS, InputStats, run_blockwise
from jaxquant.core.api import quantize
from jaxquant.core.qarray import Scheme
from jaxquant.models.llama import Llama, LlamaConfig
from jaxquant.schemes.llm_int8 import LLMInt8Scheme

__all__ = ["W8A8", "SmoothQuantConfig", "smooth_scales", "smoothquant_block", "smoothquant_model", "tie_kv_max"]

#: int8 weights per output channel, int8 activations per token, no outlier split
W8A8 = LLMInt8Scheme(threshold=None)


def smooth_scales(
    absmax: jax.Array,
    w: jax.Array,
    alpha: float = 0.5,
    eps: float = 1e-5,
    tie: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``s_j = max|X_j|^alpha / max_n |W_jn|^(1-alpha)`` for an input of width ``K`` and kernels ``w`` (K, N).

    Channels where either maximum is below ``eps`` use ``eps`` there (a dead channel gets a finite scale).
    ``tie`` (optional) maps both per-channel maxima to shared values first (e.g. the maximum over the query
    heads of a kv head for o_proj inputs), so that the scale can be folded into a smaller producer.

    Raises:
      ValueError: shapes disagree or ``alpha`` is outside ``[0, 1]``.
    """
    absmax = jnp.asarray(absmax, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2 or absmax.shape != (w.shape[0],):
        raise ValueError(f"smooth_scales: need absmax (K,) and w (K, N), got {absmax.shape} and {w.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"smooth_scales: alpha must be in [0, 1], got {alpha!r}")
    wmax = jnp.max(jnp.abs(w), axis=1)
    if tie is not None:
        absmax, wmax = tie(absmax), tie(wmax)
    return jnp.maximum(absmax, eps) ** alpha / jnp.maximum(wmax, eps) ** (1 - alpha)


def tie_kv_max(a: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Maximum of an o_proj-input statistic over the query heads sharing a kv head, broadcast back."""
    kv, g, d = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    m = jnp.max(a.reshape(kv, g, d), axis=1, keepdims=True)
    return jnp.broadcast_to(m, (kv, g, d)).reshape(-1)


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
    """Options of :func:`smoothquant_model`.

    Attributes:
      scheme: weight scheme applied to the smoothed kernels (default: int8 W8A8 without outlier split).
      alpha: migration strength.
      groups: inputs to smooth (all four by default; the paper smooths the norm-fed ones).
      n_samples, seq_len, seed: calibration windows for the activation maxima.
      batch_size: windows per compiled call.
    """

    scheme: Scheme = W8A8
    alpha: float = 0.5
    groups: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in")
    n_samples: int = 64
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if not isinstance(self.scheme, Scheme):
            raise TypeError(f"SmoothQuantConfig.scheme must be a jaxquant Scheme, got {type(self.scheme).__name__}")
        if not (isinstance(self.alpha, int | float) and 0 <= self.alpha <= 1):
            raise ValueError(f"SmoothQuantConfig.alpha must be in [0, 1], got {self.alpha!r}")
        bad = [g for g in self.groups if g not in LINEARS]
        if bad:
            raise ValueError(f"SmoothQuantConfig.groups: unknown {bad}; valid: {list(LINEARS)}")
        for name in ("n_samples", "seq_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SmoothQuantConfig.{name} must be a positive int, got {v!r}")


def smoothquant_block(
    stats: dict[str, InputStats], block: dict[str, Any], cfg: LlamaConfig, config: SmoothQuantConfig
) -> dict[str, Any]:
    """Smooth one float block (flat dict) from its input statistics, then quantize its kernels."""
    scales = {}
    for group in config.groups:
        ws = [jnp.asarray(block[nm], jnp.float32) for nm in LINEARS[group]]
        w = ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=1)
        tie = functools.partial(tie_kv_max, cfg=cfg) if group == "o_in" else None
        scales[group] = smooth_scales(stats[group].absmax, w, config.alpha, tie=tie)
    out = fold_scales(block, scales, cfg)
    for names in LINEARS.values():
        for nm in names:
            out[nm] = quantize(out[nm], config.scheme)
    return out


def smoothquant_model(
    model: Llama, calib_tokens: Any, config: SmoothQuantConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Smooth and quantize every block of ``model`` (statistics from the float model).

    Returns a ``model_params``-style dict: quantized block kernels and rescaled norm scales.
    """
    config = SmoothQuantConfig() if config is None else config
    if not isinstance(config, SmoothQuantConfig):
        raise TypeError(f"smoothquant_model: config must be a SmoothQuantConfig, got {type(config).__name__}")
    windows = calibration_windows_for(calib_tokens, config.n_samples, config.seq_len, config.seed)
    cfg = model.config

    def block_fn(li: int, stats: dict[str, InputStats], block: dict[str, Any]) -> dict[str, Any]:
        return smoothquant_block(stats, block, cfg, config)

    return run_blockwise(
        model,
        windows,
        block_fn=block_fn,
        sequential=False,
        batch_size=config.batch_size,
        progress=progress,
        desc="smoothquant",
    )
