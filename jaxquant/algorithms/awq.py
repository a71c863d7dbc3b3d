"""AWQ (Lin et al., MLSys 2024): activation-aware per-input-channel scaling, folded into the preceding op, plus
a clipping search; the result is ordinary IntScheme QArrays and a model that runs unchanged.

Scale search. Linear layers reading the same input ``x`` (q|k|v, gate|up, o, down) share one scale vector
``s`` (K,). Since ``x W = (x / s)(diag(s) W)``, quantizing ``diag(s) W`` protects the input channels with large
``s``. With ``a = mean_t |x_t|`` (per channel) the candidates are::

    s(alpha) = a^alpha / sqrt(max(a^alpha) * min(a^alpha)),      alpha in {0, 1/n, ..., (n-1)/n}   (n = 20)

and the chosen ``alpha`` minimises the calibration output error of the group's layers::

    L(alpha) = sum_layers tr(E^T H E),    E = W - diag(1/s) RTN(diag(s) W),    H = mean_t c_t x_t x_t^T

(the original measures the block output on calibration samples; ``tr(E^T H E)`` is the exact linear-output
error on the same samples, computed from the streamed Hessian without keeping activations). ``alpha = 0`` is
plain RTN, so the search never does worse than RTN on this objective.

Folding (so inference needs nothing extra), for each block:

* ``attn_in`` (q, k, v):   ``attn_norm.scale /= s``, rows of W_q, W_k, W_v ``*= s``
* ``o_in``   (o_proj):     columns of W_v ``/= s_kv``, rows of W_o ``*= s``; with grouped-query attention an
  o_proj input channel ``(head h, dim d)`` comes from v channel ``(h // G, d)``, so ``s`` is tied across
  the ``G`` query heads of a kv head (the statistic ``a`` is averaged over them)
* ``mlp_in`` (gate, up):   ``mlp_norm.scale /= s``, rows of W_gate, W_up ``*= s``
* ``down_in`` (down):      columns of W_up ``/= s``, rows of W_down ``*= s``  (``silu(g) * u`` is linear in ``u``)

Clip search. Then, per group of ``g`` input rows and output column, the range ``[lo, hi]`` is shrunk to
``[r lo, r hi]`` for ``r`` in ``{1, 1 - 1/n, ..., 1 - max_shrink}`` and the ``r`` minimising the group's own
error ``e_g^T H_gg e_g`` is kept (block-diagonal part of ``H``; the original measures the same on sampled
inputs). The weights are clipped to the chosen range and quantized by :func:`jaxquant.quantize`, so the
result is bit-for-bit an ordinary RTN QArray of the clipped, scaled weights.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.algorithms.gptq import calibration_windows_for, position_weights, split_columns
from jaxquant.algorithms.gptq_core import _params, _quant, _static_params, check_gptq_scheme, gptq_with_stats
from jaxquant.calibrate import LINEARS, InputStats, run_blockwise
from jaxquant.core.api import dequantize, quantize
from jaxquant.core.qarray import QArray
from jaxquant.models.llama import Llama, LlamaConfig
from jaxquant.schemes._grouping import group_view, num_groups
from jaxquant.schemes.rtn import IntScheme

__all__ = [
    "AWQConfig",
    "AWQRecord",
    "awq_layer",
    "awq_model",
    "fake_quant",
    "fold_scales",
    "search_clip",
    "search_scale",
    "tie_kv",
]

_HI = jax.lax.Precision.HIGHEST


def fake_quant(w: jax.Array, scheme: IntScheme) -> jax.Array:
    """``dequantize(quantize(w, scheme))`` without packing (jit/vmap friendly, same values as RTN)."""
    k = w.shape[0]
    s, z = _static_params(w, scheme)
    gid = (jnp.arange(k) // scheme.group_size) if scheme.granularity == "group" else jnp.zeros((k,), jnp.int32)
    return _quant(w, s.astype(w.dtype)[gid], z[gid], scheme)[1]


def _normalized_scale(a: jax.Array, alpha: jax.Array) -> jax.Array:
    s = jnp.maximum(a**alpha, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("scheme", "n_grid"))
def _scale_losses(w, h, a, *, scheme, n_grid):
    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def loss(alpha):
        s = _normalized_scale(a, alpha)
        e = w - fake_quant(w * s[:, None], scheme) / s[:, None]
        return jnp.sum(e * jnp.dot(h, e, precision=_HI))

    return alphas, jax.lax.map(loss, alphas)


def search_scale(
    w: jax.Array, h: jax.Array, mean_abs: jax.Array, scheme: IntScheme, *, n_grid: int = 20
) -> tuple[jax.Array, float, jax.Array]:
    """AWQ's grid search for the per-input-channel scale of a kernel (or of kernels concatenated along N).

    Args:
      w: ``(K, N)`` float kernel(s) reading the input.
      h: ``(K, K)`` Hessian ``mean c_t x_t x_t^T`` of the input.
      mean_abs: ``(K,)`` mean ``|x|`` per input channel (tie it first for GQA, see :func:`tie_kv`).
      scheme: the target IntScheme.
      n_grid: number of ``alpha`` values ``i / n_grid``.

    Returns:
      ``(s, alpha, losses)``: the best scale ``(K,)``, its ``alpha`` and ``L(alpha)`` for every grid point.
    """
    check_gptq_scheme(scheme)
    w, h, mean_abs = _check_wha(w, h, mean_abs)
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    alphas, losses = _scale_losses(w, h, mean_abs, scheme=scheme, n_grid=n_grid)
    i = int(jnp.argmin(losses))
    alpha = float(alphas[i])
    return _normalized_scale(mean_abs, jnp.float32(alpha)), alpha, losses


def _check_wha(w, h, a):
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D (K, N) kernel, got shape {tuple(w.shape)}")
    k = w.shape[0]
    h = jnp.asarray(h, jnp.float32)
    if h.shape != (k, k):
        raise ValueError(f"h must have shape ({k}, {k}), got {tuple(h.shape)}")
    a = jnp.asarray(a, jnp.float32)
    if a.shape != (k,):
        raise ValueError(f"mean_abs must have shape ({k},), got {tuple(a.shape)}")
    return w, h, a


@functools.partial(jax.jit, static_argnames=("scheme", "n_grid", "max_shrink"))
def _clip(w, h, *, scheme, n_grid, max_shrink):
    k = w.shape[0]
    g = scheme.group_size if scheme.granularity == "group" else k
    ng = num_groups(k, g)
    pad = ng * g - k
    hp = jnp.pad(h, ((0, pad), (0, pad)))  # padded rows have zero curvature: no error counted
    idx = jnp.arange(ng) * g
    hb = jax.vmap(lambda i: jax.lax.dynamic_slice(hp, (i, i), (g, g)))(idx)  # (G, g, g) diagonal blocks
    gv = group_view(w, g)  # (G, g, N)
    lo = jnp.minimum(jnp.min(gv, axis=1), 0)
    hi = jnp.maximum(jnp.max(gv, axis=1), 0)
    if scheme.symmetric:
        hi = jnp.maximum(hi, -lo)
        lo = -hi
    n_steps = round(max_shrink * n_grid)
    ratios = 1.0 - jnp.arange(n_steps + 1, dtype=jnp.float32) / n_grid

    def err(r):
        c = jnp.clip(gv, (r * lo)[:, None, :], (r * hi)[:, None, :])
        s, z = _params(c, scheme, axis=1)
        e = gv - _quant(c, s.astype(c.dtype)[:, None, :], z[:, None, :], scheme)[1]
        return jnp.einsum("gin,gij,gjn->gn", e, hb, e, precision=_HI)

    errs = jax.lax.map(err, ratios)  # (R, G, N)
    best = ratios[jnp.argmin(errs, axis=0)]  # (G, N)
    lo_r = jnp.repeat(best * lo, g, axis=0)[:k]
    hi_r = jnp.repeat(best * hi, g, axis=0)[:k]
    return jnp.clip(w, lo_r, hi_r), best


def search_clip(
    w: jax.Array, h: jax.Array, scheme: IntScheme, *, n_grid: int = 20, max_shrink: float = 0.5
) -> tuple[jax.Array, jax.Array]:
    """AWQ's clipping search: the per-(group, column) range shrink minimising ``e_g^T H_gg e_g``.

    Returns ``(w_clipped, ratios)``; ``quantize(w_clipped, scheme)`` is the clipped RTN result and ``ratios``
    ``(G, N)`` are the chosen shrink factors (1 = no clipping).
    """
    check_gptq_scheme(scheme)
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D (K, N) kernel, got shape {tuple(w.shape)}")
    k = w.shape[0]
    h = jnp.asarray(h, jnp.float32)
    if h.shape != (k, k):
        raise ValueError(f"h must have shape ({k}, {k}), got {tuple(h.shape)}")
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    if not 0 <= max_shrink < 1:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink!r}")
    return _clip(w, h, scheme=scheme, n_grid=n_grid, max_shrink=float(max_shrink))


def awq_layer(
    w: jax.Array, h: jax.Array, mean_abs: jax.Array, scheme: IntScheme, *, n_grid: int = 20, clip: bool = True
) -> tuple[QArray, jax.Array]:
    """AWQ for one stand-alone kernel: ``(QArray of diag(s) W, s)``.

    The caller must divide the layer's input by ``s`` (or fold ``1/s`` into the preceding op):
    ``x @ W ~= (x / s) @ dequantize(q)``.
    """
    s, _, _ = search_scale(w, h, mean_abs, scheme, n_grid=n_grid)
    ws = jnp.asarray(w, jnp.float32) * s[:, None]
    if clip:
        hs = jnp.asarray(h, jnp.float32) / s[:, None] / s[None, :]
        ws, _ = search_clip(ws, hs, scheme, n_grid=n_grid)
    return quantize(ws, scheme), s


def tie_kv(a: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Average an o_proj-input statistic over the query heads sharing a kv head and broadcast it back, so a
    scale derived from it can be folded into v_proj's output columns (grouped-query attention)."""
    kv, g, d = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    m = jnp.mean(jnp.asarray(a).reshape(kv, g, d), axis=1, keepdims=True)
    return jnp.broadcast_to(m, (kv, g, d)).reshape(-1)


def _kv_part(s: jax.Array, cfg: LlamaConfig) -> jax.Array:
    kv, g, d = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    return s.reshape(kv, g, d)[:, 0, :].reshape(-1)


def fold_scales(block: dict[str, Any], scales: dict[str, jax.Array], cfg: LlamaConfig) -> dict[str, Any]:
    """Apply per-input-channel scales to a float block so that it computes the same function.

    ``scales[group]`` multiplies the rows of the kernels reading that input and its inverse is folded into the
    producer (norm scale, v_proj or up_proj columns), see the module docstring. ``o_in`` scales must be tied
    across the query heads of each kv head (:func:`tie_kv`).

    Raises:
      ValueError: unknown group, wrong scale shape, or quantized kernels where a fold must write.
    """
    out = dict(block)
    widths = {"attn_in": cfg.dim, "o_in": cfg.n_heads * cfg.head_dim, "mlp_in": cfg.dim, "down_in": cfg.hidden_dim}
    producer = {"attn_in": "attn_norm/scale", "mlp_in": "mlp_norm/scale"}
    for group, s in scales.items():
        if group not in widths:
            raise ValueError(f"fold_scales: unknown input group {group!r}; expected one of {list(widths)}")
        s = jnp.asarray(s, jnp.float32)
        if s.shape != (widths[group],):
            raise ValueError(f"fold_scales: scale for {group} must have shape ({widths[group]},), got {s.shape}")
        for name in LINEARS[group]:
            _need_float(out, name)
            out[name] = out[name] * s[:, None]
        if group in producer:
            out[producer[group]] = out[producer[group]] / s
        elif group == "o_in":
            skv = _kv_part(s, cfg)
            if not bool(jnp.allclose(tie_kv(s, cfg), s, rtol=1e-6)):
                raise ValueError("fold_scales: o_in scales must be equal across the query heads of a kv head")
            _need_float(out, "attn/v_proj/kernel")
            out["attn/v_proj/kernel"] = out["attn/v_proj/kernel"] / skv[None, :]
        else:  # down_in
            _need_float(out, "mlp/up_proj/kernel")
            out["mlp/up_proj/kernel"] = out["mlp/up_proj/kernel"] / s[None, :]
    return out


def _need_float(block: dict[str, Any], name: str) -> None:
    if isinstance(block[name], QArray):
        raise ValueError(f"fold_scales: {name} is already quantized; fold scales before quantizing")


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """Options of :func:`awq_model`.

    Attributes:
      scheme: target IntScheme.
      n_samples, seq_len, seed: calibration windows.
      n_grid: ``alpha`` grid points (and clip-ratio step ``1 / n_grid``).
      max_shrink: largest clipping shrink.
      clip: run the clip search.
      groups: which inputs get a scale search (all four by default).
      sequential: calibrate block ``l`` on the quantized blocks ``< l``.
      first_token_weight: weight of position 0 in the Hessian (the attention sink, see the README).
      gptq: instead of clip + RTN, quantize the scaled weights with GPTQ (act-order, static groups).
      damp: GPTQ damping when ``gptq``.
      batch_size: windows per compiled call.
    """

    scheme: IntScheme
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    n_grid: int = 20
    max_shrink: float = 0.5
    clip: bool = True
    groups: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in")
    sequential: bool = True
    first_token_weight: float = 1.0
    gptq: bool = False
    damp: float = 0.01
    batch_size: int = 8

    def __post_init__(self):
        check_gptq_scheme(self.scheme)
        for name in ("n_samples", "seq_len", "n_grid", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AWQConfig.{name} must be a positive int, got {v!r}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"AWQConfig.max_shrink must be in [0, 1), got {self.max_shrink!r}")
        bad = [g for g in self.groups if g not in LINEARS]
        if bad:
            raise ValueError(f"AWQConfig.groups: unknown {bad}; valid: {list(LINEARS)}")
        if not (isinstance(self.first_token_weight, int | float) and self.first_token_weight >= 0):
            raise ValueError(f"AWQConfig.first_token_weight must be >= 0, got {self.first_token_weight!r}")


@dataclasses.dataclass(frozen=True)
class AWQRecord:
    """One input group of one block: chosen ``alpha``, output error at alpha = 0 (RTN) and at the best
    alpha, the error after clipping / GPTQ, and seconds."""

    layer: int
    group: str
    alpha: float
    rtn_loss: float
    scaled_loss: float
    final_loss: float
    seconds: float


def _group_kernels(block, group):
    ws = [jnp.asarray(block[nm], jnp.float32) for nm in LINEARS[group]]
    return ws, (ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=1))


@jax.jit
def _quad(w, w_hat, h):
    e = w - w_hat
    return jnp.sum(e * jnp.dot(h, e, precision=_HI))


def awq_block(
    layer: int, stats: dict[str, InputStats], block: dict[str, Any], cfg: LlamaConfig, config: AWQConfig
) -> tuple[dict[str, Any], list[AWQRecord]]:
    """AWQ of one block (float flat dict) from the statistics of its four inputs: scales are searched and
    folded group by group, then every kernel is clipped and quantized (or GPTQ-quantized)."""
    records = []
    cur = dict(block)
    hess: dict[str, jax.Array] = {}
    scales: dict[str, jax.Array] = {}
    t_group: dict[str, float] = {}
    rtn_l: dict[str, float] = {}
    alpha_g: dict[str, float] = {}
    scaled_l: dict[str, float] = {}
    for group in ("attn_in", "o_in", "mlp_in", "down_in"):
        t0 = time.perf_counter()
        st = stats[group]
        h = st.hessian
        _, w = _group_kernels(cur, group)
        rtn_l[group] = float(_quad(w, fake_quant(w, config.scheme), h))
        if group in config.groups:
            a = st.mean_abs
            if group == "o_in":
                a = tie_kv(a, cfg)
            s, alpha, losses = search_scale(w, h, a, config.scheme, n_grid=config.n_grid)
            cur = fold_scales(cur, {group: s}, cfg)
            scales[group] = s
            alpha_g[group] = alpha
            scaled_l[group] = float(jnp.min(losses))
        else:
            alpha_g[group] = 0.0
            scaled_l[group] = rtn_l[group]
        t_group[group] = time.perf_counter() - t0
    # statistics of the inputs as the rescaled block sees them
    for group in ("attn_in", "o_in", "mlp_in", "down_in"):
        st = stats[group] if group not in scales else stats[group].scaled(scales[group])
        hess[group] = st.hessian
    for group in ("attn_in", "o_in", "mlp_in", "down_in"):
        t0 = time.perf_counter()
        ws, w = _group_kernels(cur, group)
        h = hess[group]
        if config.gptq:
            q, _ = gptq_with_stats(w, h, config.scheme, damp=config.damp, act_order=True, static_groups=True)
        else:
            wc = w
            if config.clip:
                wc, _ = search_clip(w, h, config.scheme, n_grid=config.n_grid, max_shrink=config.max_shrink)
            q = quantize(wc, config.scheme)
        parts = [q] if len(ws) == 1 else split_columns(q, [x.shape[1] for x in ws])
        final = float(_quad(w, dequantize(q), h))
        for nm, p in zip(LINEARS[group], parts):
            cur[nm] = p
        records.append(
            AWQRecord(
                layer, group, alpha_g[group], rtn_l[group], scaled_l[group], final,
                t_group[group] + time.perf_counter() - t0,
            )
        )  # fmt: skip
    return cur, records


def awq_model(
    model: Llama, calib_tokens: Any, config: AWQConfig, *, progress: bool = True
) -> tuple[dict[str, Any], list[AWQRecord]]:
    """AWQ-quantize every linear layer of every block of ``model``.

    Args:
      model: float :class:`~jaxquant.models.Llama`.
      calib_tokens: 1-D calibration token stream or ready ``(n, seq_len)`` windows.
      config: :class:`AWQConfig`.
      progress: progress bar.

    Returns:
      ``(params, records)``: ``model_params``-style dict (QArrays for the block linears, rescaled norm
      scales) and one :class:`AWQRecord` per input group per block.
    """
    if not isinstance(config, AWQConfig):
        raise TypeError(f"awq_model: config must be an AWQConfig, got {type(config).__name__}")
    windows = calibration_windows_for(calib_tokens, config.n_samples, config.seq_len, config.seed)
    records: list[AWQRecord] = []
    cfg = model.config

    def block_fn(li: int, stats: dict[str, InputStats], block: dict[str, Any]) -> dict[str, Any]:
        out, rec = awq_block(li, stats, block, cfg, config)
        records.extend(rec)
        return out

    params = run_blockwise(
        model,
        windows,
        block_fn=block_fn,
        sequential=config.sequential,
        batch_size=config.batch_size,
        position_weights=position_weights(windows.shape[1], config.first_token_weight),
        progress=progress,
        desc="awq",
    )
    return params, records
