"""Calibration: per-linear-input statistics from a model run, streamed, block by block.

In a Llama block every linear layer reads one of four inputs; layers reading the same input share its
statistics (and, for GPTQ, its Hessian)::

    attn_in = attn_norm(h)                     -> attn/q_proj, attn/k_proj, attn/v_proj
    o_in    = attention context (pre o_proj)   -> attn/o_proj
    mlp_in  = mlp_norm(h + o_proj(o_in))       -> mlp/gate_proj, mlp/up_proj
    down_in = silu(x W_gate) * (x W_up)        -> mlp/down_proj

For an input ``x`` of width ``K`` seen at tokens ``t`` with token weights ``c_t`` (1 unless
``position_weights`` says otherwise) the accumulated :class:`InputStats` are::

    xtx     = sum_t c_t x_t x_t^T          (K, K)   the GPTQ Hessian is H = xtx / weight_sum (up to a factor 2)
    abs_sum = sum_t c_t |x_t|              (K,)     AWQ's mean |x| = abs_sum / weight_sum
    absmax  = max_t |x_t|                  (K,)     static activation ranges (SmoothQuant, fp8/int8)
    weight_sum = sum_t c_t,   count = number of tokens

Streaming: activations are never kept for more than one block; the residual stream of all calibration
windows (``n x T x dim`` floats, 151 MB for 128 x 512 x 576) is held between blocks, as in the GPTQ reference.

Modes (:func:`run_blockwise`):

* ``sequential=False``: statistics of block ``l`` come from the float model (one float forward pass).
* ``sequential=True``: block ``l`` sees the outputs of the already-quantized blocks ``< l`` (the GPTQ paper).
  With a per-group callback it is *true sequential*: inside a block, ``o_in`` is computed with the quantized
  q/k/v, ``mlp_in`` after the quantized o_proj, ``down_in`` from the quantized gate/up — and every linear
  still runs exactly once per window (the stage outputs are cached), so the whole calibration costs one
  forward pass plus the ``X^T X`` products.

The block computations here are pure functions over a flat parameter dict (``"attn/q_proj/kernel"``, ...)
and mirror :class:`jaxquant.models.llama.Block` operation by operation (tested to give the same logits).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.api import dequantize
from jaxquant.core.qarray import QArray
from jaxquant.models.llama import Llama, LlamaConfig, apply_rope, flat_params, model_params, rope_tables
from jaxquant.ops import qdot

__all__ = [
    "GROUPS",
    "LINEARS",
    "InputStats",
    "accumulate",
    "block_forward",
    "collect_stats",
    "run_blockwise",
    "walk_blocks",
]

#: the four linear inputs of a block, in execution order
GROUPS: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in")

#: kernels (paths inside a block) that read each input
LINEARS: dict[str, tuple[str, ...]] = {
    "attn_in": ("attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel"),
    "o_in": ("attn/o_proj/kernel",),
    "mlp_in": ("mlp/gate_proj/kernel", "mlp/up_proj/kernel"),
    "down_in": ("mlp/down_proj/kernel",),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InputStats:
    """Streaming statistics of one linear input (see the module docstring for the formulas).

    Attributes:
      xtx: ``(K, K)`` weighted ``sum_t c_t x_t x_t^T`` (float32).
      abs_sum: ``(K,)`` weighted ``sum_t c_t |x_t|``.
      absmax: ``(K,)`` ``max_t |x_t|`` (unweighted).
      weight_sum: scalar ``sum_t c_t``.
      count: scalar number of tokens seen.
    """

    xtx: jax.Array
    abs_sum: jax.Array
    absmax: jax.Array
    weight_sum: jax.Array
    count: jax.Array

    @classmethod
    def zeros(cls, k: int) -> InputStats:
        """Empty statistics for an input of width ``k``."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"InputStats.zeros: k must be a positive int, got {k!r}")
        f = jnp.float32
        return cls(jnp.zeros((k, k), f), jnp.zeros((k,), f), jnp.zeros((k,), f), jnp.zeros((), f), jnp.zeros((), f))

    @property
    def hessian(self) -> jax.Array:
        """``H = xtx / weight_sum``: the (weighted) mean of ``x x^T``, GPTQ's Hessian up to a factor 2."""
        return self.xtx / jnp.maximum(self.weight_sum, 1e-30)

    @property
    def mean_abs(self) -> jax.Array:
        """Weighted mean ``|x|`` per input channel (AWQ's activation scale)."""
        return self.abs_sum / jnp.maximum(self.weight_sum, 1e-30)

    def merge(self, other: InputStats) -> InputStats:
        """Statistics of the union of two token sets."""
        return InputStats(
            self.xtx + other.xtx,
            self.abs_sum + other.abs_sum,
            jnp.maximum(self.absmax, other.absmax),
            self.weight_sum + other.weight_sum,
            self.count + other.count,
        )

    def scaled(self, s: jax.Array) -> InputStats:
        """Statistics of ``x / s`` (per-channel ``s > 0``): what the layer sees after an AWQ/SmoothQuant fold."""
        s = jnp.asarray(s, jnp.float32)
        inv = 1.0 / s
        return InputStats(
            self.xtx * inv[:, None] * inv[None, :],
            self.abs_sum * inv,
            self.absmax * inv,
            self.weight_sum,
            self.count,
        )


def accumulate(stats: InputStats, x: jax.Array, weights: jax.Array | None = None) -> InputStats:
    """Add activations ``x`` ``(..., K)`` with optional per-token ``weights`` (``x.shape[:-1]``) to ``stats``.

    ``xtx += (c * x)^T x``, ``abs_sum += c^T |x|``, ``absmax = max(absmax, max |x|)``; pure, jit-friendly.
    """
    k = x.shape[-1]
    if stats.xtx.shape != (k, k):
        raise ValueError(f"accumulate: stats are for width {stats.xtx.shape[0]}, activations have width {k}")
    x2 = x.reshape(-1, k).astype(jnp.float32)
    c = jnp.ones((x2.shape[0],), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32).reshape(-1)
    if c.shape[0] != x2.shape[0]:
        raise ValueError(f"accumulate: {c.shape[0]} weights for {x2.shape[0]} tokens")
    ax = jnp.abs(x2)
    return InputStats(
        stats.xtx + jnp.dot((x2 * c[:, None]).T, x2, precision=jax.lax.Precision.HIGHEST),
        stats.abs_sum + jnp.dot(c, ax, precision=jax.lax.Precision.HIGHEST),
        jnp.maximum(stats.absmax, jnp.max(ax, axis=0)),
        stats.weight_sum + jnp.sum(c),
        stats.count + x2.shape[0],
    )


# ---------------------------------------------------------------------------------------------------------
# a Llama block as pure stage functions over a flat parameter dict
# ---------------------------------------------------------------------------------------------------------


def _rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _rope_mask(cfg: LlamaConfig, t: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    cos, sin = rope_tables(jnp.arange(t, dtype=jnp.int32)[None, :], cfg.head_dim, cfg.rope_theta)
    return cos, sin, jnp.tril(jnp.ones((t, t), dtype=bool))


def _attn_context(p: Mapping[str, jax.Array], x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Attention output before o_proj, ``(B, T, n_heads * head_dim)`` (mirrors ``Attention.__call__``)."""
    B, T, _ = x.shape
    H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // KV
    cos, sin, mask = _rope_mask(cfg, T)
    q = qdot(x, p["attn/q_proj/kernel"]).reshape(B, T, H, D)
    k = qdot(x, p["attn/k_proj/kernel"]).reshape(B, T, KV, D)
    v = qdot(x, p["attn/v_proj/kernel"]).reshape(B, T, KV, D)
    q = apply_rope(q, cos, sin, cfg.rope_style)
    k = apply_rope(k, cos, sin, cfg.rope_style)
    q = q.reshape(B, T, KV, G, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(D))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32).astype(x.dtype)
    return out.reshape(B, T, H * D)


def _mlp_hidden(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    return jax.nn.silu(qdot(x, p["mlp/gate_proj/kernel"])) * qdot(x, p["mlp/up_proj/kernel"])


def block_forward(p: Mapping[str, jax.Array], h: jax.Array, cfg: LlamaConfig) -> tuple[jax.Array, dict[str, Any]]:
    """One decoder block as a pure function: ``(h_out, {group: activation})`` for ``h`` ``(B, T, dim)``.

    ``p`` is the block's flat parameter dict (``"attn_norm/scale"``, ``"attn/q_proj/kernel"``, ...; kernels
    float or QArray). Computes ``h + attn(attn_norm(h))`` then ``+ mlp(mlp_norm(.))`` exactly as
    :class:`jaxquant.models.llama.Block` does, returning the four linear inputs too (see :data:`GROUPS`).
    """
    x1 = _rms(h, p["attn_norm/scale"], cfg.norm_eps)
    o_in = _attn_context(p, x1, cfg)
    h2 = h + qdot(o_in, p["attn/o_proj/kernel"])
    x2 = _rms(h2, p["mlp_norm/scale"], cfg.norm_eps)
    u = _mlp_hidden(p, x2)
    out = h2 + qdot(u, p["mlp/down_proj/kernel"])
    return out, {"attn_in": x1, "o_in": o_in, "mlp_in": x2, "down_in": u}


# jitted stages (cfg is a frozen dataclass: hashable, static)
_jit = functools.partial(jax.jit, static_argnames=("cfg",))


@_jit
def _embed(table: jax.Array, tokens: jax.Array, *, cfg: LlamaConfig) -> jax.Array:
    return jnp.take(table.astype(cfg.dtype), tokens, axis=0)


@_jit
def _stage_attn_in(p, h, st, c, *, cfg):
    return accumulate(st, _rms(h, p["attn_norm/scale"], cfg.norm_eps), c)


@_jit
def _stage_o_in(p, h, st, c, *, cfg):
    o_in = _attn_context(p, _rms(h, p["attn_norm/scale"], cfg.norm_eps), cfg)
    return o_in, accumulate(st, o_in, c)


@_jit
def _stage_mlp_in(p, h, o_in, st, c, *, cfg):
    h2 = h + qdot(o_in, p["attn/o_proj/kernel"])
    return h2, accumulate(st, _rms(h2, p["mlp_norm/scale"], cfg.norm_eps), c)


@_jit
def _stage_down_in(p, h2, st, c, *, cfg):
    u = _mlp_hidden(p, _rms(h2, p["mlp_norm/scale"], cfg.norm_eps))
    return u, accumulate(st, u, c)


@_jit
def _stage_out(p, h2, u, *, cfg):
    return h2 + qdot(u, p["mlp/down_proj/kernel"])


@_jit
def _stage_all(p, h, sts, c, *, cfg):
    out, taps = block_forward(p, h, cfg)
    return out, {g: accumulate(sts[g], taps[g], c) for g in GROUPS}


@_jit
def _stage_block(p, h, *, cfg):
    return block_forward(p, h, cfg)[0]


@jax.jit
def _dequantize_all(tree):
    return jax.tree.map(lambda v: dequantize(v) if isinstance(v, QArray) else v, tree, is_leaf=_is_q)


def _is_q(x: Any) -> bool:
    return isinstance(x, QArray)


def _float_block(p: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Dequantize every QArray of a flat block dict (once per block, not per batch); arrays become jax arrays."""
    return dict(_dequantize_all({k: v if isinstance(v, QArray) else jnp.asarray(v) for k, v in p.items()}))


def _widths(cfg: LlamaConfig) -> dict[str, int]:
    return {
        "attn_in": cfg.dim,
        "o_in": cfg.n_heads * cfg.head_dim,
        "mlp_in": cfg.dim,
        "down_in": cfg.hidden_dim,
    }


GroupFn = Callable[[int, str, InputStats, dict[str, Any]], dict[str, Any]]
BlockFn = Callable[[int, dict[str, InputStats], dict[str, Any]], dict[str, Any]]


def _check_windows(windows: Any, cfg: LlamaConfig) -> np.ndarray:
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"calibration windows must be a non-empty (n, seq_len) int array, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.integer):
        raise TypeError(f"calibration windows must be integer token ids, got dtype {w.dtype}")
    if w.min() < 0 or w.max() >= cfg.vocab_size:
        raise ValueError(f"calibration token ids must be in [0, {cfg.vocab_size}), got [{w.min()}, {w.max()}]")
    return w.astype(np.int32)


def _batch_size(n: int, want: int) -> int:
    """Largest divisor of ``n`` not above ``want`` (one compiled shape for every batch)."""
    if isinstance(want, bool) or not isinstance(want, int) or want < 1:
        raise ValueError(f"batch_size must be a positive int, got {want!r}")
    return max(d for d in range(1, min(n, want) + 1) if n % d == 0)


def _position_weights(position_weights: Any, t: int, bs: int) -> jax.Array:
    if position_weights is None:
        return jnp.ones((bs, t), jnp.float32)
    pw = np.asarray(position_weights, np.float64)
    if pw.shape != (t,):
        raise ValueError(f"position_weights must have shape (seq_len,) = ({t},), got {pw.shape}")
    if not np.all(np.isfinite(pw)) or np.any(pw < 0) or not np.any(pw > 0):
        raise ValueError("position_weights must be finite, non-negative and not all zero")
    return jnp.broadcast_to(jnp.asarray(pw, jnp.float32)[None, :], (bs, t))


def run_blockwise(
    model: Llama,
    windows: Any,
    *,
    group_fn: GroupFn | None = None,
    block_fn: BlockFn | None = None,
    sequential: bool = True,
    true_sequential: bool = True,
    batch_size: int = 8,
    position_weights: Any = None,
    progress: bool = True,
    desc: str = "calibrate",
) -> dict[str, Any]:
    """Walk the blocks of ``model`` over calibration ``windows``, letting a callback rewrite each block.

    Exactly one callback:

    * ``group_fn(layer, group, stats, block) -> block``: called for each of :data:`GROUPS` in order with that
      input's :class:`InputStats`; ``block`` is the block's flat parameter dict (``"attn/q_proj/kernel"``,
      ``"attn_norm/scale"``, ...) as rewritten so far. Return it with kernels replaced (QArrays or floats) and
      possibly norm scales changed.
    * ``block_fn(layer, {group: stats}, block) -> block``: called once per block with the statistics of all
      four inputs, gathered from the float block (AWQ-style methods that fold scales across groups).

    Args:
      model: the float :class:`~jaxquant.models.Llama`.
      windows: int ``(n, seq_len)`` calibration token windows.
      group_fn, block_fn: the callback (exactly one).
      sequential: block ``l`` is calibrated on the outputs of the rewritten blocks ``< l`` (else on the
        float model's activations).
      true_sequential: with ``group_fn`` and ``sequential``, also inside a block (see the module docstring).
      batch_size: windows per compiled call (the largest divisor of ``n`` not above it is used).
      position_weights: optional ``(seq_len,)`` non-negative weight of each position in the statistics
        (e.g. a larger weight for position 0, the attention sink).
      progress: tqdm bar on stderr.
      desc: progress-bar label.

    Returns:
      ``model_params``-style nested dict with the rewritten blocks (embedding, final norm, head unchanged).

    Raises:
      ValueError / TypeError: bad windows, weights or callbacks.
    """
    if (group_fn is None) == (block_fn is None):
        raise ValueError("run_blockwise: give exactly one of group_fn= and block_fn=")
    if not isinstance(model, Llama):
        raise TypeError(f"run_blockwise: model must be a jaxquant.models.Llama, got {type(model).__name__}")
    params = model_params(model)
    new_layers: dict[int, Any] = {}

    def keep(li: int, block: dict[str, Any]) -> None:
        new_layers[li] = block

    walk_blocks(
        model.config,
        params["embed"]["embedding"],
        lambda li: flat_params(params["layers"][li]),
        windows,
        keep,
        group_fn=group_fn,
        block_fn=block_fn,
        sequential=sequential,
        true_sequential=true_sequential,
        batch_size=batch_size,
        position_weights=position_weights,
        progress=progress,
        desc=desc,
    )
    out = dict(params)
    from jaxquant.models.llama import unflatten_params

    out["layers"] = {li: unflatten_params(p) for li, p in new_layers.items()}
    return out


def walk_blocks(
    cfg: LlamaConfig,
    embedding: Any,
    get_block: Callable[[int], Mapping[str, Any]],
    windows: Any,
    on_block: Callable[[int, dict[str, Any]], None],
    *,
    group_fn: GroupFn | None = None,
    block_fn: BlockFn | None = None,
    sequential: bool = True,
    true_sequential: bool = True,
    batch_size: int = 8,
    position_weights: Any = None,
    progress: bool = True,
    desc: str = "calibrate",
    mesh: Any = None,
    data_axis: str = "data",
) -> None:
    """The engine of :func:`run_blockwise`, for models that are never whole in memory (streaming).

    ``get_block(layer)`` returns block ``layer``'s flat parameter dict (``"attn/q_proj/kernel"``, ...; arrays
    or QArrays) when it is needed, and ``on_block(layer, block)`` receives the rewritten block as soon as it
    is done (e.g. to write it to disk); nothing else of the block is kept. Only the embedding table, the
    residual stream of the calibration windows and one block's activations are held at any time. The other
    arguments are :func:`run_blockwise`'s.

    ``mesh`` (a :class:`jax.sharding.Mesh`): data-parallel calibration. Every batch of windows is split over
    the mesh axis ``data_axis`` (``batch_size`` must be divisible by its size); the jitted stages then run
    SPMD and XLA turns each ``X^T X`` into per-device products plus an all-reduce, so every device holds
    ``1 / size`` of the activations. The statistics equal the single-device ones up to float32 summation order.
    """
    if (group_fn is None) == (block_fn is None):
        raise ValueError("run_blockwise: give exactly one of group_fn= and block_fn=")
    win = _check_windows(windows, cfg)
    n, t = win.shape
    bs = _batch_size(n, batch_size)
    cw = _position_weights(position_weights, t, bs)
    emb = dequantize(embedding) if isinstance(embedding, QArray) else jnp.asarray(embedding)
    hs = [_embed(emb, jnp.asarray(win[i : i + bs]), cfg=cfg) for i in range(0, n, bs)]
    del emb
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        size = int(mesh.shape[data_axis]) if data_axis in mesh.shape else 1
        if bs % size:
            raise ValueError(
                f"data-parallel calibration: batches of {bs} windows do not split over mesh axis {data_axis!r} "
                f"(size {size})"
            )
        d = data_axis if data_axis in mesh.shape else None  # no data axis: activations replicated
        hs = [jax.device_put(h, NamedSharding(mesh, P(d, None, None))) for h in hs]
        cw = jax.device_put(cw, NamedSharding(mesh, P(d, None)))
    widths = _widths(cfg)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.n_layers, unit="block", desc=desc, disable=not progress, file=sys.stderr)
    try:
        for li in range(cfg.n_layers):
            fp = _float_block(dict(get_block(li)))
            cur = dict(fp)
            gfn = None if group_fn is None else _checked(group_fn, fp)
            if gfn is not None and sequential and true_sequential:
                hs, cur = _true_sequential_block(li, hs, cur, gfn, cw, widths, cfg)
            else:
                sts = {g: InputStats.zeros(widths[g]) for g in GROUPS}
                outs = []
                for h in hs:
                    o, sts = _stage_all(fp, h, sts, cw, cfg=cfg)
                    outs.append(o)
                if block_fn is not None:
                    cur = block_fn(li, sts, cur)
                    _check_block(cur, fp, li)
                else:
                    for g in GROUPS:
                        cur = gfn(li, g, sts[g], cur)
                if sequential:
                    rp = _float_block(cur)
                    hs = [_stage_block(rp, h, cfg=cfg) for h in hs]
                else:
                    hs = outs
                del outs
            del fp
            on_block(li, cur)
            del cur
            bar.update(1)
    finally:
        bar.close()


def _checked(fn: GroupFn, ref: Mapping[str, Any]) -> GroupFn:
    """``fn`` with its result validated (a wrong block dict fails here, not deep inside a stage)."""

    def call(li: int, group: str, st: InputStats, block: dict[str, Any]) -> dict[str, Any]:
        out = fn(li, group, st, block)
        _check_block(out, ref, li)
        return out

    return call


def _check_block(cur: Any, ref: Mapping[str, Any], li: int) -> None:
    if not isinstance(cur, dict) or set(cur) != set(ref):
        got = sorted(cur) if isinstance(cur, dict) else type(cur).__name__
        raise ValueError(
            f"calibration callback for layer {li} must return the block dict with keys {sorted(ref)}, got {got}"
        )


def _true_sequential_block(li, hs, cur, group_fn, cw, widths, cfg):
    st = InputStats.zeros(widths["attn_in"])
    for h in hs:
        st = _stage_attn_in(cur, h, st, cw, cfg=cfg)
    cur = group_fn(li, "attn_in", st, cur)
    rp = _float_block(cur)
    st = InputStats.zeros(widths["o_in"])
    o = []
    for h in hs:
        oi, st = _stage_o_in(rp, h, st, cw, cfg=cfg)
        o.append(oi)
    cur = group_fn(li, "o_in", st, cur)
    rp = _float_block(cur)
    st = InputStats.zeros(widths["mlp_in"])
    h2 = []
    for h, oi in zip(hs, o):
        h2i, st = _stage_mlp_in(rp, h, oi, st, cw, cfg=cfg)
        h2.append(h2i)
    del o
    cur = group_fn(li, "mlp_in", st, cur)
    rp = _float_block(cur)
    st = InputStats.zeros(widths["down_in"])
    u = []
    for h2i in h2:
        ui, st = _stage_down_in(rp, h2i, st, cw, cfg=cfg)
        u.append(ui)
    cur = group_fn(li, "down_in", st, cur)
    rp = _float_block(cur)
    hs = [_stage_out(rp, h2i, ui, cfg=cfg) for h2i, ui in zip(h2, u)]
    return hs, cur


def collect_stats(
    model: Llama,
    windows: Any,
    *,
    batch_size: int = 8,
    position_weights: Any = None,
    progress: bool = True,
) -> dict[int, dict[str, InputStats]]:
    """Statistics of every linear input of every block from one float forward pass.

    Returns ``{layer: {group: InputStats}}`` with groups :data:`GROUPS` (layers reading each input:
    :data:`LINEARS`). Same arguments as :func:`run_blockwise`.
    """
    out: dict[int, dict[str, InputStats]] = {}

    def keep(li: int, sts: dict[str, InputStats], block: dict[str, Any]) -> dict[str, Any]:
        out[li] = sts
        return block

    run_blockwise(
        model,
        windows,
        block_fn=keep,
        sequential=False,
        batch_size=batch_size,
        position_weights=position_weights,
        progress=progress,
        desc="statistics",
    )
    return out
