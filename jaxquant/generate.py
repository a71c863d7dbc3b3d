"""Text generation for the Llama model: prefill + KV-cache decoding, compiled once per shape.

::

    from jaxquant.generate import generate
    out = generate(model, [tok.encode("The capital of France is")], max_new_tokens=32, eos_id=tok.eos_id)
    print(tok.decode(out.sequences()[0]))

How it works
------------
A whole generation is **one** ``jax.jit`` program: the prompt batch is run through the model once (prefill),
writing every layer's keys and values into a fixed-size cache of ``prompt_len + max_new_tokens`` slots, and a
``lax.while_loop`` then runs one decode step per new token (one token per row, attention over the cache),
sampling each next token on the device. Nothing is recompiled per token; a new compile happens only for a new
``(batch, prompt_len, max_new_tokens)`` shape, a new model structure (e.g. another quantization scheme) or a
new static option (``kv_quant``, greedy vs sampled, ``dequant_in_loop``). The loop stops early when every row has
produced an end-of-sequence token.

Every linear layer is called through the model's own modules, i.e. through :func:`jaxquant.qdot`, so the same
code runs every quantization scheme (QArray kernels; fused Pallas kernels picked automatically on a GPU).

Where ``qdot`` takes the XLA path (dequantize, then a float matmul: CPU, or schemes without a GPU kernel),
the dequantized weights are loop-invariant and XLA hoists them out of the decode loop: they are computed once
per generation and a float copy of the weights lives through the loop. With kernels (GPU) the weights are read
packed at every step and nothing is hoisted. ``dequant_in_loop=True`` puts an ``optimization_barrier`` on the
weights inside the loop so that every step dequantizes again. Measured on XLA:CPU (SmolLM2, batch 1) that is
1.2-1.8x slower per step and lowers the program's peak memory only for some schemes (NF4: 979 -> 570 MiB;
int8: 620 MiB either way), because XLA:CPU's scheduler computes all of a step's dequantizations up front
(``benchmarks/decode.py --dequant-in-loop``; its "XLA peak" column shows the effect).

Batches of prompts of different lengths are **left-padded** to a common length ``T``: row ``b`` has ``pad[b]``
pad tokens in front. Cache slot ``s`` is the same column for every row; row ``b``'s real tokens get RoPE
positions ``0, 1, ...`` (slot minus ``pad[b]``) and its queries never attend to slots ``s < pad[b]``, so a
padded row computes the same function as the same prompt alone (up to floating-point summation order over
the masked slots, whose softmax weights are exactly zero). Exception: schemes whose matmul depends on the other
rows of a call, such as LLM.int8 (its float "outlier" feature columns are chosen over all tokens of the call,
pad tokens included, as in bitsandbytes), give slightly different results in a different batch or between
prefill and decode. Layer-swapping SPECs (:mod:`jaxquant.nn` layers) run too; state those layers update in a
forward pass (fp8 delayed scaling's amax history) is not updated during generation.

KV-cache quantization (``kv_quant``)
------------------------------------
``"int8"``: each cached key/value vector (one token, one kv head: ``head_dim`` numbers) is stored as int8 codes
with its own float32 scale ``absmax / 127`` (symmetric, round to nearest). ``"fp8"``: float8 e4m3 codes with
scale ``absmax / 448`` (saturating). A scale per (token, kv head) needs no calibration and costs
``32 / head_dim`` extra bits per value. Attention then uses the stored codes: ``q . k = (q . codes) * scale``
and ``sum_s p_s v_s = sum_s (p_s * scale_s) codes_s``. The prompt's own attention in the prefill uses the
quantized keys/values too, so prefill and decode see identical keys and the incremental result equals a
full-sequence pass with the same quantization (:func:`cached_forward`). Quantizing the cache halves (int8,
fp8 vs bf16) or quarters (vs fp32) its memory; without a fused attention kernel it does not speed decoding up.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.llama import Llama, LlamaConfig, apply_rope, rope_tables
from jaxquant.ops import qdot

__all__ = [
    "KV_QUANT",
    "MAX_EOS_IDS",
    "GenerationOutput",
    "KVCache",
    "cached_forward",
    "decode_step",
    "generate",
    "generate_tokens",
    "init_cache",
    "left_pad",
    "prefill",
    "quantize_kv",
    "sample_logits",
]

KVQuant = Literal["int8", "fp8"] | None
#: the accepted ``kv_quant`` values (``None``: cache in the model's compute dtype)
KV_QUANT: tuple[str | None, ...] = (None, "int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}
_CODE_DTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
#: how many distinct end-of-sequence ids one generation accepts
MAX_EOS_IDS = 8


def _check_kv_quant(kv_quant: Any) -> str | None:
    if kv_quant in ("none", ""):
        kv_quant = None
    if kv_quant not in KV_QUANT:
        raise ValueError(f"kv_quant must be one of None, 'int8', 'fp8', got {kv_quant!r}")
    return kv_quant


# ---------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "k_scale", "v_scale"], meta_fields=["quant"]
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for ``length`` slots (a pytree; ``quant`` is static).

    Attributes:
      k, v: one array per layer, ``(batch, length, n_kv_heads, head_dim)``: the model's compute dtype, or the
        int8 / float8_e4m3fn codes when ``quant`` is set. Keys are stored after RoPE.
      k_scale, v_scale: one float32 ``(batch, length, n_kv_heads)`` array per layer when quantized, else ``()``.
      quant: ``None``, ``"int8"`` or ``"fp8"``.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    k_scale: tuple[jax.Array, ...]
    v_scale: tuple[jax.Array, ...]
    quant: str | None = None

    @property
    def batch(self) -> int:
        return int(self.k[0].shape[0])

    @property
    def length(self) -> int:
        """Number of slots."""
        return int(self.k[0].shape[1])

    @property
    def nbytes(self) -> int:
        """Storage bytes of all layers (codes and scales)."""
        return int(sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self)))


def init_cache(config: LlamaConfig, batch: int, length: int, kv_quant: KVQuant = None, dtype: Any = None) -> KVCache:
    """An all-zero cache of ``length`` slots for ``batch`` rows.

    Args:
      config: the model's config (layers, kv heads, head width, compute dtype).
      batch: rows.
      length: slots (prompt length + new tokens for :func:`generate_tokens`).
      kv_quant: ``None``, ``"int8"`` or ``"fp8"`` (see the module docstring).
      dtype: dtype of an unquantized cache (default: ``config.dtype``, what the keys are computed in).
    """
    kv_quant = _check_kv_quant(kv_quant)
    if batch < 1 or length < 1:
        raise ValueError(f"init_cache: batch and length must be positive, got batch={batch}, length={length}")
    shape = (batch, length, config.n_kv_heads, config.head_dim)
    if kv_quant is None:
        dt = jnp.dtype(dtype if dtype is not None else config.dtype)
        zeros = tuple(jnp.zeros(shape, dt) for _ in range(config.n_layers))
        return KVCache(zeros, tuple(jnp.zeros(shape, dt) for _ in range(config.n_layers)), (), (), None)
    code = _CODE_DTYPE[kv_quant]
    k = tuple(jnp.zeros(shape, code) for _ in range(config.n_layers))
    v = tuple(jnp.zeros(shape, code) for _ in range(config.n_layers))
    ks = tuple(jnp.ones(shape[:3], jnp.float32) for _ in range(config.n_layers))
    vs = tuple(jnp.ones(shape[:3], jnp.float32) for _ in range(config.n_layers))
    return KVCache(k, v, ks, vs, kv_quant)


def quantize_kv(x: jax.Array, kv_quant: str) -> tuple[jax.Array, jax.Array]:
    """Codes and float32 scales of ``x`` ``(..., head_dim)``, one scale per vector (absmax over the last axis).

    int8: ``round(x / s)`` clipped to [-127, 127], ``s = absmax / 127``; fp8: ``x / s`` cast (saturated) to
    float8_e4m3fn, ``s = absmax / 448``. An all-zero vector gets scale 1 (codes 0). NaN propagates.
    """
    qmax = _QMAX[kv_quant]
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / qmax, jnp.ones_like(amax))
    y = jnp.clip(xf / scale[..., None], -qmax, qmax)
    if kv_quant == "int8":
        y = jnp.round(y)
    return y.astype(_CODE_DTYPE[kv_quant]), scale


# ---------------------------------------------------------------------------------------------------------
# The cache-aware forward pass
# ---------------------------------------------------------------------------------------------------------


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, k_scale: jax.Array | None, v_scale: jax.Array | None, mask: jax.Array
) -> jax.Array:
    """Grouped-query attention of ``q`` ``(B, T, KV, G, D)`` over ``k``/``v`` ``(B, S, KV, D)``.

    ``mask`` ``(B, T, S)``: True where query ``t`` may see key ``s``. Without scales this is exactly the
    arithmetic of :class:`jaxquant.models.llama.Attention`; with scales (quantized cache) ``k``/``v`` are codes
    and the scales are applied to the scores and the probabilities. Returns ``(B, T, KV, G, D)`` in q's dtype.
    """
    D = q.shape[-1]
    m = mask[:, None, None, :, :]
    if k_scale is None:
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / np.sqrt(D))
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    ks = jnp.transpose(k_scale, (0, 2, 1))[:, :, None, None, :]  # (B, KV, 1, 1, S)
    scores = scores * ks * (1.0 / np.sqrt(D))
    scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    vs = jnp.transpose(v_scale, (0, 2, 1))[:, :, None, None, :]
    pv = (probs * vs).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", pv, v.astype(q.dtype), preferred_element_type=jnp.float32).astype(q.dtype)


def _write(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """``buf[:, start:start+T] = new`` (``start`` may be traced)."""
    idx = (jnp.int32(0), start.astype(jnp.int32)) + (jnp.int32(0),) * (buf.ndim - 2)
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), idx)


def _layer_attention(
    attn: Any,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    cache: KVCache,
    i: int,
    start: jax.Array,
    mask: jax.Array,
    attend_cache: bool,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One attention layer; writes this call's keys/values at slots ``start ..`` of layer ``i``'s cache.

    ``attend_cache=False`` (prefill): queries attend to this call's own keys (``mask`` ``(B, T, T)``);
    ``True`` (decode): to the whole cache after the write (``mask`` ``(B, T, S)``).
    """
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).reshape(B, T, H, D)
    k = attn.k_proj(x).reshape(B, T, KV, D)
    v = attn.v_proj(x).reshape(B, T, KV, D)
    q = apply_rope(q, cos, sin, attn.rope_style)
    k = apply_rope(k, cos, sin, attn.rope_style)
    if cache.quant is None:
        kc, vc, ks, vs = k.astype(cache.k[i].dtype), v.astype(cache.v[i].dtype), None, None
        new = (_write(cache.k[i], kc, start), _write(cache.v[i], vc, start))
    else:
        kc, ks = quantize_kv(k, cache.quant)
        vc, vs = quantize_kv(v, cache.quant)
        new = (
            _write(cache.k[i], kc, start),
            _write(cache.v[i], vc, start),
            _write(cache.k_scale[i], ks, start),
            _write(cache.v_scale[i], vs, start),
        )
    if attend_cache:
        kc, vc = new[0], new[1]
        ks, vs = (new[2], new[3]) if cache.quant is not None else (None, None)
    out = _attend(q.reshape(B, T, KV, H // KV, D), kc, vc, ks, vs, mask)
    return attn.o_proj(out.reshape(B, T, H * D)), new


def _run(
    model: Llama,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    start: jax.Array,
    mask: jax.Array,
    attend_cache: bool,
    last_only: bool,
) -> tuple[jax.Array, KVCache]:
    """Embed, all blocks with the cache, final norm and head; logits float32 ``(B, T or 1, V)``."""
    c = model.config
    dtype = jnp.dtype(c.dtype)
    cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
    h = model.embed(tokens, dtype)
    layers: list[tuple[jax.Array, ...]] = []
    for i, block in enumerate(model.layers):
        a, new = _layer_attention(block.attn, block.attn_norm(h), cos, sin, cache, i, start, mask, attend_cache)
        layers.append(new)
        h = h + a
        h = h + block.mlp(block.mlp_norm(h))
    if last_only:
        h = h[:, -1:]
    h = model.norm(h)
    logits = qdot(h, model.embed.table(dtype).T) if c.tie_embeddings else model.lm_head(h)
    quant = cache.quant
    new_cache = KVCache(
        tuple(t[0] for t in layers),
        tuple(t[1] for t in layers),
        tuple(t[2] for t in layers) if quant else (),
        tuple(t[3] for t in layers) if quant else (),
        quant,
    )
    return logits.astype(jnp.float32), new_cache


def _prefill(
    model: Llama, tokens: jax.Array, pad: jax.Array, cache: KVCache, last_only: bool
) -> tuple[jax.Array, KVCache]:
    T = tokens.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    positions = jnp.maximum(t[None, :] - pad[:, None], 0)
    mask = (t[None, None, :] <= t[None, :, None]) & (t[None, None, :] >= pad[:, None, None])  # (B, T, T)
    return _run(model, tokens, positions, cache, jnp.int32(0), mask, False, last_only)


def _decode(
    model: Llama, token: jax.Array, pad: jax.Array, cache: KVCache, slot: jax.Array
) -> tuple[jax.Array, KVCache]:
    s = jnp.arange(cache.length, dtype=jnp.int32)
    positions = (slot - pad)[:, None]
    mask = ((s[None, :] <= slot) & (s[None, :] >= pad[:, None]))[:, None, :]  # (B, 1, S)
    logits, cache = _run(model, token[:, None], positions, cache, slot, mask, True, True)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "last_only"))
def _prefill_jit(graphdef, state, tokens, pad, cache, *, last_only):
    return _prefill(nnx.merge(graphdef, state), tokens, pad, cache, last_only)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_jit(graphdef, state, token, pad, cache, slot):
    return _decode(nnx.merge(graphdef, state), token, pad, cache, slot)


def _as_pad(pad: Any, batch: int) -> jax.Array:
    if pad is None:
        return jnp.zeros((batch,), jnp.int32)
    pad = jnp.asarray(pad, jnp.int32)
    if pad.shape != (batch,):
        raise ValueError(f"pad must have shape ({batch},) (one left-pad count per row), got {tuple(pad.shape)}")
    return pad


def _check_tokens(tokens: Any, vocab_size: int | None = None) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must have shape (batch, seq) with both >= 1, got {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integers, got {tokens.dtype}")
    return tokens.astype(jnp.int32)


def prefill(
    model: Llama, tokens: Any, cache: KVCache, pad: Any = None, *, all_logits: bool = False
) -> tuple[jax.Array, KVCache]:
    """Run a left-padded prompt batch and fill cache slots ``0 .. T-1`` (jitted).

    Args:
      model: a :class:`Llama` (kernels may be QArrays).
      tokens: int ``(B, T)``; row ``b`` starts with ``pad[b]`` pad tokens (any id).
      cache: from :func:`init_cache` with ``length >= T``.
      pad: int ``(B,)`` left-pad counts (default: no padding).
      all_logits: return logits for every position ``(B, T, V)`` instead of the last one only ``(B, V)``.

    Returns:
      ``(float32 logits, updated cache)``.
    """
    tokens = _check_tokens(tokens)
    if cache.length < tokens.shape[1] or cache.batch != tokens.shape[0]:
        raise ValueError(f"cache (batch {cache.batch}, {cache.length} slots) does not fit tokens {tokens.shape}")
    graphdef, state = nnx.split(model)
    logits, cache = _prefill_jit(
        graphdef, state, tokens, _as_pad(pad, tokens.shape[0]), cache, last_only=not all_logits
    )
    return (logits if all_logits else logits[:, 0]), cache


def decode_step(model: Llama, token: Any, cache: KVCache, slot: int, pad: Any = None) -> tuple[jax.Array, KVCache]:
    """One decode step (jitted): feed ``token`` ``(B,)`` at cache slot ``slot``; returns ``(logits (B, V), cache)``.

    The token's position in row ``b`` is ``slot - pad[b]``; it attends to slots ``pad[b] .. slot``.
    """
    token = jnp.asarray(token, jnp.int32)
    if token.shape != (cache.batch,):
        raise ValueError(f"token must have shape ({cache.batch},), got {tuple(token.shape)}")
    if not 0 <= int(slot) < cache.length:
        raise ValueError(f"slot {slot} is outside the cache (0 .. {cache.length - 1})")
    graphdef, state = nnx.split(model)
    return _decode_jit(graphdef, state, token, _as_pad(pad, cache.batch), cache, jnp.int32(slot))


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_quant"))
def _cached_forward_jit(graphdef, state, tokens, pad, *, kv_quant):
    model = nnx.merge(graphdef, state)
    B, T = tokens.shape
    cache = init_cache(model.config, B, T, kv_quant)
    return _prefill(model, tokens, pad, cache, False)[0]


def cached_forward(model: Llama, tokens: Any, pad: Any = None, kv_quant: KVQuant = None) -> jax.Array:
    """Full-sequence logits ``(B, T, V)`` computed the way generation computes them (jitted).

    With ``kv_quant`` the attention uses quantized keys/values, so this measures the cache quantization's
    effect on perplexity; with ``kv_quant=None`` it equals :func:`jaxquant.models.forward` up to rounding.
    """
    tokens = _check_tokens(tokens)
    graphdef, state = nnx.split(model)
    return _cached_forward_jit(
        graphdef, state, tokens, _as_pad(pad, tokens.shape[0]), kv_quant=_check_kv_quant(kv_quant)
    )


# ---------------------------------------------------------------------------------------------------------
# Sampling and the generation loop
# ---------------------------------------------------------------------------------------------------------


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    temperature: Any = 1.0,
    top_p: Any = 1.0,
    top_k: Any = 0,
    *,
    greedy: bool = False,
) -> jax.Array:
    """Next tokens ``(B,)`` int32 from float logits ``(B, V)``.

    ``greedy``: argmax (first index on ties). Otherwise sample from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens (``0``: no limit) and to the smallest set of most likely
    tokens whose probability reaches ``top_p`` (nucleus; ``1``: no limit; the most likely token is always
    kept). ``temperature``, ``top_p`` and ``top_k`` may be traced values.
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    scaled = logits / t
    srt = -jnp.sort(-scaled, axis=-1)  # descending
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
    rank = jnp.arange(V)[None, :]
    k = jnp.asarray(top_k, jnp.int32)
    keep = (before < jnp.asarray(top_p, jnp.float32)) & ((k <= 0) | (rank < k))
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "kv_quant", "dequant_in_loop"))
def _generate_jit(
    graphdef,
    state,
    tokens,
    pad,
    key,
    temperature,
    top_p,
    top_k,
    eos_ids,
    pad_id,
    n_steps,
    *,
    max_new_tokens,
    greedy,
    kv_quant,
    dequant_in_loop=False,
):
    model = nnx.merge(graphdef, state)
    B, T = tokens.shape
    cache = init_cache(model.config, B, T + max_new_tokens, kv_quant)
    logits, cache = _prefill(model, tokens, pad, cache, True)

    def pick(logits, i):
        return sample_logits(logits, jax.random.fold_in(key, i), temperature, top_p, top_k, greedy=greedy)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    first = pick(logits[:, 0], 0)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = is_eos(first)
    lengths = jnp.ones((B,), jnp.int32)
    n_steps = jnp.clip(n_steps, 1, max_new_tokens)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < n_steps) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, out, done, lengths = carry
        # tying the weights to the step counter stops XLA from hoisting their dequantization out of the loop
        st = jax.lax.optimization_barrier((state, i))[0] if dequant_in_loop else state
        logits, cache = _decode(nnx.merge(graphdef, st), tok, pad, cache, T + i - 1)
        nxt = jnp.where(done, pad_id, pick(logits, i))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.int32(0), i))
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, nxt, cache, out, done | is_eos(nxt), lengths

    carry = (jnp.int32(1), first, cache, out, done, lengths)
    _, _, _, out, done, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths, done


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one length; returns ``(tokens (B, T) int32, pad (B,) int32)``.

    ``length`` (default: the longest prompt) must be at least the longest prompt. Raises ``ValueError`` for
    an empty batch or an empty prompt.
    """
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (got an empty prompt)")
    T = max(len(r) for r in rows)
    if length is not None:
        if length < T:
            raise ValueError(f"length={length} is shorter than the longest prompt ({T} tokens)")
        T = length
    tokens = np.full((len(rows), T), pad_id, np.int32)
    pad = np.zeros((len(rows),), np.int32)
    for b, r in enumerate(rows):
        tokens[b, T - len(r) :] = r
        pad[b] = T - len(r)
    return tokens, pad


def _eos_list(eos_id: int | Sequence[int] | None) -> list[int]:
    if eos_id is None:
        return []
    if isinstance(eos_id, int | np.integer):
        return [int(eos_id)]
    return [int(e) for e in eos_id]


def _eos_array(ids: list[int]) -> jax.Array:
    """Stop ids as a fixed-size array (unused entries -1, which no token equals): one program for any ids."""
    if len(ids) > MAX_EOS_IDS:
        raise ValueError(f"at most {MAX_EOS_IDS} eos ids, got {len(ids)}")
    if any(i < 0 for i in ids):
        raise ValueError(f"eos ids must be non-negative, got {ids}")
    return jnp.asarray(ids + [-1] * (MAX_EOS_IDS - len(ids)), jnp.int32)


def generate_tokens(
    model: Llama | tuple[Any, Any],
    tokens: Any,
    pad: Any = None,
    *,
    max_new_tokens: int,
    n_steps: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | jax.Array = 0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
    kv_quant: KVQuant = None,
    dequant_in_loop: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The compiled generation on arrays; returns device arrays without waiting for them.

    Args:
      model: a :class:`Llama`, or ``(graphdef, state)`` from ``nnx.split`` (saves the split per call).
      tokens, pad: left-padded prompts ``(B, T)`` and pad counts ``(B,)`` (see :func:`left_pad`).
      max_new_tokens: static capacity: the cache has ``T + max_new_tokens`` slots.
      n_steps: generate at most this many tokens (``<= max_new_tokens``; default all). A traced value: the
        benchmark times 1 vs N steps with one compiled program.
      temperature: ``0`` for greedy decoding, else the sampling temperature.
      top_p, top_k: nucleus and top-k filters for sampling (``1.0`` / ``0``: off).
      seed: int seed or a JAX key; the token at step ``i`` uses ``fold_in(key, i)``.
      eos_id: token id(s) that end a row (``None``: never stop early; at most :data:`MAX_EOS_IDS`).
      pad_id: id written after a row ended (default: the first eos id, else 0).
      kv_quant: ``None``, ``"int8"`` or ``"fp8"``.
      dequant_in_loop: dequantize XLA-path weights at every decode step instead of letting XLA hoist that out
        of the loop (see the module docstring; no effect on kernels).

    Returns:
      ``(out (B, max_new_tokens) int32, lengths (B,) int32, finished (B,) bool)``: ``out[b, :lengths[b]]`` are
      the new tokens of row ``b`` (its eos token included when ``finished[b]``); the rest is ``pad_id``.
    """
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    kv_quant = _check_kv_quant(kv_quant)
    graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
    tokens = _check_tokens(tokens)
    pad = _as_pad(pad, tokens.shape[0])
    ids = _eos_list(eos_id)
    eos = _eos_array(ids)
    if pad_id is None:
        pad_id = ids[0] if ids else 0
    key = jax.random.key(seed) if isinstance(seed, int | np.integer) else seed
    steps = max_new_tokens if n_steps is None else int(n_steps)
    return _generate_jit(
        graphdef,
        state,
        tokens,
        pad,
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.int32(top_k),
        eos,
        jnp.int32(pad_id),
        jnp.int32(steps),
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0,
        kv_quant=kv_quant,
        dequant_in_loop=bool(dequant_in_loop),
    )


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What :func:`generate` returns (host arrays).

    Attributes:
      tokens: ``(B, max_new_tokens)`` int32 new tokens, ``pad_id`` after a row's end.
      lengths: ``(B,)`` number of valid new tokens per row (eos included).
      finished: ``(B,)`` whether the row produced an eos token.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray

    def sequences(self) -> list[list[int]]:
        """The new tokens of each row, trimmed to its length."""
        return [self.tokens[b, : int(n)].tolist() for b, n in enumerate(self.lengths)]


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
    kv_quant: KVQuant = None,
    prompt_len: int | None = None,
    dequant_in_loop: bool = False,
) -> GenerationOutput:
    """Generate continuations of a batch of prompts (token id lists of any lengths; left-padded here).

    Greedy when ``temperature == 0`` (default), else seeded temperature / top-p / top-k sampling (the same
    ``seed`` gives the same tokens). ``prompt_len`` pads every prompt to that length, so that prompts of
    different lengths share one compiled program. See :func:`generate_tokens` for the other arguments.
    """
    if isinstance(prompts, np.ndarray | jax.Array):
        arr = np.asarray(prompts)
        if arr.ndim not in (1, 2):
            raise ValueError(f"prompts must be 1-D (one prompt) or 2-D (batch, seq), got shape {arr.shape}")
        prompts = [arr.tolist()] if arr.ndim == 1 else arr.tolist()
    elif len(prompts) and isinstance(prompts[0], int | np.integer):
        prompts = [list(prompts)]  # a single prompt as a flat list of ids
    tokens, pad = left_pad(prompts, 0, prompt_len)
    out, lengths, done = generate_tokens(
        model,
        tokens,
        pad,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        eos_id=eos_id,
        pad_id=pad_id,
        kv_quant=kv_quant,
        dequant_in_loop=dequant_in_loop,
    )
    return GenerationOutput(np.asarray(out), np.asarray(lengths), np.asarray(done))
