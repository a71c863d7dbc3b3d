"""A Llama-family decoder in Flax NNX whose every linear layer goes through :func:`jaxquant.qdot`.

Architecture: token embedding -> ``n_layers`` x (RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual) -> RMSNorm -> output projection (tied to the embedding or a separate
``lm_head``). Attention is causal. Activations are computed in ``config.dtype`` (float32 by default); RMSNorm,
softmax and the returned logits are float32.

Parameters and quantization
---------------------------
Every linear kernel is an ``nnx.Param`` holding either a float ``(in_features, out_features)`` array or a
:class:`jaxquant.QArray` of that logical shape; ``nnx.split`` / ``nnx.merge`` / ``nnx.jit`` carry QArrays
unchanged (a QArray is a pytree), so a quantized model is made by swapping Param values::

    graphdef, state = nnx.split(model)
    qstate = jax.tree.map(...)                    # or jq.quantize_params(state, rules)
    qmodel = nnx.merge(graphdef, qstate)
    logits = forward(qmodel, tokens)              # jitted

or, with plain nested dicts (what loaders return and what is easiest to write rules for)::

    params = model_params(model)                  # {"embed": {"embedding": ...}, "layers": {0: {...}}, ...}
    qparams = jq.quantize_params(params, rules)   # QArrays in place of some kernels
    qmodel = with_params(model, qparams)          # or Llama.from_params(config, qparams)

Parameter paths, joined with "/" (DictKey -> key, SequenceKey -> index, GetAttrKey -> name)::

    embed/embedding                               (vocab_size, dim)   the token embedding table
    layers/{i}/attn_norm/scale                    (dim,)
    layers/{i}/attn/q_proj/kernel                 (dim, n_heads * head_dim)
    layers/{i}/attn/k_proj/kernel                 (dim, n_kv_heads * head_dim)
    layers/{i}/attn/v_proj/kernel                 (dim, n_kv_heads * head_dim)
    layers/{i}/attn/o_proj/kernel                 (n_heads * head_dim, dim)
    layers/{i}/mlp_norm/scale                     (dim,)
    layers/{i}/mlp/gate_proj/kernel               (dim, hidden_dim)
    layers/{i}/mlp/up_proj/kernel                 (dim, hidden_dim)
    layers/{i}/mlp/down_proj/kernel               (hidden_dim, dim)
    norm/scale                                    (dim,)
    lm_head/kernel                                (dim, vocab_size)   only when tie_embeddings is False

These are the paths of :func:`model_params`' dict. Paths into an ``nnx.State`` (from ``nnx.split``) end in
an extra ``/value`` (the Variable's payload), e.g. ``layers/0/attn/q_proj/kernel/value``; leaves inside a
QArray add ``/data``, ``/scale``... A rule regex such as ``r".*layers/\\d+/(attn|mlp)/\\w+_proj/kernel.*"``
matches both forms.

The embedding may also be a QArray (it is dequantized whole before the lookup and, when tied, before the
output projection); the norm scales must stay float.

RoPE conventions
----------------
``rope_style="half"`` (Hugging Face): inside each head, dimension ``i`` is rotated with ``i + head_dim/2``.
``rope_style="adjacent"`` (Meta's original code, llama.cpp / GGUF): dimensions ``2i`` and ``2i+1`` rotate
together. Both use the frequency ``rope_theta ** (-2i / head_dim)`` for pair ``i``. The two are the same model
up to a permutation of the q/k output columns inside each head; :func:`convert_rope_style` converts weights
(see :func:`permute_half_to_adjacent`). Internally an "adjacent" model de-interleaves q and k and then applies
the half-split rotation, so a GGUF-layout model and its HF-layout conversion give bit-identical logits.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.core.api import dequantize
from jaxquant.core.qarray import QArray
from jaxquant.ops import qdot

__all__ = [
    "Llama",
    "LlamaConfig",
    "apply",
    "convert_rope_style",
    "flat_params",
    "forward",
    "model_params",
    "param_path",
    "param_shapes",
    "permute_adjacent_to_half",
    "permute_half_to_adjacent",
    "unflatten_params",
    "with_params",
]

RopeStyle = Literal["adjacent", "half"]
_List = getattr(nnx, "List", list)  # nnx.List exists from flax 0.12; older NNX accepted plain lists


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder.

    Attributes:
      vocab_size: number of tokens.
      dim: model (residual stream) width.
      n_layers: number of decoder blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (grouped-query attention; must divide ``n_heads``).
      hidden_dim: SwiGLU inner width.
      norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      rope_style: ``"half"`` (HF weight layout) or ``"adjacent"`` (GGUF/llama.cpp layout).
      tie_embeddings: output projection is the transposed embedding table (no ``lm_head``).
      max_seq_len: the context length the model was trained for (informational; not enforced).
      dtype: activation/compute dtype name (``"float32"`` default, ``"bfloat16"`` allowed).
      head_dim_override: head width when it is not ``dim // n_heads`` (``None``: derived).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_style: RopeStyle = "half"
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    dtype: str = "float32"
    head_dim_override: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim_override")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_style not in ("adjacent", "half"):
            raise ValueError(f"rope_style must be 'adjacent' or 'half', got {self.rope_style!r}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating dtype name, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.head_dim_override if self.head_dim_override is not None else self.dim // self.n_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        hd = self.head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.dim * self.vocab_size
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


def _value(var: nnx.Variable) -> Any:
    """The payload of a Variable (array or QArray) across flax versions."""
    get = getattr(var, "get_value", None)
    return get() if get is not None else var.value


def _as_float(w: Any, dtype: Any) -> jax.Array:
    """Dequantize a QArray (or take a float array) and cast."""
    if isinstance(w, QArray):
        w = dequantize(w)
    return jnp.asarray(w).astype(dtype)


class Linear(nnx.Module):
    """A bias-free linear layer ``y = qdot(x, kernel)``; ``kernel`` is ``(in, out)`` float or a QArray."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, std: float = 0.02):
        shape = (in_features, out_features)
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return qdot(x, _value(self.kernel))


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32: ``x / sqrt(mean(x^2) + eps) * scale``."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * _as_float(_value(self.scale), jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table ``(vocab_size, dim)``."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.embedding = nnx.Param(std * jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32))

    def table(self, dtype: Any) -> jax.Array:
        return _as_float(_value(self.embedding), dtype)

    def __call__(self, tokens: jax.Array, dtype: Any) -> jax.Array:
        return jnp.take(self.table(dtype), tokens, axis=0)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``cos``/``sin`` of shape ``(..., T, head_dim // 2)`` for integer ``positions`` ``(..., T)``."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, style: RopeStyle) -> jax.Array:
    """Rotate ``x`` ``(B, T, H, D)`` by the angles in ``cos``/``sin`` ``(B or 1, T, D/2)``.

    ``style="half"`` pairs dimension ``i`` with ``i + D/2`` and returns that layout. ``style="adjacent"``
    pairs ``2i`` with ``2i+1``; it is computed by first de-interleaving ``x`` into the half layout (so the two
    conventions share one arithmetic path and give bit-identical attention scores) and the result is
    returned in the half layout. Attention only uses ``q . k`` products, which do not depend on the order of
    the head dimensions as long as q and k agree.
    """
    if style == "adjacent":
        x = deinterleave(x)
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    a, b = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.astype(x.dtype)


def deinterleave(x: jax.Array) -> jax.Array:
    """``[..., x0, x1, x2, x3, ...]`` -> ``[..., x0, x2, ..., x1, x3, ...]`` on the last axis."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], d // 2, 2).swapaxes(-1, -2).reshape(x.shape)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE; q/k/v/o projections through ``qdot``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        hd = c.head_dim
        self.q_proj = Linear(c.dim, c.n_heads * hd, rngs=rngs)
        self.k_proj = Linear(c.dim, c.n_kv_heads * hd, rngs=rngs)
        self.v_proj = Linear(c.dim, c.n_kv_heads * hd, rngs=rngs)
        self.o_proj = Linear(c.n_heads * hd, c.dim, rngs=rngs)
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, hd
        self.rope_style = c.rope_style

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        G = H // KV
        q = self.q_proj(x).reshape(B, T, H, D)
        k = self.k_proj(x).reshape(B, T, KV, D)
        v = self.v_proj(x).reshape(B, T, KV, D)
        q = apply_rope(q, cos, sin, self.rope_style)
        k = apply_rope(k, cos, sin, self.rope_style)
        # query head h uses kv head h // G (the Hugging Face / llama.cpp grouping)
        q = q.reshape(B, T, KV, G, D)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / np.sqrt(D))
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32).astype(x.dtype)
        return self.o_proj(out.reshape(B, T, H * D))


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = Linear(config.dim, config.hidden_dim, rngs=rngs)
        self.up_proj = Linear(config.dim, config.hidden_dim, rngs=rngs)
        self.down_proj = Linear(config.hidden_dim, config.dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """One pre-norm decoder block."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attn(self.attn_norm(h), cos, sin, mask)
        return h + self.mlp(self.mlp_norm(h))


class Llama(nnx.Module):
    """Llama-family decoder-only transformer.

    Call it with int tokens ``(B, T)`` to get float32 logits ``(B, T, vocab_size)``; use :func:`forward` for
    the jitted version. Build from weights with :meth:`from_params` (no random initialisation is done then).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.embed = Embed(config.vocab_size, config.dim, rngs=rngs)
        self.layers = _List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.dim, config.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Logits for ``tokens``.

        Args:
          tokens: int ``(B, T)`` token ids.
          positions: optional int ``(B, T)`` or ``(T,)`` positions for RoPE (default ``arange(T)``).

        Returns:
          float32 logits ``(B, T, vocab_size)``.
        """
        c = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"Llama expects tokens of shape (batch, seq), got {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        dtype = jnp.dtype(c.dtype)
        T = tokens.shape[1]
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)
        positions = jnp.asarray(positions)
        if positions.ndim == 1:
            positions = positions[None, :]
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        mask = jnp.tril(jnp.ones((T, T), dtype=bool))  # (t, s): query t sees keys s <= t
        h = self.embed(tokens, dtype)
        for block in self.layers:
            h = block(h, cos, sin, mask)
        h = self.norm(h)
        if c.tie_embeddings:
            logits = qdot(h, self.embed.table(dtype).T)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    @classmethod
    def abstract(cls, config: LlamaConfig) -> Llama:
        """A model with ``ShapeDtypeStruct`` parameters (nothing allocated); fill with :func:`with_params`."""
        return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))

    @classmethod
    def from_params(cls, config: LlamaConfig, params: Mapping[str, Any]) -> Llama:
        """Build a model from a :func:`model_params`-style nested dict (arrays or QArrays).

        Numpy arrays are moved to the default JAX device. Raises ``ValueError`` on missing/extra entries or
        shape mismatches.
        """
        return with_params(cls.abstract(config), params)


# ---------------------------------------------------------------------------------------------------------
# Parameters as plain dicts
# ---------------------------------------------------------------------------------------------------------


def _key_name(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def param_path(keypath: tuple[Any, ...]) -> str:
    """Join a JAX key path with "/" (DictKey -> key, SequenceKey -> index, GetAttrKey -> name)."""
    return "/".join(_key_name(k) for k in keypath)


def model_params(model: Llama) -> dict[str, Any]:
    """The model's parameters as a plain nested dict (layer indices are int keys); see the module doc."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def param_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{"layers/0/attn/q_proj/kernel": (dim, n_heads * head_dim), ...}`` for every parameter of a model."""
    hd = c.head_dim
    per = {
        "attn_norm/scale": (c.dim,),
        "attn/q_proj/kernel": (c.dim, c.n_heads * hd),
        "attn/k_proj/kernel": (c.dim, c.n_kv_heads * hd),
        "attn/v_proj/kernel": (c.dim, c.n_kv_heads * hd),
        "attn/o_proj/kernel": (c.n_heads * hd, c.dim),
        "mlp_norm/scale": (c.dim,),
        "mlp/gate_proj/kernel": (c.dim, c.hidden_dim),
        "mlp/up_proj/kernel": (c.dim, c.hidden_dim),
        "mlp/down_proj/kernel": (c.hidden_dim, c.dim),
    }
    out = {"embed/embedding": (c.vocab_size, c.dim), "norm/scale": (c.dim,)}
    if not c.tie_embeddings:
        out["lm_head/kernel"] = (c.dim, c.vocab_size)
    for i in range(c.n_layers):
        for k, s in per.items():
            out[f"layers/{i}/{k}"] = s
    return out


def _is_leaf(x: Any) -> bool:
    return isinstance(x, QArray)


def flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"layers/0/attn/q_proj/kernel": array_or_qarray, ...}`` from a nested params dict."""
    flat, _ = jax.tree_util.tree_flatten_with_path(dict(params), is_leaf=_is_leaf)
    return {param_path(p): v for p, v in flat}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flat_params` (all-digit path parts become int keys)."""
    out: dict[Any, Any] = {}
    for path, v in flat.items():
        parts: list[Any] = [int(p) if p.isdigit() else p for p in path.split("/")]
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def with_params(model: Llama | LlamaConfig, params: Mapping[str, Any]) -> Llama:
    """A new model with ``model``'s structure and ``params``' values (``model`` itself is not modified).

    Args:
      model: a :class:`Llama` (possibly abstract) or a :class:`LlamaConfig`.
      params: nested dict as returned by :func:`model_params`; values are arrays (numpy or JAX) or QArrays of
        the same logical shape as the model's parameters.
    """
    if isinstance(model, LlamaConfig):
        model = Llama.abstract(model)
    graphdef, state = nnx.split(model)
    want = flat_params(nnx.to_pure_dict(state))
    got = flat_params(params)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"parameter tree does not match the model: missing {missing[:8]}, unexpected {extra[:8]}")
    placed: dict[str, Any] = {}
    for path, v in got.items():
        if _shape_of(v) != _shape_of(want[path]):
            raise ValueError(f"parameter {path}: shape {_shape_of(v)} != model's {_shape_of(want[path])}")
        placed[path] = v if isinstance(v, QArray) else jnp.asarray(v)
    nnx.replace_by_pure_dict(state, unflatten_params(placed))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------------------
# Jitted forward passes
# ---------------------------------------------------------------------------------------------------------


@nnx.jit
def forward(model: Llama, tokens: jax.Array) -> jax.Array:
    """Jitted ``model(tokens)``; the model's kernels may be QArrays."""
    return model(tokens)


@functools.partial(jax.jit, static_argnums=0)
def apply(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """Pure functional, jitted forward: ``nnx.merge(graphdef, state)(tokens)``.

    ``graphdef, state = nnx.split(model)``; ``state`` may have QArrays in place of kernels.
    """
    return nnx.merge(graphdef, state)(tokens)


# ---------------------------------------------------------------------------------------------------------
# RoPE layout conversion
# ---------------------------------------------------------------------------------------------------------


def permute_half_to_adjacent(kernel: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k output columns from the HF half-split layout to the adjacent-pair (GGUF) layout.

    Inside each head of width ``d``, HF column ``s * d/2 + i`` (``s`` in {0, 1}) moves to ``2i + s``. This is
    the permutation llama.cpp's ``convert_hf_to_gguf.py`` applies to ``attn_q``/``attn_k`` (with ``n_heads``
    the kv-head count for k). ``kernel`` is ``(in_features, n_heads * d)``.
    """
    k = np.asarray(kernel)
    n_in, n_out = k.shape
    d = n_out // n_heads
    return k.reshape(n_in, n_heads, 2, d // 2).swapaxes(2, 3).reshape(n_in, n_out)


def permute_adjacent_to_half(kernel: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_half_to_adjacent`: GGUF column ``2i + s`` moves to ``s * d/2 + i``."""
    k = np.asarray(kernel)
    n_in, n_out = k.shape
    d = n_out // n_heads
    return k.reshape(n_in, n_heads, d // 2, 2).swapaxes(2, 3).reshape(n_in, n_out)


def convert_rope_style(
    params: Mapping[str, Any], config: LlamaConfig, style: RopeStyle
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Re-lay q/k kernels for another RoPE convention; the returned model computes the same logits.

    Float kernels only (a QArray's groups would not survive the column shuffle). Returns
    ``(config with rope_style=style, new params)``; other parameters are shared, not copied.
    """
    if style not in ("adjacent", "half"):
        raise ValueError(f"rope_style must be 'adjacent' or 'half', got {style!r}")
    flat = flat_params(params)
    if style == config.rope_style:
        return config, unflatten_params(flat)
    fn = permute_half_to_adjacent if style == "adjacent" else permute_adjacent_to_half
    pat = re.compile(r"layers/\d+/attn/([qk])_proj/kernel")
    out = {}
    for path, v in flat.items():
        m = pat.fullmatch(path)
        if m:
            if isinstance(v, QArray):
                raise ValueError(f"convert_rope_style: {path} is quantized; convert before quantizing")
            heads = config.n_heads if m.group(1) == "q" else config.n_kv_heads
            v = fn(np.asarray(v), heads)
        out[path] = v
    return config.replace(rope_style=style), unflatten_params(out)
